"""What a session-bound hardware report's 64-byte REPORT_DATA holds (configfs-tsm path).

    report_data = SHA-512(E("encloud/v2 report data", Q, ak_public))

Q is the quote's qualifying data (docs/PROTOCOL.md), which already binds the suite,
the client's nonce, the session public key, the session id and the TTL; ak_public is
the marshalled TPMT_PUBLIC of the AK that signs the quote. So one hardware report
binds the session key and the AK to this very Attest call.
"""

from __future__ import annotations

import hashlib

from encloud.protocol.encoding import encode

REPORT_DATA_LABEL = "encloud/v2 report data"

# Evidence.hardware_kind values.
KIND_AZURE_HCL = "azure-hcl"
"""Azure's HCL report from vTPM NV 0x01400001 (SEV-SNP report + runtime claims)."""
KIND_SEV_SNP = "sev-snp"
"""A raw SEV-SNP ATTESTATION_REPORT from configfs-tsm, REPORT_DATA = session binding."""
KIND_TDX = "tdx"
"""A TDX quote from configfs-tsm, REPORT_DATA = session binding (parsed, not verified)."""
KIND_SEV = "sev"
"""Plain SEV or SEV-ES: no signed report. Always refused."""
KINDS = (KIND_AZURE_HCL, KIND_SEV_SNP, KIND_TDX, KIND_SEV)


def session_report_data(qualifying_data: bytes, ak_public: bytes) -> bytes:
    """The 64 bytes a session-bound report carries in REPORT_DATA."""
    return hashlib.sha512(encode(REPORT_DATA_LABEL, qualifying_data, ak_public)).digest()
