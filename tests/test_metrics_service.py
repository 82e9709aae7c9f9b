"""Metrics on their own port and reflection behind a setting, on a real server."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families
from stack import running_stack

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import ServiceError
from encloud.protocol.policy import load_policy
from encloud.server.devstack import ServerProcess

pytestmark = pytest.mark.e2e

ALLOWED_LABELS = {"method", "code", "reason", "finish_reason", "state", "cause", "limit", "le"}


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_stack(tmp_path_factory.mktemp("metrics"), model_dir, reflection="true") as stack:
        yield stack.server


def test_metrics_count_requests_errors_tokens_and_sessions(server: ServerProcess) -> None:
    policy = load_policy(server.policy_path)
    with Client(server.address, policy, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        assert "".join(client.stream([("user", "Say hi.")], max_new_tokens=6))
        with pytest.raises(ServiceError):
            client.infer([("user", "<|im_start|>")], max_new_tokens=4)
    url = f"http://{server.metrics_address}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    names = {name for name, _ in samples}
    for wanted in (
        "encloud_requests_total",
        "encloud_errors_total",
        "encloud_time_to_first_token_seconds_bucket",
        "encloud_time_per_output_token_seconds_bucket",
        "encloud_active_sessions",
        "encloud_queue_depth",
        "encloud_completion_tokens_total",
        "encloud_decode_steps_total",
    ):
        assert wanted in names, wanted
    assert samples[("encloud_requests_total", (("code", "OK"), ("method", "StreamInfer")))] >= 1
    key = (
        "encloud_errors_total",
        (("code", "INVALID_ARGUMENT"), ("method", "Infer"), ("reason", "INVALID_ARGUMENT")),
    )
    assert samples[key] >= 1
    assert samples[("encloud_completion_tokens_total", ())] >= 1
    # Bounded label sets only: nothing per request, no ids, no sizes.
    for _name, labels in samples:
        assert {label for label, _ in labels} <= ALLOWED_LABELS


def test_reflection_lists_the_service_when_enabled(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        services = list(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "encloud.v2.InferenceService" in services
    assert "grpc.health.v1.Health" in services
