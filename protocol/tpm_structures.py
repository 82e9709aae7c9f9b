"""Strict parsers for the TPM 2.0 structures a quote verifier reads.

Only what an attestation key (AK) and a PCR quote use is understood:
TPMT_PUBLIC (RSA 2048/3072 and ECC P-256/P-384), TPMS_ATTEST with
TPMS_QUOTE_INFO, TPMT_SIGNATURE (ECDSA, RSASSA, RSAPSS over SHA-256 or
SHA-384) and TPML_PCR_SELECTION. Every length is checked against what
remains, trailing bytes are refused, and an algorithm this module does not
know is refused rather than skipped. Every failure raises
MalformedEvidenceError naming the structure and the field.

All integers are big-endian (TPM 2.0 Part 1, marshalling rules). Field
layouts follow TPM 2.0 Part 2 (Structures).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from encloud.protocol.errors import MalformedEvidenceError

# --- constants (TPM 2.0 Part 2) ---------------------------------------------------

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

TPM_ALG_RSA = 0x0001
TPM_ALG_SHA1 = 0x0004
TPM_ALG_AES = 0x0006
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_NULL = 0x0010
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_ECDSA = 0x0018
TPM_ALG_ECC = 0x0023
TPM_ALG_CFB = 0x0043

TPM_ECC_NIST_P256 = 0x0003
TPM_ECC_NIST_P384 = 0x0004

TPM_RH_OWNER = 0x40000001
TPM_RH_NULL = 0x40000007
TPM_RH_ENDORSEMENT = 0x4000000B
TPM_RH_PLATFORM = 0x4000000C

HASH_SIZES: Mapping[int, int] = {
    TPM_ALG_SHA1: 20,
    TPM_ALG_SHA256: 32,
    TPM_ALG_SHA384: 48,
    TPM_ALG_SHA512: 64,
}
HASH_NAMES: Mapping[int, str] = {
    TPM_ALG_SHA1: "sha1",
    TPM_ALG_SHA256: "sha256",
    TPM_ALG_SHA384: "sha384",
    TPM_ALG_SHA512: "sha512",
}
SIGNING_HASHES = frozenset({TPM_ALG_SHA256, TPM_ALG_SHA384})
"""Hash algorithms accepted for names, key schemes and signatures. SHA-1 is refused."""

ECC_CURVES: Mapping[int, tuple[ec.EllipticCurve, int]] = {
    TPM_ECC_NIST_P256: (ec.SECP256R1(), 32),
    TPM_ECC_NIST_P384: (ec.SECP384R1(), 48),
}
RSA_KEY_BITS = frozenset({2048, 3072})
RSA_DEFAULT_EXPONENT = 65537

# TPMA_OBJECT bits
FIXED_TPM = 1 << 1
ST_CLEAR = 1 << 2
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
NO_DA = 1 << 10
ENCRYPTED_DUPLICATION = 1 << 11
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN_ENCRYPT = 1 << 18
X509_SIGN = 1 << 19
_TPMA_OBJECT_RESERVED = 0xFFF0F309  # bits 0, 3, 8, 9, 12-15 and 20-31

MAX_NAME_SIZE = 2 + 64
MAX_DIGEST_SIZE = 64
MAX_PCR_BANKS = 16
MAX_SIZEOF_SELECT = 4


# --- reader -------------------------------------------------------------------------


class _Reader:
    """A cursor over bytes that names the structure in every error."""

    __slots__ = ("_data", "_pos", "structure")

    def __init__(self, data: bytes, structure: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedEvidenceError(f"{structure}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self.structure = structure

    def fail(self, field: str, why: str) -> MalformedEvidenceError:
        return MalformedEvidenceError(f"{self.structure}.{field}: {why}")

    def take(self, n: int, field: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise self.fail(field, f"needs {n} bytes, {len(self._data) - self._pos} remain")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return struct.unpack(">H", self.take(2, field))[0]

    def u32(self, field: str) -> int:
        return struct.unpack(">I", self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return struct.unpack(">Q", self.take(8, field))[0]

    def tpm2b(self, field: str, max_size: int) -> bytes:
        size = self.u16(f"{field}.size")
        if size > max_size:
            raise self.fail(f"{field}.size", f"{size} exceeds the maximum {max_size}")
        return self.take(size, field)

    def remaining(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def end(self) -> None:
        left = len(self._data) - self._pos
        if left:
            raise MalformedEvidenceError(f"{self.structure}: {left} trailing bytes")


def _hash_alg(r: _Reader, field: str, allowed: frozenset[int] = SIGNING_HASHES) -> int:
    alg = r.u16(field)
    if alg not in allowed:
        if alg == TPM_ALG_SHA1:
            raise r.fail(field, "SHA-1 is refused")
        raise r.fail(field, f"hash algorithm 0x{alg:04x} is not accepted")
    return alg


def hash_bytes(alg: int, data: bytes) -> bytes:
    """H_alg(data) for a TPM hash algorithm id."""
    return hashlib.new(HASH_NAMES[alg], data).digest()


# --- TPMT_PUBLIC ----------------------------------------------------------------------


@dataclass(frozen=True)
class SymmetricDef:
    """TPMT_SYM_DEF_OBJECT. algorithm is TPM_ALG_NULL for every signing key."""

    algorithm: int
    key_bits: int = 0
    mode: int = 0


@dataclass(frozen=True)
class AkPublic:
    """A parsed TPMT_PUBLIC of an RSA or ECC key. `raw` is the exact marshalled bytes."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: SymmetricDef
    scheme: int
    """TPM_ALG_NULL, TPM_ALG_ECDSA, TPM_ALG_RSASSA or TPM_ALG_RSAPSS."""
    scheme_hash: int
    """The scheme's hash algorithm; TPM_ALG_NULL when the scheme is NULL."""
    curve: int = 0
    ecc_x: bytes = b""
    ecc_y: bytes = b""
    rsa_key_bits: int = 0
    rsa_exponent: int = 0
    """The effective exponent (0 in the structure means 65537)."""
    rsa_modulus: bytes = b""

    def has(self, bits: int) -> bool:
        return self.attributes & bits == bits

    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        try:
            if self.type == TPM_ALG_ECC:
                curve = ECC_CURVES[self.curve][0]
                return ec.EllipticCurvePublicNumbers(
                    int.from_bytes(self.ecc_x, "big"), int.from_bytes(self.ecc_y, "big"), curve
                ).public_key()
            return rsa.RSAPublicNumbers(
                self.rsa_exponent, int.from_bytes(self.rsa_modulus, "big")
            ).public_key()
        except ValueError as err:
            raise MalformedEvidenceError(
                f"TPMT_PUBLIC.unique: not a valid public key ({err})"
            ) from err

    def name(self) -> bytes:
        """The TPM Name: nameAlg (u16) || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + hash_bytes(self.name_alg, self.raw)

    def qualified_names(self) -> tuple[bytes, ...]:
        """The qualified names this key has if it is a primary object of a hierarchy.

        QN = nameAlg || H_nameAlg(hierarchy handle (u32) || Name), for the owner,
        endorsement, platform and null hierarchies (TPM 2.0 Part 1, "Qualified Name").
        """
        name = self.name()
        prefix = struct.pack(">H", self.name_alg)
        return tuple(
            prefix + hash_bytes(self.name_alg, struct.pack(">I", hierarchy) + name)
            for hierarchy in (TPM_RH_OWNER, TPM_RH_ENDORSEMENT, TPM_RH_PLATFORM, TPM_RH_NULL)
        )


def _parse_symmetric(r: _Reader) -> SymmetricDef:
    alg = r.u16("parameters.symmetric.algorithm")
    if alg == TPM_ALG_NULL:
        return SymmetricDef(TPM_ALG_NULL)
    if alg != TPM_ALG_AES:
        raise r.fail("parameters.symmetric.algorithm", f"algorithm 0x{alg:04x} is not accepted")
    bits = r.u16("parameters.symmetric.keyBits")
    if bits not in (128, 256):
        raise r.fail("parameters.symmetric.keyBits", f"{bits} is not 128 or 256")
    mode = r.u16("parameters.symmetric.mode")
    if mode != TPM_ALG_CFB:
        raise r.fail("parameters.symmetric.mode", f"mode 0x{mode:04x} is not CFB")
    return SymmetricDef(alg, bits, mode)


def _parse_scheme(r: _Reader, allowed: frozenset[int]) -> tuple[int, int]:
    scheme = r.u16("parameters.scheme.scheme")
    if scheme == TPM_ALG_NULL:
        return TPM_ALG_NULL, TPM_ALG_NULL
    if scheme not in allowed:
        raise r.fail("parameters.scheme.scheme", f"scheme 0x{scheme:04x} is not accepted")
    return scheme, _hash_alg(r, "parameters.scheme.hashAlg")


def parse_public(data: bytes) -> AkPublic:
    """Parse a marshalled TPMT_PUBLIC (no TPM2B size prefix) of an RSA or ECC key."""
    r = _Reader(data, "TPMT_PUBLIC")
    key_type = r.u16("type")
    if key_type not in (TPM_ALG_RSA, TPM_ALG_ECC):
        raise r.fail("type", f"key type 0x{key_type:04x} is not RSA or ECC")
    name_alg = _hash_alg(r, "nameAlg")
    attributes = r.u32("objectAttributes")
    if attributes & _TPMA_OBJECT_RESERVED:
        raise r.fail("objectAttributes", f"reserved bits set in 0x{attributes:08x}")
    auth_policy = r.tpm2b("authPolicy", MAX_DIGEST_SIZE)
    if auth_policy and len(auth_policy) != HASH_SIZES[name_alg]:
        raise r.fail("authPolicy", "size is neither 0 nor the nameAlg digest size")
    symmetric = _parse_symmetric(r)
    if key_type == TPM_ALG_ECC:
        scheme, scheme_hash = _parse_scheme(r, frozenset({TPM_ALG_ECDSA}))
        curve = r.u16("parameters.curveID")
        if curve not in ECC_CURVES:
            raise r.fail("parameters.curveID", f"curve 0x{curve:04x} is not P-256 or P-384")
        kdf = r.u16("parameters.kdf.scheme")
        if kdf != TPM_ALG_NULL:
            raise r.fail("parameters.kdf.scheme", f"kdf 0x{kdf:04x} is not NULL")
        size = ECC_CURVES[curve][1]
        x = r.tpm2b("unique.x", size)
        y = r.tpm2b("unique.y", size)
        if len(x) != size or len(y) != size:
            raise r.fail("unique", f"coordinates must be {size} bytes")
        r.end()
        return AkPublic(
            raw=bytes(data),
            type=key_type,
            name_alg=name_alg,
            attributes=attributes,
            auth_policy=auth_policy,
            symmetric=symmetric,
            scheme=scheme,
            scheme_hash=scheme_hash,
            curve=curve,
            ecc_x=x,
            ecc_y=y,
        )
    scheme, scheme_hash = _parse_scheme(r, frozenset({TPM_ALG_RSASSA, TPM_ALG_RSAPSS}))
    key_bits = r.u16("parameters.keyBits")
    if key_bits not in RSA_KEY_BITS:
        raise r.fail("parameters.keyBits", f"{key_bits} is not 2048 or 3072")
    exponent = r.u32("parameters.exponent") or RSA_DEFAULT_EXPONENT
    if exponent < 3 or exponent % 2 == 0:
        raise r.fail("parameters.exponent", f"{exponent} is not an odd number >= 3")
    modulus = r.tpm2b("unique.rsa", key_bits // 8)
    if len(modulus) != key_bits // 8 or not modulus[0] & 0x80:
        raise r.fail("unique.rsa", f"modulus is not exactly {key_bits} bits")
    r.end()
    return AkPublic(
        raw=bytes(data),
        type=key_type,
        name_alg=name_alg,
        attributes=attributes,
        auth_policy=auth_policy,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
        rsa_key_bits=key_bits,
        rsa_exponent=exponent,
        rsa_modulus=modulus,
    )


# --- TPML_PCR_SELECTION -----------------------------------------------------------------


@dataclass(frozen=True)
class PcrSelection:
    """One bank of a TPML_PCR_SELECTION: its hash algorithm and the selected indices."""

    hash_alg: int
    indices: tuple[int, ...]


def _parse_pcr_selection(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.u32("pcrSelect.count")
    if count > MAX_PCR_BANKS:
        raise r.fail("pcrSelect.count", f"{count} banks exceed the maximum {MAX_PCR_BANKS}")
    banks: list[PcrSelection] = []
    seen: set[int] = set()
    for i in range(count):
        field = f"pcrSelect[{i}]"
        alg = r.u16(f"{field}.hash")
        if alg not in HASH_SIZES:
            raise r.fail(f"{field}.hash", f"hash algorithm 0x{alg:04x} is not known")
        if alg in seen:
            raise r.fail(f"{field}.hash", "bank appears twice")
        seen.add(alg)
        size = r.u8(f"{field}.sizeofSelect")
        if not 1 <= size <= MAX_SIZEOF_SELECT:
            raise r.fail(f"{field}.sizeofSelect", f"{size} is not in 1..{MAX_SIZEOF_SELECT}")
        bitmap = r.take(size, f"{field}.pcrSelect")
        indices = tuple(
            byte_index * 8 + bit
            for byte_index, byte in enumerate(bitmap)
            for bit in range(8)
            if byte >> bit & 1
        )
        banks.append(PcrSelection(alg, indices))
    return tuple(banks)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """Parse a marshalled TPML_PCR_SELECTION on its own."""
    r = _Reader(data, "TPML_PCR_SELECTION")
    banks = _parse_pcr_selection(r)
    r.end()
    return banks


# --- TPMS_ATTEST ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteInfo:
    """TPMS_QUOTE_INFO: the quoted PCR selection and the digest of their values."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Attest:
    """A parsed TPMS_ATTEST. `quote` is set only when type is TPM_ST_ATTEST_QUOTE."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    quote: QuoteInfo | None


def parse_attest(data: bytes) -> Attest:
    """Parse signed TPMS_ATTEST bytes (no TPM2B size prefix).

    The magic and type are returned as found so that the verifier can name
    those checks; a type other than a quote leaves `quote` None and its body
    unparsed. A quote body is parsed strictly, trailing bytes refused.
    """
    r = _Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    attest_type = r.u16("type")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME_SIZE)
    extra = r.tpm2b("extraData", MAX_DIGEST_SIZE)
    clock = r.u64("clockInfo.clock")
    reset_count = r.u32("clockInfo.resetCount")
    restart_count = r.u32("clockInfo.restartCount")
    safe = r.u8("clockInfo.safe")
    if safe > 1:
        raise r.fail("clockInfo.safe", f"{safe} is not YES (1) or NO (0)")
    firmware = r.u64("firmwareVersion")
    quote = None
    if attest_type == TPM_ST_ATTEST_QUOTE:
        selection = _parse_pcr_selection(r)
        digest = r.tpm2b("attested.quote.pcrDigest", MAX_DIGEST_SIZE)
        r.end()
        quote = QuoteInfo(selection, digest)
    else:
        r.remaining()
    return Attest(
        magic=magic,
        type=attest_type,
        qualified_signer=signer,
        extra_data=extra,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        safe=bool(safe),
        firmware_version=firmware,
        quote=quote,
    )


# --- TPMT_SIGNATURE -------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """A parsed TPMT_SIGNATURE. ECDSA fills r and s; RSASSA and RSAPSS fill rsa_signature."""

    sig_alg: int
    hash_alg: int
    r: bytes = b""
    s: bytes = b""
    rsa_signature: bytes = b""


MAX_ECC_PARAMETER = 66
MAX_RSA_SIGNATURE = 512


def parse_signature(data: bytes) -> Signature:
    """Parse a marshalled TPMT_SIGNATURE (ECDSA, RSASSA or RSAPSS; SHA-256 or SHA-384)."""
    r = _Reader(data, "TPMT_SIGNATURE")
    sig_alg = r.u16("sigAlg")
    if sig_alg not in (TPM_ALG_ECDSA, TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        raise r.fail("sigAlg", f"signature algorithm 0x{sig_alg:04x} is not accepted")
    hash_alg = _hash_alg(r, "signature.hash")
    if sig_alg == TPM_ALG_ECDSA:
        sig_r = r.tpm2b("signature.signatureR", MAX_ECC_PARAMETER)
        sig_s = r.tpm2b("signature.signatureS", MAX_ECC_PARAMETER)
        if not sig_r or not sig_s:
            raise r.fail("signature", "empty r or s")
        r.end()
        return Signature(sig_alg, hash_alg, r=sig_r, s=sig_s)
    sig = r.tpm2b("signature.sig", MAX_RSA_SIGNATURE)
    if not sig:
        raise r.fail("signature.sig", "empty signature")
    r.end()
    return Signature(sig_alg, hash_alg, rsa_signature=sig)
