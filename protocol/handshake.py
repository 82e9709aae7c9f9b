"""Protocol v2 handshake: client commitment, qualifying data, key release and traffic keys.

All constructions follow docs/PROTOCOL.md; every structured input goes through
the canonical encoding E() of encloud.protocol.encoding.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import sys
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem
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
"""X25519, HKDF-SHA256, AES-256-GCM: protocol v1's one suite, still in v2."""
SUITE_XWING = HpkeSuiteId(kem_id=0x647A, kdf_id=0x0001, aead_id=0x0002)
"""X-Wing (ML-KEM-768 + X25519), HKDF-SHA256, AES-256-GCM: the post-quantum hybrid."""
SUITE_NAMES = {"mlkem768-x25519": SUITE_XWING, "x25519": SUITE_V1}
"""Names a policy lists its accepted suites by (`hpke_suites`)."""
DEFAULT_SUITES = ("mlkem768-x25519", "x25519")
"""A policy without `hpke_suites` accepts both, the hybrid first."""
MLKEM768_PUBLIC_LENGTH = 1184
X25519_LENGTH = 32


@dataclass(frozen=True)
class _SuiteSpec:
    hpke: hpke.Suite
    enc_length: int
    public_length: int


_SUPPORTED_SUITES = {
    SUITE_V1: _SuiteSpec(
        hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM), 32, 32
    ),
    SUITE_XWING: _SuiteSpec(
        hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
        1120,
        MLKEM768_PUBLIC_LENGTH + X25519_LENGTH,
    ),
}


def is_supported(suite: HpkeSuiteId) -> bool:
    return suite in _SUPPORTED_SUITES


def suite_name(suite: HpkeSuiteId) -> str:
    return next((n for n, s in SUITE_NAMES.items() if s == suite), f"0x{suite.kem_id:04x}")


def _spec(suite: HpkeSuiteId) -> _SuiteSpec:
    try:
        return _SUPPORTED_SUITES[suite]
    except KeyError:
        raise KeyOpenError("unsupported HPKE suite") from None


def _hpke(suite: HpkeSuiteId) -> tuple[hpke.Suite, int]:
    spec = _spec(suite)
    return spec.hpke, spec.enc_length


def session_public_key_length(suite: HpkeSuiteId) -> int:
    """Bytes of a session public key of `suite` (32 for X25519, 1216 for X-Wing)."""
    return _spec(suite).public_length


def generate_session_key(suite: HpkeSuiteId) -> tuple[Any, bytes]:
    """A fresh session key pair for `suite`: (private key, raw session_pub). For X-Wing,
    session_pub is the ML-KEM-768 public key (1,184 bytes) then the X25519 one (32)."""
    if suite == SUITE_XWING:
        kem_key, dh_key = mlkem.MLKEM768PrivateKey.generate(), X25519PrivateKey.generate()
        public = kem_key.public_key().public_bytes_raw() + dh_key.public_key().public_bytes_raw()
        return hpke.MLKEM768X25519PrivateKey(kem_key, dh_key), public
    _spec(suite)
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw()


def xwing_private_key(seed: bytes) -> Any:
    """An X-Wing private key from its 32-byte seed, expanded with SHAKE256 as the X-Wing
    draft (and npm @hpke/hybridkem-x-wing) do: ML-KEM-768 seed d || z, then the X25519 key."""
    if len(seed) != 32:
        raise ValueError("an X-Wing private key is a 32-byte seed")
    expanded = hashlib.shake_256(seed).digest(96)
    return hpke.MLKEM768X25519PrivateKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
        X25519PrivateKey.from_private_bytes(expanded[64:]),
    )


def xwing_public_key(seed: bytes) -> bytes:
    """The raw X-Wing public key (ML-KEM-768's then X25519's) of `xwing_private_key(seed)`."""
    if len(seed) != 32:
        raise ValueError("an X-Wing private key is a 32-byte seed")
    expanded = hashlib.shake_256(seed).digest(96)
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    dh = X25519PrivateKey.from_private_bytes(expanded[64:])
    return kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw()


