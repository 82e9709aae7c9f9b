"""The sealed envelope of protocol v1: AES-256-GCM with typed associated data.

A sealed message is nonce (12) || ciphertext || tag (16). The type, request id
and seq travel in clear beside it; the receiver rebuilds the associated data
E("encloud/v2 aead", type_u8, session_id, request_id_u64, seq_u32) from the
values it expects, so a message cannot be replayed into another session,
request, position, direction or role. Plaintexts are padded to a bucket so
that sizes leak less (docs/PROTOCOL.md).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encloud.protocol.encoding import encode, sha256, u8, u32, u64
from encloud.protocol.errors import DecryptError, HeaderMismatchError, KeyExhaustedError

NONCE_LENGTH = 12
TAG_LENGTH = 16
MAX_MESSAGES_PER_KEY = 2**28
"""Random 96-bit nonces: 2^28 messages keep the collision chance far below 2^-40."""


class MessageType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    FRAME = 3
    FINAL = 4
    END = 5
    KEY_CONFIRM = 6
    EMBED_REQUEST = 7
    EMBED_RESPONSE = 8


PAD_BUCKETS = {
    MessageType.FRAME: 64,
    MessageType.FINAL: 128,
    MessageType.KEY_CONFIRM: 128,
    MessageType.REQUEST: 1024,
    MessageType.RESPONSE: 1024,
    MessageType.END: 1024,
    MessageType.EMBED_REQUEST: 1024,
    MessageType.EMBED_RESPONSE: 1024,
}


@dataclass(frozen=True)
class Sealed:
    """A sealed message with its clear header, as it travels on the wire."""

    type: int
    request_id: int
    seq: int
    data: bytes


def associated_data(message_type: int, session_id: bytes, request_id: int, seq: int) -> bytes:
    return encode("encloud/v2 aead", u8(message_type), session_id, u64(request_id), u32(seq))


def padded_length(payload_length: int, bucket: int) -> int:
    """The smallest positive multiple of bucket that holds u32 length || payload."""
    return max(bucket, -(-(4 + payload_length) // bucket) * bucket)


def pad(payload: bytes, bucket: int) -> bytes:
    """u32 length || payload || zeros, to the smallest positive multiple of bucket."""
    body = struct.pack(">I", len(payload)) + payload
    return body + bytes(padded_length(len(payload), bucket) - len(body))


def unpad(padded: bytes, bucket: int) -> bytes:
    """Inverse of pad(); any other length or a nonzero pad byte is refused."""
    if len(padded) < 4:
        raise DecryptError("sealed message rejected")
    (length,) = struct.unpack(">I", padded[:4])
    if 4 + length > len(padded) or len(padded) != padded_length(length, bucket):
        raise DecryptError("sealed message rejected")
    if any(padded[4 + length :]):
        raise DecryptError("sealed message rejected")
    return padded[4 : 4 + length]


class SealingKey:
    """Seals one direction's messages and counts them against the key's budget.

    The last message of the budget is kept back: only a message sealed with
    `reserved=True` (a stream's final frame) may use it.
    """

    def __init__(self, key: bytearray, session_id: bytes) -> None:
        self._key = key
        self._aead = AESGCM(bytes(key))
        self._session_id = session_id
        self.sealed_count = 0

    @property
    def remaining(self) -> int:
        return MAX_MESSAGES_PER_KEY - self.sealed_count

    def seal(
        self,
        message_type: MessageType,
        request_id: int,
        seq: int,
        payload: bytes,
        *,
        reserved: bool = False,
    ) -> Sealed:
        limit = MAX_MESSAGES_PER_KEY if reserved else MAX_MESSAGES_PER_KEY - 1
        if self.sealed_count >= limit:
            raise KeyExhaustedError("session key reached its message budget")
        self.sealed_count += 1
        nonce = os.urandom(NONCE_LENGTH)
        aad = associated_data(message_type, self._session_id, request_id, seq)
        ciphertext = self._aead.encrypt(nonce, pad(payload, PAD_BUCKETS[message_type]), aad)
        return Sealed(int(message_type), request_id, seq, nonce + ciphertext)

    def wipe(self) -> None:
        self._key[:] = bytes(len(self._key))
        self._aead = None  # type: ignore[assignment]


class OpeningKey:
    """Opens one direction's messages, checking the clear header first."""

    def __init__(self, key: bytearray, session_id: bytes) -> None:
        self._key = key
        self._aead = AESGCM(bytes(key))
        self._session_id = session_id

    def open(self, sealed: Sealed, expected_type: MessageType, request_id: int, seq: int) -> bytes:
        """Return the unpadded payload, or raise; never returns partial plaintext."""
        if (sealed.type, sealed.request_id, sealed.seq) != (int(expected_type), request_id, seq):
            raise HeaderMismatchError("sealed message header is not the expected one")
        return self.open_unchecked_header(sealed)

    def open_unchecked_header(self, sealed: Sealed) -> bytes:
        """Open with the associated data built from the message's own header.

        For the server, which learns the request id from the header; the type
        is still bound by the tag, so a message cannot change its role.
        """
        if sealed.type not in PAD_BUCKETS or len(sealed.data) < NONCE_LENGTH + TAG_LENGTH:
            raise DecryptError("sealed message rejected")
        aad = associated_data(sealed.type, self._session_id, sealed.request_id, sealed.seq)
        nonce, ciphertext = sealed.data[:NONCE_LENGTH], sealed.data[NONCE_LENGTH:]
        try:
            padded = self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptError("sealed message rejected") from None
        return unpad(padded, PAD_BUCKETS[MessageType(sealed.type)])

    def wipe(self) -> None:
        self._key[:] = bytes(len(self._key))
        self._aead = None  # type: ignore[assignment]


def transcript_start(session_id: bytes, request_id: int, sealed_request: bytes) -> bytes:
    """T_0 = H(E("encloud/v2 transcript", session_id, request_id_u64, H(sealed request)))."""
    return sha256(
        encode("encloud/v2 transcript", session_id, u64(request_id), sha256(sealed_request))
    )


def transcript_next(transcript: bytes, seq: int, payload: bytes) -> bytes:
    """T_(s+1) = H(T_s || u32(s) || u32(len) || payload_s), payload unpadded."""
    return sha256(transcript + u32(seq) + u32(len(payload)) + payload)
