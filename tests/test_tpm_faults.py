"""TPM faults through a real server: the TPM goes away, sessions go on, the TPM comes back.

- swtpm killed: Attest is UNAVAILABLE (TPM_UNAVAILABLE) while a session that
  already holds its key keeps chatting (sessions never need the TPM).
- swtpm restarted on the same state folder (a TPM reset: PCRs cleared, NV and
  seeds kept, so the same AK): the server measures the workload again into a
  new event log, and a new Attest passes full verification under the dev policy
  written before the fault.
- a server restarted on the same TPM appends a start-up to its log; a TPM reset
  followed by a server restart starts a new log (docs/ATTESTATION.md).
"""

from __future__ import annotations

import pytest

from encloud.client import Client
from encloud.protocol.errors import ServiceError

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.tpm]

ASK = [("user", "Say hello.")]


def _client(stack, tmp_path) -> Client:
    return Client(stack.address, stack.policy, audit_log=tmp_path / "audit.jsonl")


def test_tpm_gone_attest_unavailable_sessions_live_then_tpm_back(fresh_stack, tmp_path) -> None:
    stack = fresh_stack
    bound = _client(stack, tmp_path)
    first = bound.attest()
    bound.release_key()
    assert len(first.events) == 2

    stack.swtpm.kill()
    with _client(stack, tmp_path) as probe, pytest.raises(ServiceError) as info:
        probe.attest()
    assert (info.value.code, info.value.reason) == ("UNAVAILABLE", "TPM_UNAVAILABLE")
    answer = bound.infer(ASK, max_new_tokens=4)
    assert answer.completion.completion_tokens > 0

    stack.swtpm.start()  # same state folder: a TPM reset, same AK
    with _client(stack, tmp_path) as again:
        attestation = again.attest()  # the original dev policy, every check
    assert len(attestation.events) == 2  # a new log: the reset cleared the workload PCR
    assert attestation.ak_fingerprint == first.ak_fingerprint
    assert attestation.reset_count > first.reset_count  # the quote itself shows the reset
    assert bound.infer(ASK, max_new_tokens=4).completion.completion_tokens > 0
    bound.close()
    log = stack.workdir / "state" / "workload-eventlog.jsonl"
    assert log.with_name(log.name + ".prev").exists()


def test_server_restart_appends_and_tpm_reset_starts_a_new_log(fresh_stack, tmp_path) -> None:
    stack = fresh_stack
    stack.restart_server()
    with _client(stack, tmp_path) as client:
        assert len(client.attest().events) == 4  # two start-ups in one log

    stack.swtpm.restart()
    stack.restart_server()
    with _client(stack, tmp_path) as client:
        assert len(client.attest().events) == 2  # the reset started a new log
