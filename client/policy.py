"""The verification policy: the reference values a quote is checked against.

A policy is one JSON object, version 1. Every key below is required unless
marked optional; an unknown key, a duplicate key or a value of the wrong type
is refused with a PolicyError naming the field.

    {
      "version": 1,
      "dev_only": false,
      "pcr_bank": "sha256",
      "pcr_selection": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15],
      "pcr_values": {"0": "<64 hex>", "7": "<64 hex>"},
      "workload_pcr": 15,
      "allowed_model_digests": ["<64 hex>"],
      "allowed_runtime_events": ["<64 hex>"],
      "ak": {"pinned_public_keys": ["<base64 DER SubjectPublicKeyInfo>"],
             "certificate_roots": ["-----BEGIN CERTIFICATE-----\\n..."]},
      "max_session_ttl_seconds": 3600
    }

Fields:

- `version` (int): the format version, 1.
- `dev_only` (bool): true for a trust-on-first-use policy that a server wrote
  about itself; such a policy proves nothing to a third party and must never
  be used in production. The verifier does not read it; tools warn on it.
- `pcr_bank` (string): the PCR bank the quote must cover, "sha256" or
  "sha384". "sha1" is refused. In a SHA-384 bank the workload PCR is replayed
  with SHA-384 over each event's measured bytes (the log's SHA-256 digests are
  still checked against the content).
- `pcr_selection` (list of int): the PCR indices (0-23) the quote must cover,
  exactly, sorted ascending, without duplicates, at least one.
- `pcr_values` (object): expected values of some selected PCRs, keyed by the
  index in decimal ("0", "7"), each the bank's digest in lowercase hex. The
  workload PCR must not be pinned here: it changes with each start-up and is
  checked by replaying the workload event log instead. A production policy
  pins the PCRs covering firmware, boot chain, kernel, initrd, command line and
  the measured root filesystem.
- `workload_pcr` (int): the PCR the server extends the model and runtime
  events into; it must be in `pcr_selection` and should be one that locality 0
  cannot reset (15, not 16 or 23).
- `allowed_model_digests` (list of hex): the 32-byte model digests (from the
  model manifest) the policy accepts, at least one, no duplicates.
- `allowed_runtime_events` (list of hex): SHA-256 over the data bytes (the
  canonical JSON) of each accepted runtime event, at least one, no duplicates.
- `ak` (object): how the attestation key is trusted.
  - `pinned_public_keys` (optional, list of base64): DER SubjectPublicKeyInfo
    of AKs trusted as they are (standard base64 with padding, canonical DER).
  - `certificate_roots` (optional, list of PEM strings): root certificates; an
    AK is also trusted when the evidence carries a certificate chain (DER,
    leaf first) whose leaf holds the AK's public key and which validates to
    one of these roots at the client's current time (RFC 5280 path
    validation with the Web PKI rules for CA certificates; the leaf's
    extensions are not constrained). Meant for GCP and Azure AK certificates.
  At least one pinned key or one root is required.
  - `hardware_report` (optional, object): reserved for requiring the AK to be
    bound to the CVM's hardware report (SEV-SNP, TDX). Not implemented yet:
    its presence is refused.
- `max_session_ttl_seconds` (int): the longest session time-to-live the client
  accepts, 1 to 4294967295.

`Policy.to_json()` gives the canonical form (sorted keys, no whitespace, ASCII,
lists sorted, `certificate_roots` re-encoded as PEM and left out when empty)
and `policy_digest()` is its SHA-256, stable across load/save.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from encloud.client.encoding import sha256
from encloud.client.errors import PolicyError

POLICY_VERSION = 1
PCR_BANKS: Mapping[str, int] = MappingProxyType({"sha256": 32, "sha384": 48})
"""Accepted bank names and their digest sizes."""
PCR_BANK_ALG: Mapping[str, int] = MappingProxyType({"sha256": 0x000B, "sha384": 0x000C})
MAX_PCR_INDEX = 23
MAX_TTL_SECONDS = 0xFFFFFFFF

_KEYS = frozenset(
    {
        "version",
        "dev_only",
        "pcr_bank",
        "pcr_selection",
        "pcr_values",
        "workload_pcr",
        "allowed_model_digests",
        "allowed_runtime_events",
        "ak",
        "max_session_ttl_seconds",
    }
)
_AK_KEYS = frozenset({"pinned_public_keys", "certificate_roots", "hardware_report"})


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build one with parse_policy, load_policy or build_policy."""

    version: int
    dev_only: bool
    pcr_bank: str
    pcr_selection: tuple[int, ...]
    pcr_values: Mapping[int, bytes]
    workload_pcr: int
    allowed_model_digests: tuple[bytes, ...]
    allowed_runtime_events: tuple[bytes, ...]
    pinned_public_keys: tuple[bytes, ...]
    """DER SubjectPublicKeyInfo of each pinned AK."""
    max_session_ttl_seconds: int
    certificate_roots: tuple[bytes, ...] = ()
    """DER of each root certificate an AK certificate chain may lead to."""

    @property
    def pcr_bank_alg(self) -> int:
        """The TPM_ALG_ID of the bank."""
        return PCR_BANK_ALG[self.pcr_bank]

    def to_obj(self) -> dict[str, Any]:
        ak: dict[str, list[str]] = {
            "pinned_public_keys": sorted(
                base64.b64encode(k).decode("ascii") for k in self.pinned_public_keys
            )
        }
        if self.certificate_roots:
            ak["certificate_roots"] = sorted(_pem(der) for der in self.certificate_roots)
        return {
            "version": self.version,
            "dev_only": self.dev_only,
            "pcr_bank": self.pcr_bank,
            "pcr_selection": list(self.pcr_selection),
            "pcr_values": {str(i): v.hex() for i, v in sorted(self.pcr_values.items())},
            "workload_pcr": self.workload_pcr,
            "allowed_model_digests": sorted(d.hex() for d in self.allowed_model_digests),
            "allowed_runtime_events": sorted(d.hex() for d in self.allowed_runtime_events),
            "ak": ak,
            "max_session_ttl_seconds": self.max_session_ttl_seconds,
        }

    def to_json(self) -> bytes:
        """The canonical JSON: sorted keys, no whitespace, ASCII, lists sorted."""
        return json.dumps(
            self.to_obj(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")


def policy_digest(policy: Policy) -> bytes:
    """SHA-256 of the policy's canonical JSON."""
    return sha256(policy.to_json())


def load_policy(path: str | os.PathLike[str]) -> Policy:
    with open(path, "rb") as f:
        return parse_policy(f.read())


def parse_policy(data: bytes) -> Policy:
    """Parse and validate a policy; any problem raises PolicyError naming the field."""
    try:
        obj = json.loads(data, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as err:
        raise PolicyError(f"policy is not valid JSON: {err}") from err
    return _from_obj(obj)


def build_policy(
    *,
    pcr_selection: Iterable[int],
    workload_pcr: int,
    allowed_model_digests: Iterable[bytes],
    allowed_runtime_events: Iterable[bytes],
    pinned_public_keys: Iterable[bytes],
    max_session_ttl_seconds: int,
    certificate_roots: Iterable[bytes] = (),
    pcr_values: Mapping[int, bytes] | None = None,
    dev_only: bool = False,
    pcr_bank: str = "sha256",
) -> Policy:
    """Build a policy from Python values, validated exactly as a parsed one."""
    obj = {
        "version": POLICY_VERSION,
        "dev_only": dev_only,
        "pcr_bank": pcr_bank,
        "pcr_selection": sorted(pcr_selection),
        "pcr_values": {str(i): v.hex() for i, v in (pcr_values or {}).items()},
        "workload_pcr": workload_pcr,
        "allowed_model_digests": [d.hex() for d in allowed_model_digests],
        "allowed_runtime_events": [d.hex() for d in allowed_runtime_events],
        "ak": {
            "pinned_public_keys": [base64.b64encode(k).decode("ascii") for k in pinned_public_keys],
            "certificate_roots": [_pem(der) for der in certificate_roots],
        },
        "max_session_ttl_seconds": max_session_ttl_seconds,
    }
    return _from_obj(obj)


# --- validation ---------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _fail(field: str, why: str) -> PolicyError:
    return PolicyError(f"policy field {field!r}: {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(obj: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = obj[field]
    if not _is_int(value) or not low <= value <= high:
        raise _fail(field, f"must be an integer in {low}..{high}")
    return int(value)


def _hex(value: object, field: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or value != value.lower():
        raise _fail(field, f"must be {2 * size} lowercase hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError as err:
        raise _fail(field, f"must be {2 * size} lowercase hex digits") from err


def _hex_list(obj: Mapping[str, Any], field: str, size: int) -> tuple[bytes, ...]:
    value = obj[field]
    if not isinstance(value, list) or not value:
        raise _fail(field, "must be a non-empty list of hex strings")
    items = [_hex(item, f"{field}[{i}]", size) for i, item in enumerate(value)]
    if len(set(items)) != len(items):
        raise _fail(field, "has duplicates")
    return tuple(sorted(items))


def _spki(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise _fail(field, "must be a base64 string")
    try:
        der = base64.b64decode(value, validate=True)
        key = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as err:
        raise _fail(field, "is not base64 of a DER SubjectPublicKeyInfo") from err
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if canonical != der:
        raise _fail(field, "is not canonical DER SubjectPublicKeyInfo")
    return der


def _pem(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _root(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise _fail(field, "must be a PEM string")
    try:
        certs = x509.load_pem_x509_certificates(value.encode("ascii"))
    except (UnicodeEncodeError, ValueError, UnsupportedAlgorithm) as err:
        raise _fail(field, "is not a PEM certificate") from err
    if len(certs) != 1:
        raise _fail(field, "must hold exactly one certificate")
    return certs[0].public_bytes(serialization.Encoding.DER)


def _ak(value: object) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    if not isinstance(value, dict):
        raise _fail("ak", "must be an object")
    unknown = sorted(set(value) - _AK_KEYS)
    if unknown:
        raise _fail(f"ak.{unknown[0]}", "unknown key")
    if "hardware_report" in value:
        raise _fail("ak.hardware_report", "hardware report binding is not implemented yet")
    keys = value.get("pinned_public_keys", [])
    if not isinstance(keys, list):
        raise _fail("ak.pinned_public_keys", "must be a list")
    ders = [_spki(k, f"ak.pinned_public_keys[{i}]") for i, k in enumerate(keys)]
    if len(set(ders)) != len(ders):
        raise _fail("ak.pinned_public_keys", "has duplicates")
    roots_value = value.get("certificate_roots", [])
    if not isinstance(roots_value, list):
        raise _fail("ak.certificate_roots", "must be a list of PEM strings")
    roots = [_root(r, f"ak.certificate_roots[{i}]") for i, r in enumerate(roots_value)]
    if len(set(roots)) != len(roots):
        raise _fail("ak.certificate_roots", "has duplicates")
    if not ders and not roots:
        raise _fail(
            "ak.pinned_public_keys", "at least one pinned key or certificate root is required"
        )
    return tuple(sorted(ders)), tuple(sorted(roots))


def _from_obj(obj: object) -> Policy:
    if not isinstance(obj, dict):
        raise PolicyError("policy must be a JSON object")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise _fail(unknown[0], "unknown key")
    missing = sorted(_KEYS - set(obj))
    if missing:
        raise _fail(missing[0], "missing")

    version = obj["version"]
    if not _is_int(version) or version != POLICY_VERSION:
        raise _fail("version", f"must be {POLICY_VERSION}")
    if not isinstance(obj["dev_only"], bool):
        raise _fail("dev_only", "must be true or false")

    bank = obj["pcr_bank"]
    if not isinstance(bank, str):
        raise _fail("pcr_bank", f"must be one of {sorted(PCR_BANKS)}")
    if bank == "sha1":
        raise _fail("pcr_bank", "sha1 is refused")
    if bank not in PCR_BANKS:
        raise _fail("pcr_bank", f"must be one of {sorted(PCR_BANKS)}")
    digest_size = PCR_BANKS[bank]

    selection = obj["pcr_selection"]
    if (
        not isinstance(selection, list)
        or not selection
        or not all(_is_int(i) and 0 <= i <= MAX_PCR_INDEX for i in selection)
    ):
        raise _fail("pcr_selection", f"must be a non-empty list of integers 0..{MAX_PCR_INDEX}")
    if selection != sorted(set(selection)):
        raise _fail("pcr_selection", "must be sorted ascending without duplicates")

    workload_pcr = _int(obj, "workload_pcr", 0, MAX_PCR_INDEX)
    if workload_pcr not in selection:
        raise _fail("workload_pcr", f"{workload_pcr} is not in pcr_selection")

    raw_values = obj["pcr_values"]
    if not isinstance(raw_values, dict):
        raise _fail("pcr_values", "must be an object of index -> hex")
    pcr_values: dict[int, bytes] = {}
    for key, value in raw_values.items():
        field = f"pcr_values.{key}"
        if not key.isascii() or not key.isdigit() or str(int(key)) != key:
            raise _fail(field, "key must be a PCR index in decimal")
        index = int(key)
        if index not in selection:
            raise _fail(field, "PCR is not in pcr_selection")
        if index == workload_pcr:
            raise _fail(field, "the workload PCR is checked by replay and must not be pinned")
        pcr_values[index] = _hex(value, field, digest_size)

    model_digests = _hex_list(obj, "allowed_model_digests", 32)
    runtime_events = _hex_list(obj, "allowed_runtime_events", 32)
    pinned, roots = _ak(obj["ak"])
    ttl = _int(obj, "max_session_ttl_seconds", 1, MAX_TTL_SECONDS)

    return Policy(
        version=POLICY_VERSION,
        dev_only=obj["dev_only"],
        pcr_bank=bank,
        pcr_selection=tuple(selection),
        pcr_values=MappingProxyType(dict(sorted(pcr_values.items()))),
        workload_pcr=workload_pcr,
        allowed_model_digests=model_digests,
        allowed_runtime_events=runtime_events,
        pinned_public_keys=pinned,
        max_session_ttl_seconds=ttl,
        certificate_roots=roots,
    )
