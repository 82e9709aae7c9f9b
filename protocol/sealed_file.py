"""Sealed files: AES-256-GCM data at rest as a streaming AEAD (docs/PROTOCOL.md, "Sealed files").

A sealed file is a short encloud header naming the format version and the key id, then a
ciphertext in Tink's AES-GCM-HKDF streaming format (AES256_GCM_HKDF_1MB), whose associated
data is that header:

    sealed  = header || tink
    header  = "ENCLSEAL" || u8(version = 1) || u8(len(key_id)) || key_id        (ASCII)
    tink    = u8(40) || salt (32) || nonce_prefix (7) || segment_0 || ... || segment_n
    K_file  = HKDF-SHA256(ikm = K, salt = salt, info = header, 32 bytes)
    segment_i = AES-256-GCM(K_file, nonce_prefix || u32be(i) || u8(i == n), plaintext_i)

Plaintext segments are 1 MiB - 16 bytes (the first 40 bytes shorter, for Tink's header), the
last one shorter or empty. Every segment is bound to the file (the salt picks K_file), to the
header (the key id and version are K_file's HKDF info), to its position (the counter) and to
being last or not (the flag), so a reordered, dropped, truncated, spliced or cross-file
segment does not open. A Tink StreamingAead (Go, Java, C++, Python) opens the part after the
header with the same key and the header as associated data; tests/test_sealed_file.py checks
both directions with the PyPI `tink` package.

Memory stays at about two segments whatever the file's size.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encloud.protocol.errors import EncloudError

MAGIC = b"ENCLSEAL"
VERSION = 1
KEY_LENGTH = 32
SEGMENT_SIZE = 1 << 20
"""Ciphertext bytes per segment (Tink's AES256_GCM_HKDF_1MB)."""
TAG_LENGTH = 16
NONCE_PREFIX_LENGTH = 7
TINK_HEADER_LENGTH = 1 + KEY_LENGTH + NONCE_PREFIX_LENGTH  # 40
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


class SealedFileError(EncloudError):
    """A sealed file that does not open: its header, its key or one of its segments."""


class SealedFileFormatError(SealedFileError):
    """Not a sealed file of a version this client reads (magic, version, header lengths)."""


class SealedFileKeyIdError(SealedFileError):
    """The file names another key id than the one the caller opens it with."""


class SealedFileDecryptError(SealedFileError):
    """A segment failed authentication: tampered, reordered, dropped, truncated or spliced
    (one error whatever the cause; no plaintext of that segment is returned)."""


@dataclass(frozen=True)
class SealedHeader:
    key_id: str
    version: int = VERSION

    def encode(self) -> bytes:
        key_id = check_key_id(self.key_id).encode("ascii")
        return MAGIC + bytes([self.version, len(key_id)]) + key_id


def check_key_id(key_id: str) -> str:
    """A key id: 1 to 128 of A-Z a-z 0-9 . _ : / - (ValueError otherwise)."""
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError("a key id is 1 to 128 characters of A-Z a-z 0-9 . _ : / -")
    return key_id


def _file_key(key: bytes | bytearray, salt: bytes, header: bytes) -> AESGCM:
    if len(key) != KEY_LENGTH:
        raise ValueError("a sealed-file key is 32 bytes (AES-256)")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LENGTH, salt=salt, info=header)
    # The key goes in as it is (a bytearray the caller wipes), never copied into bytes.
    return AESGCM(hkdf.derive(key))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 1 << 32:
        raise SealedFileFormatError("a sealed file has at most 2^32 segments")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _plaintext_sizes() -> Iterator[int]:
    yield SEGMENT_SIZE - TINK_HEADER_LENGTH - TAG_LENGTH
    while True:
        yield SEGMENT_SIZE - TAG_LENGTH


def seal_stream(
    source: BinaryIO,
    sink: BinaryIO,
    key: bytes | bytearray,
    key_id: str,
    *,
    salt: bytes | None = None,
    nonce_prefix: bytes | None = None,
) -> int:
    """Seal `source` into `sink` under `key` (32 bytes) and `key_id`; returns the plaintext
    length. `salt` and `nonce_prefix` are drawn at random (the test vectors fix them)."""
    header = SealedHeader(key_id).encode()
    salt = os.urandom(KEY_LENGTH) if salt is None else salt
    prefix = os.urandom(NONCE_PREFIX_LENGTH) if nonce_prefix is None else nonce_prefix
    if len(salt) != KEY_LENGTH or len(prefix) != NONCE_PREFIX_LENGTH:
        raise ValueError("the salt is 32 bytes and the nonce prefix 7")
    aead = _file_key(key, salt, header)
    sink.write(header + bytes([TINK_HEADER_LENGTH]) + salt + prefix)
    sizes = _plaintext_sizes()
    total = 0
    index = 0
    chunk = _read_exactly(source, next(sizes))
    while True:
        following = _read_exactly(source, next(sizes))
        last = not following
        sink.write(aead.encrypt(_nonce(prefix, index, last), chunk, None))
        total += len(chunk)
        if last:
            return total
        chunk, index = following, index + 1


