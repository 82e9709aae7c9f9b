"""AMD SEV-SNP attestation reports and their VCEK -> ASK -> ARK certificate chain.

Layout: AMD SEV Secure Nested Paging Firmware ABI Specification (publication 56860),
table "ATTESTATION_REPORT Structure": 0x4A0 bytes, little-endian integers, the
signature at 0x2A0 over bytes 0x000-0x29F. With SIGNATURE_ALGO 1 (ECDSA P-384 with
SHA-384) the signature holds R (72 bytes, little-endian) then S (72 bytes,
little-endian), the rest zero.

    0x000 VERSION u32         0x004 GUEST_SVN u32      0x008 POLICY u64
    0x010 FAMILY_ID [16]      0x020 IMAGE_ID [16]      0x030 VMPL u32
    0x034 SIGNATURE_ALGO u32  0x038 CURRENT_TCB u64    0x040 PLATFORM_INFO u64
    0x048 signer info u32 (bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 2-4 SIGNING_KEY)
    0x04C reserved [4]        0x050 REPORT_DATA [64]   0x090 MEASUREMENT [48]
    0x0C0 HOST_DATA [32]      0x0E0 ID_KEY_DIGEST [48] 0x110 AUTHOR_KEY_DIGEST [48]
    0x140 REPORT_ID [32]      0x160 REPORT_ID_MA [32]  0x180 REPORTED_TCB u64
    0x188 CPUID fam/mod/step (version 3+), reserved to 0x1A0
    0x1A0 CHIP_ID [64]        0x1E0 COMMITTED_TCB u64  0x1E8 current build/minor/major
    0x1EC committed build/minor/major                   0x1F0 LAUNCH_TCB u64
    0x1F8 reserved to 0x2A0   0x2A0 SIGNATURE [512]

Guest policy bits: 16 SMT, 17 reserved (must be one), 18 MIGRATE_MA, 19 DEBUG,
20 SINGLE_SOCKET. TCB_VERSION (Milan and Genoa): byte 0 BOOT_LOADER, byte 1 TEE,
bytes 2-5 reserved, byte 6 SNP, byte 7 MICROCODE. (Turin's layout differs: it is
refused by `TcbVersion.from_u64` only in the sense that its fields are read with
the Milan/Genoa layout; docs/DEPLOY.md says so.)

The VCEK certificate (X.509, ECDSA P-384 key) carries AMD's extensions
1.3.6.1.4.1.3704.1.3.{1,2,3,8} (boot loader, TEE, SNP, microcode SPL, DER
INTEGER) and 1.3.6.1.4.1.3704.1.4 (hwID: the 64-byte CHIP_ID, DER OCTET STRING);
the ASK and ARK are RSA-4096 certificates signed with RSASSA-PSS (SHA-384).
"""

from __future__ import annotations

import datetime
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from encloud.protocol.errors import (
    HardwareChainError,
    HardwareReportFormatError,
    HardwareSignatureError,
)

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE = 0, 1, 7
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

OID_BL_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
OID_RSASSA_PSS = x509.ObjectIdentifier("1.2.840.113549.1.1.10")


@dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION (Milan/Genoa layout): the security patch level of each component."""

    bootloader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def from_u64(cls, value: int) -> TcbVersion:
        b = value.to_bytes(8, "little")
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def to_u64(self) -> int:
        b = bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])
        return int.from_bytes(b, "little")

    def below(self, minimum: TcbVersion) -> list[str]:
        """The components lower than `minimum`'s (empty when this TCB meets it)."""
        return [
            name
            for name in ("bootloader", "tee", "snp", "microcode")
            if getattr(self, name) < getattr(minimum, name)
        ]

    def __str__(self) -> str:
        return (
            f"bootloader {self.bootloader}, tee {self.tee}, snp {self.snp}, "
            f"microcode {self.microcode}"
        )


