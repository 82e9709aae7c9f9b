"""Build TPM structures by hand for verifier tests: AK public areas, quotes, signatures, logs.

Everything here mirrors what a TPM marshals (TPM 2.0 Part 2), written
independently of encloud.protocol.tpm_structures so that the tests check the
parser against a second reading of the specification.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from encloud.protocol import eventlog
from encloud.protocol.evidence import Evidence
from encloud.protocol.policy import Policy, build_policy

SHA1, SHA256, SHA384 = 0x0004, 0x000B, 0x000C
NULL, RSA, ECC, AES, CFB = 0x0010, 0x0001, 0x0023, 0x0006, 0x0043
ECDSA, RSASSA, RSAPSS = 0x0018, 0x0014, 0x0016
P256, P384 = 0x0003, 0x0004
MAGIC, ST_QUOTE = 0xFF544347, 0x8018
TPM_RH_ENDORSEMENT = 0x4000000B

FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN, USER_WITH_AUTH = 0x2, 0x10, 0x20, 0x40
RESTRICTED, DECRYPT, SIGN = 0x10000, 0x20000, 0x40000
AK_ATTRIBUTES = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | RESTRICTED | SIGN
)

_HASHLIB = {SHA1: "sha1", SHA256: "sha256", SHA384: "sha384"}
_CRYPTO_HASH = {SHA1: hashes.SHA1, SHA256: hashes.SHA256, SHA384: hashes.SHA384}


def h(alg: int, data: bytes) -> bytes:
    return hashlib.new(_HASHLIB[alg], data).digest()


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


# --- TPMT_PUBLIC ---------------------------------------------------------------------


def ecc_public(
    key: ec.EllipticCurvePrivateKey,
    *,
    attributes: int = AK_ATTRIBUTES,
    name_alg: int = SHA256,
    scheme: int = ECDSA,
    scheme_hash: int | None = None,
    symmetric: bytes = u16(NULL),
    auth_policy: bytes = b"",
) -> bytes:
    """TPMT_PUBLIC of an ECC key (P-256 or P-384) from a cryptography private key."""
    pub = key.public_key()
    size = (pub.curve.key_size + 7) // 8
    curve = {256: P256, 384: P384}[pub.curve.key_size]
    if scheme_hash is None:
        scheme_hash = SHA256 if curve == P256 else SHA384
    numbers = pub.public_numbers()
    scheme_bytes = u16(scheme) + (u16(scheme_hash) if scheme != NULL else b"")
    return (
        u16(ECC)
        + u16(name_alg)
        + u32(attributes)
        + tpm2b(auth_policy)
        + symmetric
        + scheme_bytes
        + u16(curve)
        + u16(NULL)  # kdf
        + tpm2b(numbers.x.to_bytes(size, "big"))
        + tpm2b(numbers.y.to_bytes(size, "big"))
    )


def rsa_public(
    key: rsa.RSAPrivateKey,
    *,
    attributes: int = AK_ATTRIBUTES,
    name_alg: int = SHA256,
    scheme: int = RSASSA,
    scheme_hash: int = SHA256,
    exponent_field: int = 0,
) -> bytes:
    """TPMT_PUBLIC of an RSA key; exponent 0 stands for 65537."""
    pub = key.public_key()
    n = pub.public_numbers().n.to_bytes(pub.key_size // 8, "big")
    return (
        u16(RSA)
        + u16(name_alg)
        + u32(attributes)
        + tpm2b(b"")
        + u16(NULL)
        + u16(scheme)
        + u16(scheme_hash)
        + u16(pub.key_size)
        + u32(exponent_field)
        + tpm2b(n)
    )


def name_of(public: bytes, name_alg: int = SHA256) -> bytes:
    return u16(name_alg) + h(name_alg, public)


def qualified_name_of(public: bytes, hierarchy: int, name_alg: int = SHA256) -> bytes:
    return u16(name_alg) + h(name_alg, u32(hierarchy) + name_of(public, name_alg))


# --- TPMS_ATTEST ---------------------------------------------------------------------


def pcr_selection(banks: list[tuple[int, list[int]]], size_of_select: int = 3) -> bytes:
    out = u32(len(banks))
    for alg, indices in banks:
        bitmap = bytearray(size_of_select)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        out += u16(alg) + bytes([size_of_select]) + bytes(bitmap)
    return out


def quote_attest(
    *,
    signer: bytes,
    extra_data: bytes,
    banks: list[tuple[int, list[int]]],
    pcr_digest: bytes,
    magic: int = MAGIC,
    attest_type: int = ST_QUOTE,
    clock: int = 123456,
    reset_count: int = 1,
    restart_count: int = 2,
    safe: int = 1,
    firmware: int = 0x2000_0001_0000_0000,
) -> bytes:
    return (
        u32(magic)
        + u16(attest_type)
        + tpm2b(signer)
        + tpm2b(extra_data)
        + u64(clock)
        + u32(reset_count)
        + u32(restart_count)
        + bytes([safe])
        + u64(firmware)
        + pcr_selection(banks)
        + tpm2b(pcr_digest)
    )


# --- TPMT_SIGNATURE ------------------------------------------------------------------


def sign(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    message: bytes,
    *,
    hash_alg: int = SHA256,
    scheme: int | None = None,
) -> bytes:
    """Sign like a TPM and marshal TPMT_SIGNATURE (ECDSA r,s; RSASSA; RSAPSS)."""
    algo = _CRYPTO_HASH[hash_alg]()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(algo)))
        size = (key.curve.key_size + 7) // 8
        return (
            u16(ECDSA)
            + u16(hash_alg)
            + tpm2b(r.to_bytes(size, "big"))
            + tpm2b(s.to_bytes(size, "big"))
        )
    scheme = scheme or RSASSA
    if scheme == RSASSA:
        sig = key.sign(message, padding.PKCS1v15(), algo)
    else:
        pss = padding.PSS(mgf=padding.MGF1(algo), salt_length=padding.PSS.DIGEST_LENGTH)
        sig = key.sign(message, pss, algo)
    return u16(scheme) + u16(hash_alg) + tpm2b(sig)


# --- event log -------------------------------------------------------------------------

MODEL_DIGEST = hashlib.sha256(b"model manifest").digest()
RUNTIME_EVENT: dict[str, Any] = {
    "decoding": {"temperature": 0.0, "top_p": 1.0},
    "engine": "onnxruntime-genai 0.18.0",
    "known_answer": "ab" * 32,
}


def runtime_bytes(event: dict[str, Any]) -> bytes:
    return eventlog.canonical_json(event)


def event_records(
    startups: list[tuple[bytes, dict[str, Any]]], pcr: int = 15
) -> list[eventlog.EventRecord]:
    records = []
    for model, runtime in startups:
        for event in (
            eventlog.model_event(eventlog.ROLE_CHAT, model),
            eventlog.WorkloadEvent(eventlog.EVENT_RUNTIME, runtime_bytes(runtime)),
        ):
            records.append(eventlog.EventRecord(len(records), pcr, event.digest(), event))
    return records


def renumber(records: list[eventlog.EventRecord]) -> list[eventlog.EventRecord]:
    return [replace(r, recnum=i) for i, r in enumerate(records)]


# --- whole scenarios ----------------------------------------------------------------------

SELECTION = [0, 1, 2, 3, 4, 5, 6, 7, 14, 15]
PRODUCTION_SELECTION = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15]
"""Covers every PCR a production policy must pin (firmware, boot loader, kernel, initrd,
command line: encloud.protocol.policy.BOOT_PCRS)."""
WORKLOAD_PCR = 15
NONCE_Q = hashlib.sha256(b"qualifying data").digest()
TTL = 600


def static_pcr_value(index: int) -> bytes:
    return hashlib.sha256(b"pcr %d" % index).digest()


@dataclass
class Scenario:
    """A valid quote and everything needed to break it one piece at a time."""

    key: Any
    ak_public: bytes
    records: list[eventlog.EventRecord]
    pcr_values: dict[int, bytes]
    policy: Policy
    sig_hash: int = SHA256
    sig_scheme: int | None = None
    extra_data: bytes = NONCE_Q
    attest_overrides: dict[str, Any] = field(default_factory=dict)

    def attest(self) -> bytes:
        values = b"".join(self.pcr_values[i] for i in sorted(self.pcr_values))
        args: dict[str, Any] = {
            "signer": name_of(self.ak_public),
            "extra_data": self.extra_data,
            "banks": [(SHA256, sorted(self.pcr_values))],
            "pcr_digest": h(self.sig_hash, values),
        }
        args.update(self.attest_overrides)
        return quote_attest(**args)

    def evidence(self, **overrides: Any) -> Evidence:
        attest = overrides.pop("quote_attest", None) or self.attest()
        signature = sign(self.key, attest, hash_alg=self.sig_hash, scheme=self.sig_scheme)
        fields: dict[str, Any] = {
            "quote_attest": attest,
            "quote_signature": signature,
            "ak_public": self.ak_public,
            "pcr_values": dict(self.pcr_values),
            "workload_event_log": eventlog.serialize(self.records),
        }
        fields.update(overrides)
        return Evidence(**fields)


def spki(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_scenario(
    key: Any = None,
    *,
    ak_public: bytes | None = None,
    sig_hash: int = SHA256,
    sig_scheme: int | None = None,
    startups: list[tuple[bytes, dict[str, Any]]] | None = None,
    selection: list[int] = SELECTION,
) -> Scenario:
    key = key or ec.generate_private_key(ec.SECP256R1())
    if ak_public is None:
        ak_public = (
            ecc_public(key, scheme_hash=sig_hash)
            if isinstance(key, ec.EllipticCurvePrivateKey)
            else rsa_public(key, scheme=sig_scheme or RSASSA, scheme_hash=sig_hash)
        )
    records = event_records(startups or [(MODEL_DIGEST, RUNTIME_EVENT)], WORKLOAD_PCR)
    pcr_values = {i: static_pcr_value(i) for i in selection}
    pcr_values[WORKLOAD_PCR] = eventlog.replay(records)
    policy = build_policy(
        pcr_selection=selection,
        pcr_values={0: pcr_values[0], 7: pcr_values[7]},
        workload_pcr=WORKLOAD_PCR,
        allowed_model_digests=[MODEL_DIGEST],
        allowed_runtime_events=[hashlib.sha256(runtime_bytes(RUNTIME_EVENT)).digest()],
        pinned_public_keys=[spki(key)],
        max_session_ttl_seconds=3600,
    )
    return Scenario(key, ak_public, records, pcr_values, policy, sig_hash, sig_scheme)


# --- AK certificate chains --------------------------------------------------------------------


def certificate(
    subject: str,
    public_key: Any,
    issuer: str,
    issuer_key: Any,
    *,
    ca: bool,
    not_after_days: int = 365,
    not_before_days: int = -1,
) -> bytes:
    """A DER certificate; CA certificates carry the extensions Web PKI path validation needs."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=not_before_days))
        .not_valid_after(now + datetime.timedelta(days=not_after_days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class CertificateChain:
    root: bytes
    chain: tuple[bytes, ...]
    """Leaf (the AK) first, then the intermediate."""


def ak_certificate_chain(ak_key: Any, **leaf_kwargs: Any) -> CertificateChain:
    """Root CA -> intermediate CA -> AK leaf, all with fresh P-256 CA keys."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    root = certificate("Test vTPM Root", root_key.public_key(), "Test vTPM Root", root_key, ca=True)
    intermediate = certificate(
        "Test vTPM Intermediate",
        intermediate_key.public_key(),
        "Test vTPM Root",
        root_key,
        ca=True,
    )
    leaf = certificate(
        "Test AK",
        ak_key.public_key(),
        "Test vTPM Intermediate",
        intermediate_key,
        ca=False,
        **leaf_kwargs,
    )
    return CertificateChain(root, (leaf, intermediate))
