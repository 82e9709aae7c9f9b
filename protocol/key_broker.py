"""Sentinel's wire rules (docs/PROTOCOL.md, "Sentinel"): key ids and their owners, and the
HPKE constructions that carry a data key to Sentinel (import) and from it (release).

    import:  HPKE(Sentinel's import key, K, info = E("encloud/v1 sentinel import", key_id,
                  u32(version)))
    release: HPKE(workload key, K_v, info = E("encloud/v1 sentinel release", suite, nonce,
                  order digest, key_id, u32(version)))

The infos bind each sealed key to where it may be opened: an import sealed for one key id or
version does not open as another; a release sealed for one request (nonce, order) or version
does not open as another. The workload's quote binds the release request with
handshake.sentinel_qualifying_data (its own label, so no session quote satisfies Sentinel).
"""

from __future__ import annotations

import re
from typing import Any

from encloud.protocol.encoding import encode, u32
from encloud.protocol.handshake import (
    SUITE_XWING,
    HpkeSuiteId,
    KeyOpenError,
    hpke_open,
    hpke_seal,
)
from encloud.protocol.sealed_file import KEY_LENGTH, check_key_id

IMPORT_SUITE = SUITE_XWING
"""Sentinel's import key is X-Wing: a data key in transit is protected post-quantum."""
NONCE_LENGTH = 32
OWNER_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def check_owner_name(name: str) -> str:
    """An owner name: 1 to 63 of a-z 0-9 _ . - starting with a letter or digit."""
    if not isinstance(name, str) or not OWNER_PATTERN.fullmatch(name):
        raise ValueError("an owner name is 1 to 63 of a-z 0-9 _ . -, starting with a-z or 0-9")
    return name


def owner_of(key_id: str) -> str:
    """The owner a key id belongs to: its part before the first "/" ("" if none)."""
    check_key_id(key_id)
    owner, slash, name = key_id.partition("/")
    return owner if slash and name and OWNER_PATTERN.fullmatch(owner) else ""


def import_info(key_id: str, version: int) -> bytes:
    return encode("encloud/v1 sentinel import", check_key_id(key_id).encode(), u32(version))


def release_info(
    suite: HpkeSuiteId, nonce: bytes, order_digest: bytes, key_id: str, version: int
) -> bytes:
    return encode(
        "encloud/v1 sentinel release",
        suite.encoded(),
        nonce,
        order_digest,
        check_key_id(key_id).encode(),
        u32(version),
    )


def seal_data_key(
    suite: HpkeSuiteId, public_key: bytes, key: bytes | bytearray, info: bytes
) -> bytes:
    if len(key) != KEY_LENGTH:
        raise ValueError("a data key is 32 bytes (AES-256)")
    return hpke_seal(suite, public_key, bytes(key), info)


def open_data_key(suite: HpkeSuiteId, private_key: Any, sealed: bytes, info: bytes) -> bytearray:
    """The 32-byte key inside `sealed`; KeyOpenError for any failure, a wrong length included."""
    key = hpke_open(suite, private_key, sealed, info)
    if len(key) != KEY_LENGTH:
        key[:] = bytes(len(key))
        raise KeyOpenError("a sealed data key holds 32 bytes")
    return key
