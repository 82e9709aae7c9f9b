"""Offline evidence bundles: one attestation, kept to be verified again later.

A bundle keeps everything needed to re-run verification without a server: the
evidence, the client's nonce and suite, the server's session values (public key,
session id, TTL) from which the qualifying data Q is recomputed, and the policy
digest. `bundle_from_attempt` makes one from an attestation of the one attest path
(encloud.protocol.attest; the client's `last_attempt`).

An `EvidenceBundle` is that record as one JSON object (version 1):

    {
      "version": 1,
      "kind": "encloud-evidence-bundle",
      "target": "host:port",
      "time": <Unix seconds when the client verified it>,
      "suite": "<12 hex: kem, kdf, aead ids>",
      "nonce": "<hex>",
      "client_commitment": "<hex: C, the commitment the client sent (never its secret)>",
      "session_id": "<hex>",
      "session_public_key": "<hex>",
      "ttl_seconds": <int>,
      "policy_sha256": "<hex of the policy digest used at attestation time>",
      "outcome": "pass" | "fail",
      "failed_check": null | "<check name>",
      "evidence": {
        "quote_attest": "<base64>", "quote_signature": "<base64>",
        "ak_public": "<base64>", "ak_certificate_chain": ["<base64 DER>", ...],
        "pcr_hash_algorithm": <TPM_ALG_ID>, "pcr_values": {"<index>": "<hex>"},
        "workload_event_log": "<base64>",
        "hardware_kind": "<kind>", "hardware_report": "<base64>",
        "hardware_certificate_chain": ["<base64 DER>", ...]
      }
    }

The three hardware keys are present only when the evidence carried a hardware report.

No key and no secret is in it: the session's private key stays in the server
and no DEK exists yet at attestation time. Re-verifying a bundle proves that
the evidence satisfies a policy; it cannot prove freshness now. Freshness (the
nonce inside the quote) was checked by the client at attestation time, from
its own random nonce.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encloud.protocol.attest import Attempt
from encloud.protocol.canonical import strict_loads
from encloud.protocol.errors import BundleError, VerificationError
from encloud.protocol.evidence import Evidence
from encloud.protocol.handshake import HpkeSuiteId, quote_qualifying_data
from encloud.protocol.policy import Policy
from encloud.protocol.verifier import CheckResult, VerifiedAttestation, verify_with_report

BUNDLE_VERSION = 2
"""2: protocol v2 (Q covers the client commitment, which the bundle keeps)."""
BUNDLE_KIND = "encloud-evidence-bundle"
_KEYS = frozenset(
    {
        "version",
        "kind",
        "target",
        "time",
        "suite",
        "nonce",
        "client_commitment",
        "session_id",
        "session_public_key",
        "ttl_seconds",
        "policy_sha256",
        "outcome",
        "failed_check",
        "evidence",
    }
)
_EVIDENCE_KEYS = frozenset(
    {
        "quote_attest",
        "quote_signature",
        "ak_public",
        "ak_certificate_chain",
        "pcr_hash_algorithm",
        "pcr_values",
        "workload_event_log",
    }
)
_HARDWARE_KEYS = frozenset({"hardware_kind", "hardware_report", "hardware_certificate_chain"})
MAX_BUNDLE_BYTES = 16 << 20


@dataclass(frozen=True)
class EvidenceBundle:
    target: str
    time: int
    suite: HpkeSuiteId
    nonce: bytes
    client_commitment: bytes
    session_id: bytes
    session_public_key: bytes
    ttl_seconds: int
    policy_sha256: bytes
    outcome: str
    failed_check: str | None
    evidence: Evidence

    def qualifying_data(self) -> bytes:
        """Q recomputed from the client's nonce and commitment and the server's session
        values."""
        return quote_qualifying_data(
            self.suite,
            self.nonce,
            self.client_commitment,
            self.session_public_key,
            self.session_id,
            self.ttl_seconds,
        )

    def to_json(self) -> bytes:
        ev = self.evidence
        obj = {
            "version": BUNDLE_VERSION,
            "kind": BUNDLE_KIND,
            "target": self.target,
            "time": self.time,
            "suite": _suite_bytes(self.suite).hex(),
            "nonce": self.nonce.hex(),
            "client_commitment": self.client_commitment.hex(),
            "session_id": self.session_id.hex(),
            "session_public_key": self.session_public_key.hex(),
            "ttl_seconds": self.ttl_seconds,
            "policy_sha256": self.policy_sha256.hex(),
            "outcome": self.outcome,
            "failed_check": self.failed_check,
            "evidence": {
                "quote_attest": _b64(ev.quote_attest),
                "quote_signature": _b64(ev.quote_signature),
                "ak_public": _b64(ev.ak_public),
                "ak_certificate_chain": [_b64(c) for c in ev.ak_certificate_chain],
                "pcr_hash_algorithm": ev.pcr_hash_algorithm,
                "pcr_values": {str(i): v.hex() for i, v in sorted(ev.pcr_values.items())},
                "workload_event_log": _b64(ev.workload_event_log),
            },
        }
        if ev.hardware_kind:
            obj["evidence"].update(  # type: ignore[attr-defined]
                {
                    "hardware_kind": ev.hardware_kind,
                    "hardware_report": _b64(ev.hardware_report),
                    "hardware_certificate_chain": [_b64(c) for c in ev.hardware_certificate_chain],
                }
            )
        return json.dumps(obj, indent=2, sort_keys=True).encode("ascii") + b"\n"


def bundle_from_attempt(attempt: Attempt) -> EvidenceBundle:
    """The bundle of one attestation (encloud.protocol.attest), pass or fail."""
    return EvidenceBundle(
        target=attempt.target,
        time=attempt.verified_at,
        suite=attempt.suite,
        nonce=attempt.nonce,
        client_commitment=attempt.client_commitment,
        session_id=attempt.session_id,
        session_public_key=attempt.session_public_key,
        ttl_seconds=attempt.ttl_seconds,
        policy_sha256=attempt.policy_sha256,
        outcome="pass" if attempt.failure is None else "fail",
        failed_check=attempt.failure.check if attempt.failure is not None else None,
        evidence=attempt.evidence,
    )


def verify_bundle(
    bundle: EvidenceBundle, policy: Policy
) -> tuple[VerifiedAttestation | None, list[CheckResult], VerificationError | None]:
    """Re-verify a bundle offline against `policy` (no server, no network).

    Every check runs again, Q recomputed from the bundle's nonce and session values; an AK
    certificate chain is validated at the current time."""
    return verify_with_report(
        bundle.evidence,
        policy,
        expected_qualifying_data=bundle.qualifying_data(),
        session_ttl_seconds=bundle.ttl_seconds,
    )


def save_bundle(path: Path | str, bundle: EvidenceBundle) -> None:
    Path(path).write_bytes(bundle.to_json())


def load_bundle(path: Path | str) -> EvidenceBundle:
    with open(path, "rb") as f:
        return parse_bundle(f.read(MAX_BUNDLE_BYTES + 1))


# --- parsing ---------------------------------------------------------------------------


def _fail(field: str, why: str) -> BundleError:
    return BundleError(f"bundle field {field!r}: {why}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _suite_bytes(suite: HpkeSuiteId) -> bytes:
    return suite.encoded()


def _int(obj: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = obj[field]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _fail(field, f"must be an integer in {low}..{high}")
    return value


def _hexf(obj: Mapping[str, Any], field: str, low: int, high: int, name: str = "") -> bytes:
    value = obj[field]
    field = name or field
    if not isinstance(value, str) or value != value.lower():
        raise _fail(field, "must be lowercase hex")
    try:
        data = bytes.fromhex(value)
    except ValueError as err:
        raise _fail(field, "must be lowercase hex") from err
    if not low <= len(data) <= high:
        raise _fail(field, f"must be {low} to {high} bytes")
    return data


def _b64f(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise _fail(field, "must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _fail(field, "must be base64") from err


def parse_bundle(data: bytes) -> EvidenceBundle:
    """Parse a bundle strictly; any problem raises BundleError naming the field."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        obj = strict_loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BundleError(f"bundle is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise BundleError("bundle must be a JSON object")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise _fail(unknown[0], "unknown key")
    missing = sorted(_KEYS - set(obj))
    if missing:
        raise _fail(missing[0], "missing")
    if obj["version"] != BUNDLE_VERSION or isinstance(obj["version"], bool):
        raise _fail("version", f"must be {BUNDLE_VERSION}")
    if obj["kind"] != BUNDLE_KIND:
        raise _fail("kind", f"must be {BUNDLE_KIND!r}")
    if not isinstance(obj["target"], str):
        raise _fail("target", "must be a string")
    suite_raw = _hexf(obj, "suite", 6, 6)
    suite = HpkeSuiteId(
        int.from_bytes(suite_raw[0:2], "big"),
        int.from_bytes(suite_raw[2:4], "big"),
        int.from_bytes(suite_raw[4:6], "big"),
    )
    if obj["outcome"] not in ("pass", "fail"):
        raise _fail("outcome", "must be 'pass' or 'fail'")
    failed = obj["failed_check"]
    if failed is not None and not isinstance(failed, str):
        raise _fail("failed_check", "must be null or a string")
    ev = obj["evidence"]
    if not isinstance(ev, dict):
        raise _fail("evidence", "must be an object")
    unknown = sorted(set(ev) - _EVIDENCE_KEYS - _HARDWARE_KEYS)
    if unknown:
        raise _fail(f"evidence.{unknown[0]}", "unknown key")
    missing = sorted(_EVIDENCE_KEYS - set(ev))
    if missing:
        raise _fail(f"evidence.{missing[0]}", "missing")
    chain = ev["ak_certificate_chain"]
    if not isinstance(chain, list):
        raise _fail("evidence.ak_certificate_chain", "must be a list")
    values = ev["pcr_values"]
    if not isinstance(values, dict):
        raise _fail("evidence.pcr_values", "must be an object of index -> hex")
    pcr_values: dict[int, bytes] = {}
    for key in values:
        field = f"evidence.pcr_values.{key}"
        if (
            len(key) > 2
            or not key.isascii()
            or not key.isdigit()
            or str(int(key)) != key
            or int(key) > 23
        ):
            raise _fail(field, "key must be a PCR index 0..23 in decimal")
        pcr_values[int(key)] = _hexf(values, key, 1, 64, field)
    evidence = Evidence(
        quote_attest=_b64f(ev["quote_attest"], "evidence.quote_attest"),
        quote_signature=_b64f(ev["quote_signature"], "evidence.quote_signature"),
        ak_public=_b64f(ev["ak_public"], "evidence.ak_public"),
        pcr_values=pcr_values,
        workload_event_log=_b64f(ev["workload_event_log"], "evidence.workload_event_log"),
        pcr_hash_algorithm=_int(ev, "pcr_hash_algorithm", 0, 0xFFFF),
        ak_certificate_chain=tuple(
            _b64f(c, f"evidence.ak_certificate_chain[{i}]") for i, c in enumerate(chain)
        ),
        **_hardware_fields(ev),
    )
    return EvidenceBundle(
        target=obj["target"],
        time=_int(obj, "time", 0, 2**53 - 1),
        suite=suite,
        nonce=_hexf(obj, "nonce", 32, 64),
        client_commitment=_hexf(obj, "client_commitment", 32, 32),
        session_id=_hexf(obj, "session_id", 1, 64),
        session_public_key=_hexf(obj, "session_public_key", 1, 4096),
        ttl_seconds=_int(obj, "ttl_seconds", 0, 0xFFFFFFFF),
        policy_sha256=_hexf(obj, "policy_sha256", 32, 32),
        outcome=obj["outcome"],
        failed_check=failed,
        evidence=evidence,
    )


def _hardware_fields(ev: dict[str, Any]) -> dict[str, Any]:
    """The optional hardware keys of a bundle's evidence: all three or none."""
    present = _HARDWARE_KEYS & set(ev)
    if not present:
        return {}
    if present != _HARDWARE_KEYS:
        raise _fail(f"evidence.{sorted(_HARDWARE_KEYS - present)[0]}", "missing")
    kind, chain = ev["hardware_kind"], ev["hardware_certificate_chain"]
    if not isinstance(kind, str) or not kind or len(kind) > 32:
        raise _fail("evidence.hardware_kind", "must be a non-empty string")
    if not isinstance(chain, list):
        raise _fail("evidence.hardware_certificate_chain", "must be a list")
    return {
        "hardware_kind": kind,
        "hardware_report": _b64f(ev["hardware_report"], "evidence.hardware_report"),
        "hardware_certificate_chain": tuple(
            _b64f(c, f"evidence.hardware_certificate_chain[{i}]") for i, c in enumerate(chain)
        ),
    }
