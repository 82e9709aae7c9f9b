"""The workload event log: TCG Canonical Event Log (CEL) records, JSON lines.

Each record is one JSON object on its own line, in the CEL-JSON shape:

    {"content":{"data":"<hex>","event_type":"model"},"content_type":"encloud",
     "digests":[{"digest":"<hex>","hashAlg":"sha256"}],"pcr":15,"recnum":0}

The measured bytes of an event are E("encloud/v1 event", event_type, data);
its digest is their SHA-256, and extending the PCR with it replays as
PCR' = SHA-256(PCR || digest). The event types:

- "model": one per served model; data is the canonical JSON
  {"digest":"<64 hex: the model manifest's digest>","role":"chat"|"embeddings"}.
- "runtime": data is the canonical JSON of the runtime event (the measured
  settings, the engines' facts).

A start-up is its model events, roles in the order of MODEL_ROLES and none
twice, then one runtime event (docs/PROTOCOL.md, "The workload event log").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from encloud.protocol.canonical import strict_loads
from encloud.protocol.encoding import encode, sha256
from encloud.protocol.errors import EventLogFormatError

CONTENT_TYPE = "encloud"
EVENT_MODEL = "model"
EVENT_RUNTIME = "runtime"
EVENT_TYPES = frozenset({EVENT_MODEL, EVENT_RUNTIME})
_DIGEST_HEX = re.compile(r"[0-9a-f]{64}")
ROLE_CHAT = "chat"
ROLE_EMBEDDINGS = "embeddings"
MODEL_ROLES = (ROLE_CHAT, ROLE_EMBEDDINGS)
"""The model roles, in the order a start-up measures them."""
_RECORD_KEYS = {"recnum", "pcr", "digests", "content_type", "content"}


@dataclass(frozen=True)
class WorkloadEvent:
    """One thing the server measured into the workload PCR."""

    event_type: str
    data: bytes

    def measured_bytes(self) -> bytes:
        return encode("encloud/v1 event", self.event_type.encode("ascii"), self.data)

    def digest(self) -> bytes:
        return sha256(self.measured_bytes())


@dataclass(frozen=True)
class EventRecord:
    """An event as logged: its position, PCR and the digest that was extended."""

    recnum: int
    pcr: int
    digest: bytes
    event: WorkloadEvent

    def to_json_line(self) -> bytes:
        """The record's canonical JSON (sorted keys, no spaces), without a newline."""
        obj = {
            "recnum": self.recnum,
            "pcr": self.pcr,
            "digests": [{"hashAlg": "sha256", "digest": self.digest.hex()}],
            "content_type": CONTENT_TYPE,
            "content": {"event_type": self.event.event_type, "data": self.event.data.hex()},
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def model_event(role: str, digest: bytes) -> WorkloadEvent:
    """The event measuring one served model."""
    if role not in MODEL_ROLES or len(digest) != 32:
        raise ValueError(f"a model event needs a role in {MODEL_ROLES} and a 32-byte digest")
    return WorkloadEvent(EVENT_MODEL, canonical_json({"digest": digest.hex(), "role": role}))


def parse_model_event(data: bytes) -> tuple[str, bytes]:
    """(role, digest) of a model event's data; EventLogFormatError unless it is exactly the
    canonical JSON model_event writes."""
    try:
        obj = strict_loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EventLogFormatError("a model event is not ASCII JSON") from err
    if not isinstance(obj, dict) or set(obj) != {"digest", "role"}:
        raise EventLogFormatError("a model event must have exactly digest and role")
    role, digest = obj["role"], obj["digest"]
    if role not in MODEL_ROLES:
        raise EventLogFormatError(f"a model event has unknown role {role!r}")
    # Exactly 64 lowercase hex digits (bytes.fromhex alone would skip whitespace).
    if not isinstance(digest, str) or not _DIGEST_HEX.fullmatch(digest):
        raise EventLogFormatError("a model event's digest is not 64 lowercase hex digits")
    if canonical_json(obj) != data:
        raise EventLogFormatError("a model event is not canonical JSON")
    return role, bytes.fromhex(digest)


def logged_models(events: Iterable[WorkloadEvent]) -> dict[str, list[bytes]]:
    """Role -> the sorted distinct digests the log's model events measured."""
    found: dict[str, set[bytes]] = {}
    for event in events:
        if event.event_type == EVENT_MODEL:
            role, digest = parse_model_event(event.data)
            found.setdefault(role, set()).add(digest)
    return {role: sorted(digests) for role, digests in found.items()}


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no whitespace, ASCII: the bytes measured for JSON-valued events."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def extend(pcr_value: bytes, digest: bytes) -> bytes:
    return sha256(pcr_value + digest)


def replay(records: Iterable[EventRecord], initial: bytes = bytes(32)) -> bytes:
    """The PCR value that extending each record's digest onto `initial` gives."""
    value = initial
    for record in records:
        value = extend(value, record.digest)
    return value


def serialize(records: Sequence[EventRecord]) -> bytes:
    return b"".join(record.to_json_line() + b"\n" for record in records)


def parse(data: bytes) -> list[EventRecord]:
    """Parse a log strictly; any deviation raises EventLogFormatError."""
    if not data:
        return []
    if not data.endswith(b"\n"):
        raise EventLogFormatError("log does not end with a newline")
    records = []
    for index, line in enumerate(data[:-1].split(b"\n")):
        record = _parse_record(line, index)
        if record.recnum != index:
            raise EventLogFormatError(f"record {index} has recnum {record.recnum}")
        records.append(record)
    return records


def _parse_record(line: bytes, index: int) -> EventRecord:
    where = f"record {index}"
    try:
        obj = strict_loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EventLogFormatError(f"{where} is not ASCII JSON") from err
    if not isinstance(obj, dict) or set(obj) != _RECORD_KEYS:
        raise EventLogFormatError(f"{where} does not have exactly the keys {sorted(_RECORD_KEYS)}")
    recnum, pcr, digests, content_type, content = (
        obj["recnum"],
        obj["pcr"],
        obj["digests"],
        obj["content_type"],
        obj["content"],
    )
    if not _is_int(recnum) or not _is_int(pcr) or not 0 <= pcr <= 23:
        raise EventLogFormatError(f"{where} has an invalid recnum or pcr")
    if content_type != CONTENT_TYPE:
        raise EventLogFormatError(f"{where} has content_type {content_type!r}")
    if (
        not isinstance(digests, list)
        or len(digests) != 1
        or not isinstance(digests[0], dict)
        or set(digests[0]) != {"hashAlg", "digest"}
        or digests[0]["hashAlg"] != "sha256"
    ):
        raise EventLogFormatError(f"{where} must carry exactly one sha256 digest")
    digest = _hex_field(digests[0]["digest"], where)
    if len(digest) != 32:
        raise EventLogFormatError(f"{where} digest is not 32 bytes")
    if not isinstance(content, dict) or set(content) != {"event_type", "data"}:
        raise EventLogFormatError(f"{where} content must have exactly event_type and data")
    event_type = content["event_type"]
    if event_type not in EVENT_TYPES:
        raise EventLogFormatError(f"{where} has unknown event_type {event_type!r}")
    event = WorkloadEvent(event_type, _hex_field(content["data"], where))
    record = EventRecord(recnum, pcr, digest, event)
    if record.to_json_line() != line:
        raise EventLogFormatError(f"{where} is not in canonical form")
    return record


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _hex_field(value: object, where: str) -> bytes:
    if not isinstance(value, str) or value != value.lower():
        raise EventLogFormatError(f"{where} has a non-lowercase-hex field")
    try:
        return bytes.fromhex(value)
    except ValueError as err:
        raise EventLogFormatError(f"{where} has an invalid hex field") from err
