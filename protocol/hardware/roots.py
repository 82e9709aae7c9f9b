"""Which vendor roots a production policy may name.

A production policy's AMD roots must be AMD's own ARKs: organization "Advanced Micro
Devices" and common name ARK-Milan, ARK-Genoa or ARK-Turin (the names AMD's Key
Distribution Service issues; operators fetch and pin the certificates themselves,
docs/DEPLOY.md). The subject check is a guard against selecting a test root by
accident, not a substitute for pinning: the policy still holds the exact certificate,
and a VCEK chain must verify against its key.

There is no process-wide registry of accepted roots: a test that needs a production policy
over a test root passes it to that one policy object (`parse_policy(...,
unsafe_test_roots=...)`), so it can never leak into another check in the same process, and
nothing read from a file or the network can set it.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

AMD_ORGANIZATION = "Advanced Micro Devices"
AMD_ARK_NAMES = frozenset({"ARK-Milan", "ARK-Genoa", "ARK-Turin"})


def is_production_amd_root(der: bytes) -> bool:
    """True when the certificate (DER) is named as one of AMD's ARKs."""
    cert = x509.load_der_x509_certificate(der)

    def names(oid: x509.ObjectIdentifier) -> list[str]:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]

    return names(NameOID.ORGANIZATION_NAME) == [AMD_ORGANIZATION] and any(
        n in AMD_ARK_NAMES for n in names(NameOID.COMMON_NAME)
    )
