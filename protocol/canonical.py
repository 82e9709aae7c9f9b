"""JSON as the protocol reads and writes it: one strict loader, one RFC 8785 writer.

Two canonical JSON forms exist, each implemented once: RFC 8785 (here, through PyPI
`rfc8785`, which gives the same bytes as our earlier writer on every value we store) for
the audit log and policy digests, and the event-log form (encloud.protocol.eventlog),
which is measured into the workload PCR and so stays byte for byte what it was.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

MAX_SAFE_INTEGER = 2**53 - 1


def strict_loads(data: bytes | str, *, allow_floats: bool = True) -> Any:
    """Parse JSON strictly: UTF-8, no duplicate keys, no NaN or Infinity, and (unless
    `allow_floats`) no fractional numbers. ValueError (or RecursionError) on anything else;
    callers turn it into their own typed error."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(
        text,
        object_pairs_hook=_no_duplicates,
        parse_constant=_reject("NaN and Infinity are"),
        parse_float=float if allow_floats else _reject("fractional numbers are"),
    )


def rfc8785_dumps(value: Any) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) bytes of `value`: sorted keys by UTF-16
    code units, no whitespace, UTF-8. Integers must stay within +-(2^53 - 1)."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as err:
        raise ValueError(str(err)) from err


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject(what: str) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"{what} not allowed ({token})")

    return refuse
