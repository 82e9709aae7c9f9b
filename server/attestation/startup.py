"""Start-up of the attestation side (DESIGN.md step 1), as one call for app.py.

Opens the TPM, measures the workload events into the workload PCR with the
persisted event log, and returns the attester the service quotes through,
plus the dev-only policy writer.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from encloud.client.encoding import sha256
from encloud.client.eventlog import WorkloadEvent
from encloud.server.attestation.attester import TpmAttester
from encloud.server.attestation.measure import measure_workload
from encloud.server.attestation.tpm import Tpm
from encloud.server.settings import Settings

log = logging.getLogger("encloud.attestation")

EVENT_LOG_NAME = "workload-eventlog.jsonl"


class AttestationRuntime:
    """The TPM, its attester and what was measured; closed at shutdown."""

    def __init__(self, tpm: Tpm, attester: TpmAttester, events: Sequence[WorkloadEvent]) -> None:
        self.tpm = tpm
        self.attester = attester
        self.events = list(events)

    def close(self) -> None:
        self.tpm.close()


def start_attestation(settings: Settings, events: Sequence[WorkloadEvent]) -> AttestationRuntime:
    """Blocking: call from a worker thread."""
    tpm = Tpm.open(settings.tcti)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    records = measure_workload(
        tpm,
        settings.workload_pcr,
        settings.state_dir / EVENT_LOG_NAME,
        events,
        allow_resettable=settings.allow_resettable_workload_pcr,
    )
    attester = TpmAttester(tpm, settings.pcr_selection, records)
    runtime = AttestationRuntime(tpm, attester, events)
    if settings.dev_policy_path is not None:
        write_dev_policy(settings.dev_policy_path, settings, runtime)
    return runtime


def write_dev_policy(path: Path, settings: Settings, runtime: AttestationRuntime) -> None:
    """DEV ONLY, trust on first use: pin what this server is right now."""
    from encloud.client.verifier import spki_der

    pinned = [p for p in settings.pcr_selection if p != settings.workload_pcr]
    values = runtime.tpm.read_pcrs(pinned) if pinned else {}
    model, runtime_event = runtime.events[0], runtime.events[1]
    policy = {
        "version": 1,
        "dev_only": True,
        "pcr_bank": "sha256",
        "pcr_selection": settings.pcr_selection,
        "pcr_values": {str(index): values[index].hex() for index in pinned},
        "workload_pcr": settings.workload_pcr,
        "allowed_model_digests": [model.data.hex()],
        "allowed_runtime_events": [sha256(runtime_event.data).hex()],
        "ak": {
            "pinned_public_keys": [base64.b64encode(spki_der(runtime.attester.ak_public)).decode()]
        },
        "max_session_ttl_seconds": settings.session_ttl_seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(policy, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    log.warning("wrote a DEV-ONLY trust-on-first-use policy", extra={"path": str(path)})