def _recipient(suite: HpkeSuiteId, session_pub: bytes) -> Any:
    spec = _spec(suite)
    if len(session_pub) != spec.public_length:
        raise ValueError(f"a session public key of this suite is {spec.public_length} bytes")
    if suite == SUITE_XWING:
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(session_pub[:MLKEM768_PUBLIC_LENGTH]),
            X25519PublicKey.from_public_bytes(session_pub[MLKEM768_PUBLIC_LENGTH:]),
        )
    return X25519PublicKey.from_public_bytes(session_pub)


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


def sentinel_qualifying_data(
    suite: HpkeSuiteId, nonce: bytes, order_digest: bytes, hpke_public_key: bytes
) -> bytes:
    """Q_s = H(E("encloud/v2 sentinel", suite, nonce, order digest, HPKE public key)): what a
    workload's quote binds when it asks Sentinel for a key (the key broker's own label, so a
    session quote never satisfies Sentinel and a Sentinel quote never opens a session)."""
    return sha256(
        encode("encloud/v2 sentinel", suite.encoded(), nonce, order_digest, hpke_public_key)
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
    recipient = _recipient(suite, session_pub)
    plaintext = bytearray(dek) + bytearray(session_secret) + bytearray(client_secret)
    try:
        return hpke_suite.encrypt(bytes(plaintext), recipient, info=info)
    finally:
        plaintext[:] = bytes(len(plaintext))


def hpke_seal(suite: HpkeSuiteId, public_key: bytes, plaintext: bytes, info: bytes) -> bytes:
    """HPKE base-mode single-shot seal to a raw public key of `suite`: enc || ciphertext."""
    hpke_suite, _ = _hpke(suite)
    return hpke_suite.encrypt(plaintext, _recipient(suite, public_key), info=info)


def hpke_open(suite: HpkeSuiteId, private_key: Any, sealed: bytes, info: bytes) -> bytearray:
    """Open an `hpke_seal`ed message. Any failure is one KeyOpenError."""
    hpke_suite, _ = _hpke(suite)
    split_enc(suite, sealed)
    try:
        plaintext = hpke_suite.decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError):
        raise KeyOpenError("sealed key did not open") from None
    opened = bytearray(plaintext)
    scrub(plaintext)
    return opened


def scrub(data: bytes) -> None:
    """Overwrite the bytes object's own buffer with zeros (CPython), for a key that arrives
    as immutable bytes from a library: freed, its memory would keep the key. Only for a
    bytes object this code alone refers to (a fresh result); never for a shared or cached one.
    """
    if len(data) < 2 or sys.implementation.name != "cpython":
        return  # the empty and one-byte objects are shared singletons
    offset = sys.getsizeof(b"") - 1  # the header before ob_sval
    ctypes.memset(id(data) + offset, 0, len(data))


def split_enc(suite: HpkeSuiteId, sealed_key: bytes) -> bytes:
    """The HPKE encapsulated key at the front of a sealed key."""
    _, enc_length = _hpke(suite)
    if len(sealed_key) <= enc_length:
        raise KeyOpenError("sealed key is too short")
    return sealed_key[:enc_length]


def open_key(
    suite: HpkeSuiteId, private_key: Any, sealed_key: bytes, info: bytes
) -> tuple[bytearray, bytearray, bytearray]:
    """Open a sealed DEK || S || client_secret. Any failure is one KeyOpenError."""
    hpke_suite, _ = _hpke(suite)
    split_enc(suite, sealed_key)
    try:
        opened = hpke_suite.decrypt(sealed_key, private_key, info=info)
    except (InvalidTag, ValueError):
        raise KeyOpenError("sealed key did not open") from None
    plaintext = bytearray(opened)
    scrub(opened)
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
