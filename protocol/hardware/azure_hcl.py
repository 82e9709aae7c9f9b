"""Azure's HCL report: what an Azure confidential VM's paravisor keeps in vTPM NV 0x01400001.

Layout (little-endian), as Azure's guest attestation libraries read it:

    0x000 ATTESTATION_HEADER (32 bytes): signature u32 'HCLA' (0x414C4348), version u32,
          report_size u32, request_type u32, status u32, reserved [12]
    0x020 hardware report, a 1184-byte field: the SEV-SNP ATTESTATION_REPORT (0x4A0
          bytes) or a TDX TDREPORT (1024 bytes, zero-padded)
    0x4C0 IGVM_REQUEST_DATA: data_size u32, version u32, report_type u32 (2 SNP, 4 TDX),
          report_data_hash_type u32 (1 SHA-256, 2 SHA-384, 3 SHA-512),
          variable_data_size u32
    0x4D4 variable data: the runtime claims, UTF-8 JSON, variable_data_size bytes

The hardware report's REPORT_DATA starts with hash(variable data) (SHA-256: 32 bytes,
then zeros). The runtime claims carry the vTPM's AK as a JWK with kid "HCLAkPub" in
"keys", and "vm-configuration" with "secure-boot", "tpm-enabled", "console-enabled".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from encloud.protocol.canonical import strict_loads
from encloud.protocol.errors import HardwareReportFormatError, RuntimeClaimsError

HCL_SIGNATURE = 0x414C4348  # 'HCLA' read as a little-endian u32
HEADER_SIZE = 32
HW_REPORT_FIELD_SIZE = 1184
REQUEST_DATA_OFFSET = HEADER_SIZE + HW_REPORT_FIELD_SIZE  # 0x4C0
REQUEST_DATA_FIXED = 20
VARIABLE_DATA_OFFSET = REQUEST_DATA_OFFSET + REQUEST_DATA_FIXED  # 0x4D4
REPORT_TYPE_SNP, REPORT_TYPE_TDX = 2, 4
HASH_TYPES = {1: "sha256", 2: "sha384", 3: "sha512"}
AK_KID = "HCLAkPub"


@dataclass(frozen=True)
class HclReport:
    raw: bytes
    version: int
    report_type: int
    hash_type: int
    hardware_report: bytes
    """The SNP report (0x4A0 bytes) or the TDREPORT (1024 bytes)."""
    runtime_claims: bytes
    """The variable data exactly as hashed into REPORT_DATA."""

    def claims_digest(self) -> bytes:
        return hashlib.new(HASH_TYPES[self.hash_type], self.runtime_claims).digest()

    def expected_report_data(self) -> bytes:
        """REPORT_DATA as the HCL fills it: the claims' hash, zero-padded to 64 bytes."""
        return self.claims_digest().ljust(64, b"\0")


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an HCL report strictly; bytes after the variable data (NV padding) are ignored."""
    if len(data) < VARIABLE_DATA_OFFSET:
        raise HardwareReportFormatError(f"an HCL report is at least {VARIABLE_DATA_OFFSET} bytes")
    signature, version, _report_size, _request_type, _status = struct.unpack_from("<5I", data, 0)
    if signature != HCL_SIGNATURE:
        raise HardwareReportFormatError(f"HCL report signature 0x{signature:08x} is not 'HCLA'")
    _data_size, _req_version, report_type, hash_type, var_size = struct.unpack_from(
        "<5I", data, REQUEST_DATA_OFFSET
    )
    if report_type == REPORT_TYPE_SNP:
        hw = data[HEADER_SIZE : HEADER_SIZE + 0x4A0]
    elif report_type == REPORT_TYPE_TDX:
        hw = data[HEADER_SIZE : HEADER_SIZE + 1024]
    else:
        raise HardwareReportFormatError(f"HCL report type {report_type} is not SNP (2) or TDX (4)")
    if hash_type not in HASH_TYPES:
        raise HardwareReportFormatError(f"HCL report data hash type {hash_type} is unknown")
    end = VARIABLE_DATA_OFFSET + var_size
    if var_size == 0 or end > len(data):
        raise HardwareReportFormatError("the HCL report's runtime claims are empty or truncated")
    return HclReport(
        raw=bytes(data[:end]),
        version=version,
        report_type=report_type,
        hash_type=hash_type,
        hardware_report=bytes(hw),
        runtime_claims=bytes(data[VARIABLE_DATA_OFFSET:end]),
    )


@dataclass(frozen=True)
class RuntimeClaims:
    ak_spki: bytes
    """DER SubjectPublicKeyInfo of the JWK with kid HCLAkPub."""
    vm_configuration: dict[str, Any]


def _b64url_int(value: object, field: str) -> int:
    if not isinstance(value, str):
        raise RuntimeClaimsError(f"runtime claims: JWK {field} is not a string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as err:
        raise RuntimeClaimsError(f"runtime claims: JWK {field} is not base64url") from err
    return int.from_bytes(raw, "big")


def _jwk_spki(jwk: dict[str, Any]) -> bytes:
    kty = jwk.get("kty")
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    try:
        if kty == "RSA":
            key = rsa.RSAPublicNumbers(
                _b64url_int(jwk.get("e"), "e"), _b64url_int(jwk.get("n"), "n")
            ).public_key()
        elif kty == "EC":
            curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
            curve = curves.get(str(jwk.get("crv")))
            if curve is None:
                raise RuntimeClaimsError("runtime claims: unsupported EC curve for the AK")
            key = ec.EllipticCurvePublicNumbers(
                _b64url_int(jwk.get("x"), "x"), _b64url_int(jwk.get("y"), "y"), curve
            ).public_key()
        else:
            raise RuntimeClaimsError(f"runtime claims: AK key type {kty!r} is not RSA or EC")
    except ValueError as err:
        raise RuntimeClaimsError("runtime claims: the AK JWK is not a valid public key") from err
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_runtime_claims(claims: bytes) -> RuntimeClaims:
    """The AK (kid HCLAkPub) and the vm-configuration object of Azure's runtime claims."""
    try:
        obj = strict_loads(claims.rstrip(b"\0"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RuntimeClaimsError("runtime claims are not UTF-8 JSON") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("keys"), list):
        raise RuntimeClaimsError("runtime claims have no key list")
    aks = [k for k in obj["keys"] if isinstance(k, dict) and k.get("kid") == AK_KID]
    if len(aks) != 1:
        raise RuntimeClaimsError(f"runtime claims hold {len(aks)} keys with kid {AK_KID}")
    config = obj.get("vm-configuration")
    if not isinstance(config, dict):
        raise RuntimeClaimsError("runtime claims have no vm-configuration object")
    return RuntimeClaims(ak_spki=_jwk_spki(aks[0]), vm_configuration=config)


__all__ = [
    "AK_KID",
    "HclReport",
    "RuntimeClaims",
    "parse_hcl_report",
    "parse_runtime_claims",
]
