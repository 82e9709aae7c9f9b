"""Measuring the workload into the workload PCR, with its event log on disk
(the server's start-up, docs/ATTESTATION.md).

The log is CEL-JSON lines (`encloud.protocol.eventlog`). It is written ahead: each record is
appended and fsynced BEFORE its digest is extended into the PCR, so a crash leaves at most one
record that the PCR does not reflect, never an extend nobody logged. At start-up:

- the log replays (from 32 zero bytes) to the PCR's value: append to it;
- the PCR is all zeros (the TPM was reset): keep the old log aside as `<log>.prev` and start a
  new one;
- the log minus its last record replays to the PCR (written but not extended): drop that
  record and go on;
- anything else (someone extended the PCR without logging it, or the log was edited):
  `WorkloadMeasurementError`, and the server refuses to start.

After appending, the PCR is read again and must equal the log's replay; otherwise another
process extended the PCR meanwhile and measurement fails too.

The workload PCR must not be resettable from locality 0: PCR 15 is the default; 16 and 23 can
be reset by any process that reaches the TPM and are refused unless explicitly allowed (dev).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from encloud.protocol.errors import EventLogFormatError
from encloud.protocol.eventlog import EventRecord, WorkloadEvent, parse, replay, serialize
from encloud.server.attestation.tpm import Tpm

__all__ = [
    "DEFAULT_WORKLOAD_PCR",
    "RESETTABLE_PCRS",
    "WorkloadMeasurementError",
    "check_workload_pcr",
    "current_log",
    "measure_workload",
]

DEFAULT_WORKLOAD_PCR = 15
RESETTABLE_PCRS = frozenset({16, 23})
PREV_SUFFIX = ".prev"
_ZERO = bytes(32)


class WorkloadMeasurementError(RuntimeError):
    """The workload PCR and its event log disagree; the server must not start."""


def check_workload_pcr(pcr: int, allow_resettable: bool = False) -> None:
    """Raise ValueError unless `pcr` is a valid workload PCR (not resettable, unless allowed)."""
    if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr <= 23:
        raise ValueError(f"invalid PCR index {pcr!r}")
    if pcr in RESETTABLE_PCRS and not allow_resettable:
        raise ValueError(
            f"PCR {pcr} can be reset from locality 0 and must not hold the workload "
            "measurement (allowed only in development)"
        )


def current_log(log_path: Path) -> bytes:
    """The log's exact bytes, as shipped in evidence (empty if there is no log yet)."""
    try:
        return Path(log_path).read_bytes()
    except FileNotFoundError:
        return b""


def measure_workload(
    tpm: Tpm,
    pcr: int,
    log_path: Path,
    events: Sequence[WorkloadEvent],
    *,
    allow_resettable: bool = False,
) -> list[EventRecord]:
    """Extend `events` into `pcr` and append them to the log; return the whole log.

    Raises WorkloadMeasurementError if the PCR and the log disagree (see the module doc),
    ValueError for a resettable PCR (unless allowed), TpmUnavailableError if the TPM is gone.
    """
    check_workload_pcr(pcr, allow_resettable)
    log_path = Path(log_path)
    pcr_value = tpm.read_pcrs([pcr])[pcr]
    records = _reconcile(log_path, pcr, pcr_value)

    for event in events:
        record = EventRecord(len(records), pcr, event.digest(), event)
        _append(log_path, record)  # log ahead: durable before the extend
        tpm.extend(pcr, record.digest)
        records.append(record)

    final = tpm.read_pcrs([pcr])[pcr]
    if final != replay(records):
        raise WorkloadMeasurementError(
            f"PCR {pcr} changed during measurement: another process extended it"
        )
    return records


def _reconcile(log_path: Path, pcr: int, pcr_value: bytes) -> list[EventRecord]:
    """Bring the log on disk in line with the PCR, or raise. Returns the records kept."""
    exists = log_path.exists()
    data = log_path.read_bytes() if exists else b""

    if pcr_value == _ZERO:
        # TPM reset (or first start): whatever the log holds belongs to an earlier boot.
        if exists:
            os.replace(log_path, log_path.with_name(log_path.name + PREV_SUFFIX))
            _fsync_dir(log_path.parent)
        return []

    try:
        records = parse(data)
    except EventLogFormatError as err:
        raise WorkloadMeasurementError(f"workload event log {log_path} is invalid: {err}") from err
    for record in records:
        if record.pcr != pcr:
            raise WorkloadMeasurementError(
                f"workload event log record {record.recnum} is for PCR {record.pcr}, not {pcr}"
            )
        if record.digest != record.event.digest():
            raise WorkloadMeasurementError(
                f"workload event log record {record.recnum} has a digest that does not "
                "match its content"
            )

    if replay(records) == pcr_value:
        return records
    if records and replay(records[:-1]) == pcr_value:
        # Written but never extended (crash between fsync and extend): drop it.
        kept = records[:-1]
        _rewrite(log_path, kept)
        return kept
    raise WorkloadMeasurementError(
        f"PCR {pcr} holds measurements that the workload event log {log_path} does not "
        f"account for ({len(records)} records); refusing to start"
    )


def _append(log_path: Path, record: EventRecord) -> None:
    created = not log_path.exists()
    with open(log_path, "ab") as f:
        f.write(serialize([record]))
        f.flush()
        os.fsync(f.fileno())
    if created:
        _fsync_dir(log_path.parent)


def _rewrite(log_path: Path, records: Sequence[EventRecord]) -> None:
    tmp = log_path.with_name(log_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialize(records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, log_path)
    _fsync_dir(log_path.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
