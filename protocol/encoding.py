"""The canonical encoding E(label, f1, f2, ...) of protocol v1.

Every structured input to a hash, a KDF or an AEAD (qualifying data, HPKE
info, handshake hash, associated data, transcript start, events, audit
checkpoints) is encoded this one way, so that no two different inputs can
produce the same bytes: the label's ASCII bytes, a zero byte, then each field
as a 2-byte big-endian length followed by its bytes.
"""

from __future__ import annotations

import hashlib
import struct

MAX_FIELD_LENGTH = 0xFFFF


def encode(label: str, *fields: bytes) -> bytes:
    """Return E(label, *fields). A field over 65535 bytes is an error."""
    parts = [label.encode("ascii"), b"\x00"]
    for field in fields:
        if len(field) > MAX_FIELD_LENGTH:
            raise ValueError(f"field of {len(field)} bytes exceeds {MAX_FIELD_LENGTH}")
        parts.append(struct.pack(">H", len(field)))
        parts.append(field)
    return b"".join(parts)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def u8(value: int) -> bytes:
    return struct.pack(">B", value)


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)