def read_header(source: BinaryIO) -> SealedHeader:
    """The encloud header at the start of `source` (SealedFileFormatError if it is not one)."""
    fixed = _read_exactly(source, len(MAGIC) + 2)
    if len(fixed) < len(MAGIC) + 2 or fixed[: len(MAGIC)] != MAGIC:
        raise SealedFileFormatError("not an encloud sealed file")
    version, length = fixed[len(MAGIC)], fixed[len(MAGIC) + 1]
    if version != VERSION:
        raise SealedFileFormatError(f"sealed-file version {version} is not one this client reads")
    raw = _read_exactly(source, length)
    try:
        key_id = check_key_id(raw.decode("ascii")) if len(raw) == length else ""
    except (UnicodeDecodeError, ValueError):
        key_id = ""
    if not key_id:
        raise SealedFileFormatError("the sealed file's key id is malformed")
    return SealedHeader(key_id, version)


def open_stream(
    source: BinaryIO,
    sink: BinaryIO,
    key: bytes | bytearray,
    *,
    expected_key_id: str | None = None,
) -> SealedHeader:
    """Open a sealed file from `source` into `sink`, segment by segment. The plaintext of a
    segment is written only once it authenticated; a file cut short raises at its end, so a
    caller that must never act on a prefix writes to a temporary file and keeps it only when
    this returns (encloud open does)."""
    opened = OpenedStream(source, key, expected_key_id=expected_key_id)
    for plaintext in opened:
        sink.write(plaintext)
    return opened.header


class OpenedStream:
    """A sealed file's plaintext, one authenticated segment at a time (iterate it): the
    header is read when it is made (SealedFileFormatError, SealedFileKeyIdError), a segment
    that fails raises SealedFileDecryptError when it is reached, and a file cut short raises
    at its end. Memory: about two segments."""

    def __init__(
        self, source: BinaryIO, key: bytes | bytearray, *, expected_key_id: str | None = None
    ) -> None:
        self.header = read_header(source)
        if expected_key_id is not None and self.header.key_id != expected_key_id:
            raise SealedFileKeyIdError(
                f"the file is sealed under key id {self.header.key_id!r}, not {expected_key_id!r}"
            )
        tink_header = _read_exactly(source, TINK_HEADER_LENGTH)
        if len(tink_header) != TINK_HEADER_LENGTH or tink_header[0] != TINK_HEADER_LENGTH:
            raise SealedFileFormatError("the sealed file's segment header is malformed")
        self._salt, self._prefix = tink_header[1 : 1 + KEY_LENGTH], tink_header[1 + KEY_LENGTH :]
        self._source = source
        self._aead = _file_key(key, self._salt, self.header.encode())

    def __iter__(self) -> Iterator[bytes]:
        source, aead, prefix = self._source, self._aead, self._prefix
        sizes = (size + TAG_LENGTH for size in _plaintext_sizes())
        index = 0
        segment = _read_exactly(source, next(sizes))
        while True:
            following = _read_exactly(source, next(sizes))
            last = not following
            if len(segment) < TAG_LENGTH:
                raise SealedFileDecryptError("the sealed file does not open (segment too short)")
            try:
                plaintext = aead.decrypt(_nonce(prefix, index, last), segment, None)
            except InvalidTag:
                raise SealedFileDecryptError(
                    f"segment {index} of the sealed file does not open"
                ) from None
            yield plaintext
            if last:
                return
            segment, index = following, index + 1


class ChunkReader:
    """A binary reader over an iterator of byte chunks (read(n) as a file's), so that
    seal_stream can seal what a generator produces without holding it all."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buffer) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


def _read_exactly(source: BinaryIO, n: int) -> bytes:
    """Up to n bytes: fewer only at the end of the stream."""
    parts: list[bytes] = []
    left = n
    while left > 0:
        part = source.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_key_file(data: bytes) -> bytes:
    """A key file's 32-byte key: 32 raw bytes, or 64 hex digits (whitespace around allowed).
    32 bytes that are all hex digits or whitespace are refused: more likely a short hex key
    (128 bits) than 32 random bytes."""
    if len(data) == KEY_LENGTH:
        if re.fullmatch(rb"[0-9a-fA-F\s]*", data):
            raise ValueError("a 32-byte key file of hex digits: write the key as 64 hex digits")
        return data
    text = data.strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode("ascii"))
    raise ValueError("a key file holds 32 raw bytes or 64 hex digits")
