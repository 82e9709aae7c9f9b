"""Protocol v2 handshake: client commitment, qualifying data, key release and traffic keys.

All constructions follow docs/PROTOCOL.md; every structured input goes through
the canonical encoding E() of encloud.protocol.encoding.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from encloud.protocol.encoding import encode, sha256, u16, u32
from encloud.protocol.errors import EncloudError

DEK_LENGTH = 32
SESSION_SECRET_LENGTH = 32
CLIENT_SECRET_LENGTH = 32
COMMITMENT_LENGTH = 32
SEALED_PLAINTEXT_LENGTH = DEK_LENGTH + SESSION_SECRET_LENGTH + CLIENT_SECRET_LENGTH
SESSION_ID_LENGTH = 16
MIN_NONCE_LENGTH = 32
MAX_NONCE_LENGTH = 64


class KeyOpenError(EncloudError):
    """The sealed key did not open: wrong recipient, wrong info, or tampered."""


@dataclass(frozen=True)
class HpkeSuiteId:
    """An HPKE suite by its RFC 9180 algorithm identifiers."""

    kem_id: int
    kdf_id: int
    aead_id: int

    def encoded(self) -> bytes:
        """The 6-byte `suite` field: KEM, KDF and AEAD ids, 2 bytes each, big-endian."""
        return u16(self.kem_id) + u16(self.kdf_id) + u16(self.aead_id)


SUITE_V1 = HpkeSuiteId(kem_id=0x0020, kdf_id=0x0001, aead_id=0x0002)
"""X25519, HKDF-SHA256, AES-256-GCM: the one suite protocol v1 defines."""

_SUPPORTED_SUITES = {
    SUITE_V1: (
        hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
        32,  # length of enc
    ),
}


def is_supported(suite: HpkeSuiteId) -> bool:
    return suite in _SUPPORTED_SUITES


def _hpke(suite: HpkeSuiteId) -> tuple[hpke.Suite, int]:
    try:
        return _SUPPORTED_SUITES[suite]
    except KeyError:
        raise KeyOpenError("unsupported HPKE suite") from None


def client_commitment(client_secret: bytes | bytearray) -> bytes:
    """C = H(E("encloud/v2 client commitment", client_secret)): sent in the AttestRequest,
    opened inside the sealed key, so only the client that attested can bind its session."""
    if len(client_secret) != CLIENT_SECRET_LENGTH:
        raise ValueError("the client secret is 32 bytes")
    return sha256(encode("encloud/v2 client commitment", bytes(client_secret)))


def opens_commitment(commitment: bytes, client_secret: bytes | bytearray) -> bool:
    """Constant-time: does `client_secret` open `commitment`?"""
    if len(client_secret) != CLIENT_SECRET_LENGTH:
        return False
    return hmac.compare_digest(client_commitment(client_secret), commitment)


def quote_qualifying_data(
    suite: HpkeSuiteId,
    nonce: bytes,
    commitment: bytes,
    session_pub: bytes,
    session_id: bytes,
    ttl_seconds: int,
) -> bytes:
    """Q = H(E("encloud/v2 quote", suite, nonce, C, session_pub, session_id, ttl_u32))."""
    return sha256(
        encode(
            "encloud/v2 quote",
            suite.encoded(),
            nonce,
            commitment,
            session_pub,
            session_id,
            u32(ttl_seconds),
        )
    )


def release_info(suite: HpkeSuiteId, session_id: bytes, attest_digest: bytes) -> bytes:
    """info = E("encloud/v2 release", suite, session_id, H_ev)."""
    return encode("encloud/v2 release", suite.encoded(), session_id, attest_digest)


def handshake_hash(
    suite: HpkeSuiteId,
    nonce: bytes,
    session_pub: bytes,
    session_id: bytes,
    ttl_seconds: int,
    attest_digest: bytes,
    enc: bytes,
) -> bytes:
    """H_hs = H(E("encloud/v2 handshake", suite, nonce, session_pub, session_id, ttl_u32,
    H_ev, enc))."""
    return sha256(
        encode(
            "encloud/v2 handshake",
            suite.encoded(),
            nonce,
            session_pub,
            session_id,
            u32(ttl_seconds),
            attest_digest,
            enc,
        )
    )


class TrafficKeys:
    """The three 32-byte keys of a session. Held in bytearrays so wipe() can zero them."""

    __slots__ = ("c2s", "kc", "s2c")

    def __init__(self, c2s: bytes, s2c: bytes, kc: bytes) -> None:
        self.c2s = bytearray(c2s)
        self.s2c = bytearray(s2c)
        self.kc = bytearray(kc)

    def wipe(self) -> None:
        for key in (self.c2s, self.s2c, self.kc):
            key[:] = bytes(len(key))


def derive_traffic_keys(
    dek: bytes | bytearray, session_secret: bytes | bytearray, h_hs: bytes
) -> TrafficKeys:
    """PRK = HKDF-Extract(salt=H_hs, IKM=DEK || S); each key HKDF-Expand(PRK, label, 32)."""
    prk = bytearray(hmac.digest(h_hs, bytes(dek) + bytes(session_secret), "sha256"))
    try:
        keys = [
            HKDFExpand(hashes.SHA256(), 32, label).derive(bytes(prk))
            for label in (b"encloud/v2 c2s", b"encloud/v2 s2c", b"encloud/v2 kc")
        ]
    finally:
        prk[:] = bytes(len(prk))
    return TrafficKeys(*keys)


def new_dek() -> bytearray:
    return bytearray(os.urandom(DEK_LENGTH))


def seal_key(
    suite: HpkeSuiteId,
    session_pub: bytes,
    dek: bytes | bytearray,
    session_secret: bytes | bytearray,
    client_secret: bytes | bytearray,
    info: bytes,
) -> bytes:
    """HPKE base-mode seal of DEK || S || client_secret to the session key: enc || ciphertext."""
    if (
        len(dek) != DEK_LENGTH
        or len(session_secret) != SESSION_SECRET_LENGTH
        or len(client_secret) != CLIENT_SECRET_LENGTH
    ):
        raise ValueError("the DEK, the session secret and the client secret are 32 bytes each")
    hpke_suite, _ = _hpke(suite)
    recipient = X25519PublicKey.from_public_bytes(session_pub)
    plaintext = bytearray(dek) + bytearray(session_secret) + bytearray(client_secret)
    try:
        return hpke_suite.encrypt(bytes(plaintext), recipient, info=info)
    finally:
        plaintext[:] = bytes(len(plaintext))


def split_enc(suite: HpkeSuiteId, sealed_key: bytes) -> bytes:
    """The HPKE encapsulated key at the front of a sealed key."""
    _, enc_length = _hpke(suite)
    if len(sealed_key) <= enc_length:
        raise KeyOpenError("sealed key is too short")
    return sealed_key[:enc_length]


def open_key(
    suite: HpkeSuiteId, private_key: X25519PrivateKey, sealed_key: bytes, info: bytes
) -> tuple[bytearray, bytearray, bytearray]:
    """Open a sealed DEK || S || client_secret. Any failure is one KeyOpenError."""
    hpke_suite, _ = _hpke(suite)
    split_enc(suite, sealed_key)
    try:
        plaintext = bytearray(hpke_suite.decrypt(sealed_key, private_key, info=info))
    except (InvalidTag, ValueError):
        raise KeyOpenError("sealed key did not open") from None
    if len(plaintext) != SEALED_PLAINTEXT_LENGTH:
        plaintext[:] = bytes(len(plaintext))
        raise KeyOpenError("sealed key has the wrong length")
    s_end = DEK_LENGTH + SESSION_SECRET_LENGTH
    dek, secret, client_secret = (
        plaintext[:DEK_LENGTH],
        plaintext[DEK_LENGTH:s_end],
        plaintext[s_end:],
    )
    plaintext[:] = bytes(len(plaintext))
    return dek, secret, client_secret
