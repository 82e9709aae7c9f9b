"""Release orders: an owner's Ed25519-signed permission for Sentinel to release one key once,
for one model, until a time (docs/PROTOCOL.md, "Release orders").

    order  = {"expires_at": <unix seconds>, "key_id": "<key id>",
              "model_digest": "<64 hex>", "order_id": "<32 hex>", "version": 1}
    signed = {"order": order, "signature": "<base64 Ed25519 signature>"}
    signature = Ed25519(owner key, E("encloud/v1 release order", canonical(order)))
    digest    = SHA-256(E("encloud/v1 release order", canonical(order)))

Both objects are canonical JSON (RFC 8785, as the policy's canonical form). The digest is what
a workload binds into its quote (handshake.sentinel_qualifying_data). That an order is used
once is Sentinel's to enforce (its order_id); this module checks form, signature and expiry.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from encloud.protocol.canonical import strict_loads
from encloud.protocol.encoding import encode, sha256
from encloud.protocol.errors import (
    ReleaseOrderExpiredError,
    ReleaseOrderFormatError,
    ReleaseOrderSignatureError,
)
from encloud.protocol.sealed_file import check_key_id

ORDER_VERSION = 1
ORDER_LABEL = "encloud/v1 release order"
_KEYS = {"expires_at", "key_id", "model_digest", "order_id", "version"}


@dataclass(frozen=True)
class ReleaseOrder:
    key_id: str
    model_digest: bytes
    expires_at: int
    order_id: bytes

    def to_obj(self) -> dict[str, Any]:
        return {
            "expires_at": self.expires_at,
            "key_id": self.key_id,
            "model_digest": self.model_digest.hex(),
            "order_id": self.order_id.hex(),
            "version": ORDER_VERSION,
        }

    def signed_bytes(self) -> bytes:
        """What the owner signs: E(label, the order's canonical JSON)."""
        return encode(ORDER_LABEL, rfc8785.dumps(self.to_obj()))

    def digest(self) -> bytes:
        return sha256(self.signed_bytes())


def new_order(
    key_id: str, model_digest: bytes, ttl_seconds: int, now: float | None = None
) -> ReleaseOrder:
    """A fresh order (a random 16-byte order id) valid for `ttl_seconds` from `now`."""
    if len(model_digest) != 32 or ttl_seconds < 1:
        raise ValueError("an order names a 32-byte model digest and a positive lifetime")
    moment = time.time() if now is None else now
    return ReleaseOrder(
        check_key_id(key_id), model_digest, int(moment) + ttl_seconds, os.urandom(16)
    )


def sign_order(order: ReleaseOrder, owner_key: Ed25519PrivateKey) -> bytes:
    """The signed order as canonical JSON bytes."""
    signature = owner_key.sign(order.signed_bytes())
    return rfc8785.dumps(
        {"order": order.to_obj(), "signature": base64.b64encode(signature).decode("ascii")}
    )


def parse_signed(
    data: bytes, body: str, keys: set[str], what: str, version: int = ORDER_VERSION
) -> tuple[dict[str, Any], bytes]:
    """The body and the 64-byte signature of a signed document `{body: {...}, "signature":
    base64}` in canonical JSON (a release order, a job manifest) whose body has exactly `keys`
    and version `version`; ReleaseOrderFormatError naming what is wrong. The other fields are
    the caller's to check."""
    try:
        obj = strict_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ReleaseOrderFormatError(f"a {what} is not JSON") from err
    if not isinstance(obj, dict) or set(obj) != {body, "signature"}:
        raise ReleaseOrderFormatError(f"a signed {what} has exactly {body} and signature")
    raw, signature = obj[body], obj["signature"]
    if not isinstance(raw, dict) or set(raw) != keys:
        raise ReleaseOrderFormatError(f"a {what} has exactly the keys {sorted(keys)}")
    if raw["version"] != version or isinstance(raw["version"], bool):
        raise ReleaseOrderFormatError(f"{what} version {raw['version']!r} is not {version}")
    try:
        sig = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
    except (binascii.Error, ValueError):  # ValueError: a str with non-ASCII characters
        sig = b""
    if len(sig) != 64:
        raise ReleaseOrderFormatError("the signature is not base64 of 64 bytes")
    if rfc8785.dumps(obj) != data:
        raise ReleaseOrderFormatError(f"a signed {what} must be canonical JSON")
    return raw, sig


def parse_order(data: bytes) -> tuple[ReleaseOrder, bytes]:
    """(order, signature) of a signed order in canonical form; ReleaseOrderFormatError
    naming what is wrong otherwise. The signature is not checked here."""
    raw, sig = parse_signed(data, "order", _KEYS, "release order")
    order = ReleaseOrder(
        key_id=_key_id(raw["key_id"]),
        model_digest=hex_field(raw["model_digest"], 32, "model_digest"),
        expires_at=seconds_field(raw["expires_at"]),
        order_id=hex_field(raw["order_id"], 16, "order_id"),
    )
    return order, sig


def verify_order(data: bytes, owner_key: Ed25519PublicKey, *, now: float) -> ReleaseOrder:
    """The order, once its form, its owner's signature and its expiry all check."""
    order, signature = parse_order(data)
    try:
        owner_key.verify(signature, order.signed_bytes())
    except InvalidSignature:
        raise ReleaseOrderSignatureError("the release order is not signed by this owner") from None
    if now >= order.expires_at:
        raise ReleaseOrderExpiredError(f"the release order expired at {order.expires_at}")
    return order


def _key_id(value: object) -> str:
    try:
        return check_key_id(value)  # type: ignore[arg-type]
    except ValueError as err:
        raise ReleaseOrderFormatError(f"key_id: {err}") from None


def hex_field(value: object, size: int, field: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{2 * size}}}", value):
        raise ReleaseOrderFormatError(f"{field} is not {2 * size} lowercase hex digits")
    return bytes.fromhex(value)


def seconds_field(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**53:
        raise ReleaseOrderFormatError("expires_at is not a positive integer of seconds")
    return value
