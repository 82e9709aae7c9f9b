"""The runtime event measures what runs: every setting is classified measured or not, with a
reason; the measured ones and the engine's own facts make the event; changing a measured
setting changes the event, and a policy written for the old value then refuses the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic.fields import FieldInfo
from stack import Stack, running_stack

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import RuntimeNotAllowedError
from encloud.protocol.eventlog import (
    EVENT_RUNTIME,
    ROLE_CHAT,
    WorkloadEvent,
    canonical_json,
    model_event,
)
from encloud.protocol.policy import Policy, load_policy
from encloud.protocol.verifier import verify
from encloud.server.attestation.startup import AttestationConfig, start_attestation
from encloud.server.attestation.swtpm import Swtpm
from encloud.server.attestation.tpm import Tpm
from encloud.server.settings import Settings

# What the engine reports about itself, fixed here: these tests are about the settings.
ENGINE_FACTS: dict[str, Any] = {
    "engine": "onnxruntime-genai",
    "versions": {"onnxruntime-genai": "0.0.0", "onnxruntime": "0.0.0"},
    "precision": "q4_1-native",
    "known_answer": "00" * 32,
}
MODEL_DIGEST = bytes(range(32))


def _classification(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _measured_fields() -> list[str]:
    return [n for n, f in Settings.model_fields.items() if _classification(f).get("measured")]


@pytest.mark.unit
def test_every_setting_says_whether_it_is_measured_and_why() -> None:
    unclassified = [
        name
        for name, field in Settings.model_fields.items()
        if not isinstance(_classification(field).get("measured"), bool)
        or not str(_classification(field).get("why", "")).strip()
    ]
    assert not unclassified, f"classify these settings (measured or not, and why): {unclassified}"
    assert {"default_max_new_tokens", "max_new_tokens_limit", "threads"} <= set(_measured_fields())


def _another_value(name: str, field: FieldInfo, value: object) -> object:
    """A different valid value of the field."""
    if typing.get_origin(field.annotation) is typing.Literal or "Literal" in str(field.annotation):
        choices = typing.get_args(field.annotation)
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value - 1 if value > 1 else value + 1
    if isinstance(value, float):
        return value * 2
    if value is None:
        return 100
    raise AssertionError(f"pick another value for {name} ({value!r}) in this test")


def _runtime_event_bytes(settings: Settings) -> bytes:
    from encloud.server.runtime_event import runtime_event

    return canonical_json(runtime_event(settings, ENGINE_FACTS))


@pytest.mark.unit
def test_the_event_holds_the_measured_settings_and_the_engine_facts() -> None:
    from encloud.server.runtime_event import runtime_event

    settings = Settings(default_max_new_tokens=64, max_new_tokens_limit=100)
    event = runtime_event(settings, ENGINE_FACTS)
    assert event["settings"]["default_max_new_tokens"] == 64
    assert event["settings"]["max_new_tokens_limit"] == 100
    assert set(event["settings"]) == set(_measured_fields())
    assert event["engine"] == ENGINE_FACTS


class _Measurer:
    """Measures a server's start-up with given settings on a fresh boot of one machine:
    each boot is a copy of the same manufactured swtpm state (so the same AK, PCRs from
    zero, and no unorderly-shutdown count piling up towards a DA lockout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.template = root / "manufactured"
        swtpm = Swtpm(self.template).start()
        Tpm.open(swtpm.tcti).close()  # the seeds are made and saved on first use
        swtpm.stop()
        self.boots = 0

    def policy(self, settings: Settings) -> Policy:
        path = self.root / "policy.json"
        with self._boot() as swtpm:
            start_attestation(self._config(swtpm, settings, path), _events(settings)).close()
        return load_policy(path)

    def verify(self, settings: Settings, policy: Policy) -> None:
        with self._boot() as swtpm:
            runtime = start_attestation(self._config(swtpm, settings, None), _events(settings))
            try:
                q = os.urandom(32)
                evidence = runtime.attester.evidence(q)
            finally:
                runtime.close()
        verify(evidence, policy, expected_qualifying_data=q, session_ttl_seconds=60)

    @contextlib.contextmanager
    def _boot(self) -> Iterator[Swtpm]:
        self.boots += 1
        state = self.root / f"boot-{self.boots}"
        shutil.copytree(self.template, state, ignore=shutil.ignore_patterns("*.sock*", "*.log"))
        swtpm = Swtpm(state).start()
        try:
            yield swtpm
        finally:
            swtpm.stop()

    def _config(
        self, swtpm: Swtpm, settings: Settings, policy_path: Path | None
    ) -> AttestationConfig:
        return AttestationConfig(
            tcti=swtpm.tcti,
            tpm_timeout_seconds=10.0,
            platform="swtpm",
            state_dir=self.root / f"state-{self.boots}",
            workload_pcr=settings.workload_pcr,
            pcr_selection=list(settings.pcr_selection),
            dev_policy_path=policy_path,
            session_ttl_seconds=settings.session_ttl_seconds,
        )


def _events(settings: Settings) -> list[WorkloadEvent]:
    return [
        model_event(ROLE_CHAT, MODEL_DIGEST),
        WorkloadEvent(EVENT_RUNTIME, _runtime_event_bytes(settings)),
    ]


@pytest.fixture
def measurer(tmp_path: Path) -> _Measurer:
    return _Measurer(tmp_path)


@pytest.mark.tpm
def test_each_measured_setting_changes_the_event_and_the_old_policy_refuses(
    measurer: _Measurer,
) -> None:
    base = Settings()
    policy = measurer.policy(base)
    measurer.verify(base, policy)  # control: the same settings verify
    fields = _measured_fields()
    assert fields
    for name in fields:
        field = Settings.model_fields[name]
        changed = base.model_copy(update={name: _another_value(name, field, getattr(base, name))})
        Settings.model_validate(changed.model_dump())  # still a valid configuration
        assert _runtime_event_bytes(changed) != _runtime_event_bytes(base), name
        with pytest.raises(RuntimeNotAllowedError):
            measurer.verify(changed, policy)


@pytest.mark.e2e
def test_a_server_restarted_with_other_limits_is_refused_by_its_old_policy(
    model_dir: Path, tmp_path: Path
) -> None:
    """The review's reproduction: new decoding limits gave a byte-identical dev policy."""
    with running_stack(tmp_path, model_dir) as stack:
        old_policy, old_text = stack.policy, stack.server.policy_path.read_bytes()
        _restart(stack, default_max_new_tokens=64, max_new_tokens_limit=100)
        assert stack.server.policy_path.read_bytes() != old_text
        # The log holds both start-ups; the new dev policy pins both, the old one only the first.
        old_events = set(old_policy.allowed_runtime_events)
        assert old_events < set(stack.policy.allowed_runtime_events)
        with (
            Client(stack.address, old_policy, audit_log=NO_AUDIT) as client,
            pytest.raises(RuntimeNotAllowedError),
        ):
            client.attest()
        with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
            answer = client.infer([("user", "Count to a thousand.")])
            assert answer.completion.completion_tokens <= 64


def _restart(stack: Stack, **settings: object) -> None:
    stack.restart_server(**settings)
    stack.policy = load_policy(stack.server.policy_path)
