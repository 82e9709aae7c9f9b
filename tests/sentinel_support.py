"""What Sentinel's tests and its benchmark share: an attested workload on a real swtpm (its
vTPM measured a model and a runtime, and wrote the dev policy that pins it)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from encloud.protocol.eventlog import EVENT_RUNTIME, ROLE_CHAT, WorkloadEvent, model_event
from encloud.protocol.evidence import Evidence
from encloud.server.attestation.startup import (
    AttestationConfig,
    AttestationRuntime,
    start_attestation,
)
from encloud.server.devstack import start_swtpm
from encloud.server.settings import Settings

MODEL = bytes.fromhex("11" * 32)
RUNTIME = b'{"engine":"sentinel-test"}'


@dataclass
class Workload:
    runtime: AttestationRuntime
    policy: bytes

    def quote(self, qualifying_data: bytes) -> Evidence:
        return self.runtime.attester.evidence(qualifying_data)


def attested_workload(root: Path, model: bytes) -> Iterator[Workload]:
    swtpm = start_swtpm(root / "tpm")
    defaults = Settings()
    config = AttestationConfig(
        tcti=swtpm.tcti,
        tpm_timeout_seconds=10.0,
        platform="swtpm",
        state_dir=root / "state",
        workload_pcr=defaults.workload_pcr,
        pcr_selection=list(defaults.pcr_selection),
        dev_policy_path=root / "policy.json",
    )
    runtime = start_attestation(
        config, [model_event(ROLE_CHAT, model), WorkloadEvent(EVENT_RUNTIME, RUNTIME)]
    )
    try:
        yield Workload(runtime, (root / "policy.json").read_bytes())
    finally:
        runtime.close()
        swtpm.stop()
