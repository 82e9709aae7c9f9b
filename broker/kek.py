"""The key-encryption key (KEK): every data key and Sentinel's own import key are stored
only wrapped under it, so the database alone never yields a key.

The KEK is a file of 32 random bytes (raw, or 64 hex digits) that only its owner may read;
Sentinel refuses to start without it, with a wider mode, or with a KEK other than the one the
database was first wrapped under (a check value in the database tells).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encloud.broker.store import Store
from encloud.protocol.encoding import encode, u32
from encloud.protocol.sealed_file import read_key_file

KEK_LENGTH = 32
WRAP_NONCE_LENGTH = 12


class KekError(RuntimeError):
    """The KEK file is missing, too open, malformed, or not this database's."""


class UnwrapError(RuntimeError):
    """A wrapped key did not open: the database row was altered or belongs elsewhere."""


def create_kek_file(path: Path) -> None:
    """Write a fresh KEK with mode 0600; never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KekError(f"{path} exists already: a KEK is never overwritten") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(KEK_LENGTH))


def load_kek(path: Path) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KekError(
            f"the KEK file {path} is missing (create one with `encloud sentinel init`)"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise KekError(f"the KEK file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise KekError(
            f"the KEK file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o});"
            " chmod 600 it"
        )
    try:
        return read_key_file(path.read_bytes())
    except ValueError:
        raise KekError(
            f"the KEK file {path} does not hold 32 bytes (raw or 64 hex digits)"
        ) from None


class KeyWrapper:
    """AES-256-GCM under the KEK; each wrapped value's associated data names what it is, so
    a row copied to another key id, version or purpose does not unwrap."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != KEK_LENGTH:
            raise KekError("a KEK is 32 bytes")
        self._aead = AESGCM(kek)
        self._check = hmac.digest(kek, b"encloud/v1 sentinel kek check", "sha256")

    @property
    def check_value(self) -> str:
        """Hex HMAC of a fixed label: tells whether a database was wrapped under this KEK,
        without revealing it."""
        return hashlib.sha256(self._check).hexdigest()

    def wrap(self, secret: bytes | bytearray, *names: bytes) -> bytes:
        nonce = os.urandom(WRAP_NONCE_LENGTH)
        return nonce + self._aead.encrypt(nonce, bytes(secret), _ad(names))

    def unwrap(self, wrapped: bytes, *names: bytes) -> bytearray:
        nonce, body = wrapped[:WRAP_NONCE_LENGTH], wrapped[WRAP_NONCE_LENGTH:]
        try:
            return bytearray(self._aead.decrypt(nonce, body, _ad(names)))
        except (InvalidTag, ValueError):
            raise UnwrapError("a wrapped key did not open under this KEK") from None


def _ad(names: tuple[bytes, ...]) -> bytes:
    return encode("encloud/v1 sentinel wrap", *names)


def rotate_kek(store: Store, old: KeyWrapper, new: KeyWrapper) -> int:
    """Rewrap every stored key (and Sentinel's import key) from `old` to `new` in one
    transaction (store.rewrap_all); each clear key is zeroed once rewrapped. Returns how many
    key versions were rewrapped."""

    def rewrap(wrapped: bytes, name: bytes, version: int) -> bytes:
        names = (name,) if version < 0 else (name, u32(version))
        key = old.unwrap(wrapped, *names)
        try:
            return new.wrap(key, *names)
        finally:
            key[:] = bytes(len(key))

    return store.rewrap_all(rewrap, old.check_value, new.check_value)
