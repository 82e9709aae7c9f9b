"""Evidence for one session: a quote over the policy PCRs plus what it covers.

`TpmAttester.evidence(qualifying_data)` is what the service calls, from one
worker thread at a time. It survives TPM faults (docs/ATTESTATION.md, "TPM
faults"):

- the TPM stops answering or its socket goes away: the call raises
  TpmUnavailableError (gRPC UNAVAILABLE). Sessions already bound do not need
  the TPM and keep working.
- the next call reconnects: it reuses the `Tpm` if it only lost its
  connection (it reopens its ESAPI context by itself), or opens a fresh one
  through `reopen` if the old one failed for good (a command that never
  answered leaves a worker thread stuck in libtss2).
- the TPM came back reset (swtpm restarted, PCRs cleared): the quoted workload
  PCR no longer equals the replay of the log this attester holds. The attester
  then measures the workload again with `measure_workload`, whose rules decide
  (a PCR at zero starts a new log; an extend nobody logged is refused), and
  quotes again. A workload PCR that is neither what the log says nor
  explainable is never quoted over: the caller gets TpmUnavailableError and
  the operator finds the reason in the server log.

The evidence always carries the log that replays to the PCR values in the same
evidence, because both come from the same locked quote.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from encloud.protocol.eventlog import EventRecord, WorkloadEvent, replay, serialize
from encloud.protocol.evidence import TPM_ALG_SHA256, Evidence
from encloud.protocol.faults import TpmUnavailableError
from encloud.protocol.hardware.binding import session_report_data
from encloud.server.attestation.measure import WorkloadMeasurementError, measure_workload
from encloud.server.attestation.tpm import Tpm, TpmCommandError
from encloud.server.attestation.tsm import TsmError, TsmReporter

log = logging.getLogger("encloud.attestation")


class Remeasure:
    """What the attester needs to measure the workload again after a TPM reset."""

    def __init__(
        self,
        workload_pcr: int,
        log_path: Path,
        events: Sequence[WorkloadEvent],
        *,
        allow_resettable: bool = False,
        reopen: Callable[[], Tpm] | None = None,
    ) -> None:
        self.workload_pcr = workload_pcr
        self.log_path = Path(log_path)
        self.events = list(events)
        self.allow_resettable = allow_resettable
        self.reopen = reopen


class HardwareSource:
    """The CVM hardware report that rides with each quote.

    Either a static report read at start-up (Azure's HCL report, which binds the AK
    through its runtime claims), or a configfs-tsm reporter asked per session for a
    report whose REPORT_DATA binds the qualifying data and the AK."""

    def __init__(
        self,
        kind: str,
        chain: Sequence[bytes] = (),
        *,
        static_report: bytes = b"",
        tsm: TsmReporter | None = None,
    ) -> None:
        self.kind = kind
        self.chain = tuple(bytes(c) for c in chain)
        self.static_report = bytes(static_report)
        self.tsm = tsm

    def report(self, qualifying_data: bytes, ak_public: bytes) -> bytes:
        if self.tsm is None:
            return self.static_report
        try:
            return self.tsm.report(session_report_data(qualifying_data, ak_public))
        except TsmError as err:
            log.error(f"hardware report request failed: {err}")
            raise TpmUnavailableError("the hardware report is unavailable") from None


class TpmAttester:
    def __init__(
        self,
        tpm: Tpm,
        pcr_selection: Sequence[int],
        log: Sequence[EventRecord],
        *,
        ak_certificate_chain: Sequence[bytes] = (),
        remeasure: Remeasure | None = None,
        hardware: HardwareSource | None = None,
    ) -> None:
        self._tpm = tpm
        self._hardware = hardware
        self._pcrs = list(pcr_selection)
        self._ak_public = tpm.ak_public()
        self._chain = tuple(bytes(c) for c in ak_certificate_chain)
        self._remeasure = remeasure
        self._needs_reopen = False
        # The server is the log's only writer, so the measured log is kept in memory.
        self._set_records(list(log))

    def _set_records(self, records: list[EventRecord]) -> None:
        self.records = records
        self._log = serialize(records)
        self._replayed = replay(records)

    @property
    def ak_public(self) -> bytes:
        return self._ak_public

    @property
    def tpm(self) -> Tpm:
        """The TPM this attester currently quotes with (it may change after a fault)."""
        return self._tpm

    def evidence(self, qualifying_data: bytes) -> Evidence:
        """Quote `qualifying_data`; raise TpmUnavailableError if the TPM cannot be used."""
        try:
            return self._evidence(qualifying_data)
        except TpmUnavailableError:
            self._needs_reopen = True
            raise

    def _evidence(self, qualifying_data: bytes) -> Evidence:
        if self._needs_reopen:
            self._reconnect()
        attest, signature, pcr_values = self._tpm.quote_with_pcrs(qualifying_data, self._pcrs)
        workload_pcr = self._remeasure.workload_pcr if self._remeasure else None
        if workload_pcr is not None and pcr_values[workload_pcr] != self._replayed:
            self._measure_again()
            attest, signature, pcr_values = self._tpm.quote_with_pcrs(qualifying_data, self._pcrs)
            if pcr_values[workload_pcr] != self._replayed:
                raise TpmUnavailableError("the workload PCR changed while measuring")
        hw = self._hardware
        return Evidence(
            quote_attest=attest,
            quote_signature=signature,
            ak_public=self._ak_public,
            pcr_values=pcr_values,
            workload_event_log=self._log,
            pcr_hash_algorithm=TPM_ALG_SHA256,
            ak_certificate_chain=self._chain,
            hardware_kind=hw.kind if hw else "",
            hardware_report=hw.report(qualifying_data, self._ak_public) if hw else b"",
            hardware_certificate_chain=hw.chain if hw else (),
        )

    def _reconnect(self) -> None:
        """Open a fresh TPM if the old one failed for good; otherwise keep it (it reconnects)."""
        reopen = self._remeasure.reopen if self._remeasure else None
        if reopen is not None and self._tpm_failed():
            tpm = reopen()  # raises TpmUnavailableError while the TPM is still gone
            if tpm.ak_public() != self._ak_public:
                tpm.close()
                raise TpmUnavailableError("the TPM came back with another attestation key")
            old, self._tpm = self._tpm, tpm
            with contextlib.suppress(Exception):
                old.close()
            log.warning("reopened the TPM after a fault")
        self._needs_reopen = False

    def _tpm_failed(self) -> bool:
        # Tpm marks itself failed for good when a command never answered.
        return getattr(self._tpm, "_failed", None) is not None

    def _measure_again(self) -> None:
        assert self._remeasure is not None
        r = self._remeasure
        try:
            records = measure_workload(
                self._tpm, r.workload_pcr, r.log_path, r.events, allow_resettable=r.allow_resettable
            )
        except (WorkloadMeasurementError, TpmCommandError) as err:
            log.error("workload re-measurement refused", extra={"error": str(err)})
            raise TpmUnavailableError("the workload PCR does not match its event log") from None
        log.warning(
            "the TPM was reset: workload measured again",
            extra={"records": len(records), "workload_pcr": r.workload_pcr},
        )
        self._set_records(records)

    def close(self) -> None:
        self._tpm.close()