@dataclass(frozen=True)
class SnpReport:
    """A parsed SEV-SNP ATTESTATION_REPORT; `raw` is the 0x4A0 bytes it came from."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    chip_id: bytes
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @property
    def signing_key(self) -> int:
        return (self.signer_info >> 2) & 7

    @property
    def mask_chip_id(self) -> bool:
        return bool(self.signer_info & 2)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def _zero(data: bytes, start: int, end: int, what: str) -> None:
    if any(data[start:end]):
        raise HardwareReportFormatError(
            f"SEV-SNP report {what} [0x{start:x}:0x{end:x}] is not zero"
        )


def parse_report(data: bytes) -> SnpReport:
    """Parse an ATTESTATION_REPORT strictly (sizes, reserved fields, signature algorithm)."""
    if not isinstance(data, bytes) or len(data) != REPORT_SIZE:
        size = len(data) if isinstance(data, bytes | bytearray) else "?"
        raise HardwareReportFormatError(f"an SEV-SNP report is 0x{REPORT_SIZE:x} bytes, not {size}")
    version = _u32(data, 0x00)
    if version not in (2, 3):
        raise HardwareReportFormatError(f"SEV-SNP report version {version} is not 2 or 3")
    policy = _u64(data, 0x08)
    if not policy & POLICY_RESERVED_ONE:
        raise HardwareReportFormatError("SEV-SNP guest policy bit 17 (reserved, one) is zero")
    signature_algo = _u32(data, 0x34)
    if signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise HardwareReportFormatError(
            f"SEV-SNP signature algorithm {signature_algo} is not 1 (ECDSA P-384 SHA-384)"
        )
    signer_info = _u32(data, 0x48)
    if signer_info >> 5:
        raise HardwareReportFormatError("SEV-SNP signer info reserved bits are set")
    _zero(data, 0x4C, 0x50, "reserved")
    _zero(data, 0x18B if version >= 3 else 0x188, 0x1A0, "reserved")
    _zero(data, 0x1EB, 0x1EC, "reserved")
    _zero(data, 0x1EF, 0x1F0, "reserved")
    _zero(data, 0x1F8, SIGNED_SIZE, "reserved")
    _zero(data, SIGNED_SIZE + 144, REPORT_SIZE, "signature padding")
    return SnpReport(
        raw=bytes(data),
        version=version,
        guest_svn=_u32(data, 0x04),
        policy=policy,
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=_u32(data, 0x30),
        signature_algo=signature_algo,
        current_tcb=TcbVersion.from_u64(_u64(data, 0x38)),
        platform_info=_u64(data, 0x40),
        signer_info=signer_info,
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=TcbVersion.from_u64(_u64(data, 0x180)),
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=TcbVersion.from_u64(_u64(data, 0x1E0)),
        launch_tcb=TcbVersion.from_u64(_u64(data, 0x1F0)),
        signature_r=int.from_bytes(data[SIGNED_SIZE : SIGNED_SIZE + 72], "little"),
        signature_s=int.from_bytes(data[SIGNED_SIZE + 72 : SIGNED_SIZE + 144], "little"),
    )


# --- the VCEK chain ---------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedChain:
    vcek: x509.Certificate
    ark_subject: str
    vcek_tcb: TcbVersion
    hwid: bytes


def _load(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise HardwareChainError(f"the {what} certificate does not parse as DER") from err


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as err:
        raise HardwareChainError(f"the {what} certificate is not signed by its issuer") from err


def _valid_now(cert: x509.Certificate, what: str, now: datetime.datetime) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise HardwareChainError(f"the {what} certificate is not valid at the current time")


def _amd_rsa_pss(cert: x509.Certificate, what: str) -> None:
    if cert.signature_algorithm_oid != OID_RSASSA_PSS:
        raise HardwareChainError(f"the {what} certificate is not signed with RSASSA-PSS")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _der_integer(value: bytes) -> int:
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 8:
        raise HardwareChainError("a VCEK TCB extension is not a small DER INTEGER")
    return int.from_bytes(value[2:], "big", signed=True)


def _der_octets(value: bytes) -> bytes:
    if len(value) == 64:  # some issuers put the raw bytes without an OCTET STRING
        return value
    if len(value) == 66 and value[0] == 0x04 and value[1] == 64:
        return value[2:]
    raise HardwareChainError("the VCEK hwID extension is not 64 bytes")


def vcek_extensions(vcek: x509.Certificate) -> tuple[TcbVersion, bytes]:
    """The TCB the VCEK was issued for, and its hwID (CHIP_ID)."""

    def ext(oid: x509.ObjectIdentifier) -> bytes:
        try:
            value = vcek.extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound as err:
            raise HardwareChainError(f"the VCEK lacks AMD extension {oid.dotted_string}") from err
        assert isinstance(value, x509.UnrecognizedExtension)
        return value.value

    tcb = TcbVersion(
        bootloader=_der_integer(ext(OID_BL_SPL)),
        tee=_der_integer(ext(OID_TEE_SPL)),
        snp=_der_integer(ext(OID_SNP_SPL)),
        microcode=_der_integer(ext(OID_UCODE_SPL)),
    )
    return tcb, _der_octets(ext(OID_HWID))


def verify_vcek_chain(
    chain: Sequence[bytes], roots: Sequence[bytes], *, now: datetime.datetime | None = None
) -> VerifiedChain:
    """Check VCEK (leaf) -> ASK -> ARK, the ARK being one of `roots` (DER).

    `chain` is [VCEK, ASK] or [VCEK, ASK, ARK] (DER); a shipped ARK must equal a root.
    The ARK is self-signed, the ASK signed by it, both with RSASSA-PSS and both CAs;
    the VCEK is an ECDSA P-384 key signed by the ASK; all valid now.
    """
    if not 2 <= len(chain) <= 3:
        raise HardwareChainError(
            f"the VCEK chain has {len(chain)} certificates, not VCEK, ASK[, ARK]"
        )
    if not roots:
        raise HardwareChainError("the policy names no AMD root (ARK)")
    now = now or datetime.datetime.now(datetime.UTC)
    vcek = _load(chain[0], "VCEK")
    ask = _load(chain[1], "ASK")
    if len(chain) == 3 and chain[2] not in roots:
        raise HardwareChainError("the shipped ARK is not one of the policy's AMD roots")
    arks = [_load(r, "ARK") for r in roots]
    candidates = [a for a in arks if a.subject == ask.issuer]
    if not candidates:
        raise HardwareChainError(
            f"the ASK's issuer {ask.issuer.rfc4514_string()} is none of the policy's AMD roots"
        )
    ark = None
    for candidate in candidates:
        try:
            ask.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        ark = candidate
        break
    if ark is None:
        raise HardwareChainError("the ASK is not signed by any of the policy's AMD roots")
    _signed_by(ark, ark, "ARK")
    for cert, what in ((ark, "ARK"), (ask, "ASK")):
        _amd_rsa_pss(cert, what)
        if not _is_ca(cert):
            raise HardwareChainError(f"the {what} certificate is not a CA")
        _valid_now(cert, what, now)
    if vcek.issuer != ask.subject:
        raise HardwareChainError("the VCEK's issuer is not the ASK")
    _signed_by(vcek, ask, "VCEK")
    _amd_rsa_pss(vcek, "VCEK")
    _valid_now(vcek, "VCEK", now)
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise HardwareChainError("the VCEK is not an ECDSA P-384 key")
    if not isinstance(ark.public_key(), rsa.RSAPublicKey):
        raise HardwareChainError("the ARK is not an RSA key")
    tcb, hwid = vcek_extensions(vcek)
    return VerifiedChain(vcek, ark.subject.rfc4514_string(), tcb, hwid)


def verify_report_signature(report: SnpReport, vcek: x509.Certificate) -> None:
    """The report's ECDSA P-384/SHA-384 signature over bytes 0x000-0x29F, by the VCEK."""
    key = vcek.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(der, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as err:
        raise HardwareSignatureError("the SEV-SNP report's signature is not the VCEK's") from err


def check_vcek_matches(report: SnpReport, chain: VerifiedChain) -> None:
    """The VCEK is the one for this chip and this report's REPORTED_TCB."""
    if report.signing_key != SIGNING_KEY_VCEK:
        raise HardwareSignatureError(
            f"the report is signed by key kind {report.signing_key}, not the VCEK"
        )
    if chain.vcek_tcb != report.reported_tcb:
        raise HardwareSignatureError(
            f"the VCEK is for TCB ({chain.vcek_tcb}), the report's REPORTED_TCB is "
            f"({report.reported_tcb})"
        )
    if not report.mask_chip_id and not hmac.compare_digest(chain.hwid, report.chip_id):
        raise HardwareSignatureError("the VCEK's hwID is not the report's CHIP_ID")


__all__ = [
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SnpReport",
    "TcbVersion",
    "VerifiedChain",
    "check_vcek_matches",
    "parse_report",
    "vcek_extensions",
    "verify_report_signature",
    "verify_vcek_chain",
]
