"""Metrics on their own port and reflection behind a setting, on a real server."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from stack import running_stack
from tokenizers import Tokenizer
from waiting import metric, wait_for
from waiting import samples as all_samples

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


def test_metrics_count_requests_errors_generations_and_sessions(server: ServerProcess) -> None:
    policy = load_policy(server.policy_path)
    with Client(server.address, policy, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        assert "".join(client.stream([("user", "Say hi.")], max_new_tokens=6))
        with pytest.raises(ServiceError):
            client.infer([("user", "<|im_start|>")], max_new_tokens=4)
    samples = all_samples(server.metrics_address)
    names = {name for name, _ in samples}
    for wanted in (
        "encloud_requests_total",
        "encloud_errors_total",
        "encloud_time_to_first_token_seconds_bucket",
        "encloud_time_per_output_token_seconds_bucket",
        "encloud_active_sessions",
        "encloud_queue_depth",
        "encloud_generations_total",
        "encloud_cancels_total",
    ):
        assert wanted in names, wanted
    assert samples[("encloud_requests_total", (("code", "OK"), ("method", "StreamInfer")))] >= 1
    key = (
        "encloud_errors_total",
        (("code", "INVALID_ARGUMENT"), ("method", "Infer"), ("reason", "INVALID_ARGUMENT")),
    )
    assert samples[key] >= 1
    assert samples[("encloud_generations_total", (("finish_reason", "completed"),))] >= 1
    # Bounded label sets only: nothing per request, no ids, no sizes.
    for _name, labels in samples:
        assert {label for label, _ in labels} <= ALLOWED_LABELS


def _quiet_samples(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    """The samples once nothing runs or waits (polled, bounded)."""
    address = server.metrics_address
    wait_for(
        lambda: (
            metric(address, "encloud_running_generations") == 0
            and metric(address, "encloud_queue_depth") == 0
        ),
        "generations to end",
        seconds=30,
    )
    return all_samples(address)


def _is_timing(name: str) -> bool:
    return "_seconds" in name or name.endswith("_created")


def _moved(before: dict, after: dict) -> dict:
    """Every non-timing series' change (a new series counts from 0)."""
    keys = {k for k in (*before, *after) if not _is_timing(k[0])}
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


def test_a_short_and_a_long_request_move_every_series_but_timings_alike(
    server: ServerProcess, model_dir: Path
) -> None:
    """Sizes live inside the envelope only: a 5-token and a 500-token prompt (with answers
    of different lengths) leave the same trace in every counter and gauge."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    short = "Hi there"
    long = "Here is a list: " + "apple " * 500 + "\nWhat fruit is it? Answer in a sentence."
    assert len(tokenizer.encode(short).ids) <= 5 and len(tokenizer.encode(long).ids) >= 500
    policy = load_policy(server.policy_path)
    with Client(server.address, policy, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        moves = []
        for text, max_new in ((short, 3), (long, 40)):
            before = _quiet_samples(server)
            answer = client.infer([("user", text)], max_new_tokens=max_new)
            moves.append((answer.completion, _moved(before, _quiet_samples(server))))
    (short_usage, short_moved), (long_usage, long_moved) = moves
    assert short_usage.prompt_tokens + 400 < long_usage.prompt_tokens  # sealed usage differs
    assert short_usage.completion_tokens != long_usage.completion_tokens
    assert short_moved == long_moved, {
        k: (short_moved.get(k), long_moved.get(k))
        for k in short_moved.keys() | long_moved.keys()
        if short_moved.get(k) != long_moved.get(k)
    }


def test_reflection_lists_the_service_when_enabled(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        services = list(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "encloud.v2.InferenceService" in services
    assert "grpc.health.v1.Health" in services
    assert {
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)


def test_reflection_answers_under_v1_as_grpcurl_asks_first(server: ServerProcess) -> None:
    """grpc.reflection.v1 (wire-identical to v1alpha): list services, then the file of one."""
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        asks = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="encloud.v2.InferenceService"
            ),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
        ]
        listed, described, itself = list(call(iter(asks), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert "encloud.v2.InferenceService" in names
    assert described.file_descriptor_response.file_descriptor_proto
    assert itself.file_descriptor_response.file_descriptor_proto


def test_metrics_only_at_metrics_with_process_series_but_no_memory(server: ServerProcess) -> None:
    base = f"http://{server.metrics_address}"
    for path in ("/", "/other", "/metrics/x"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=10)
        assert refused.value.code == 404
    names = {name for name, _ in all_samples(server.metrics_address)}
    assert {"process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds"} <= names
    assert not {n for n in names if "memory" in n}  # it moves with what requests hold


def test_the_access_log_has_one_line_per_rpc_and_nothing_about_the_request(
    server: ServerProcess,
) -> None:
    import json

    before = len(server.log_path.read_text().splitlines())
    policy = load_policy(server.policy_path)
    with Client(server.address, policy, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        client.infer([("user", "Say hi.")], max_new_tokens=4)
    lines = [json.loads(x) for x in server.log_path.read_text().splitlines()[before:] if x]
    access = [e for e in lines if e.get("logger") == "encloud.access"]
    assert [e["method"] for e in access] == ["Attest", "ReleaseKey", "Infer", "EndSession"]
    for entry in access:
        assert set(entry) == {
            "time",
            "level",
            "logger",
            "message",
            "method",
            "code",
            "reason",
            "seconds",
            "replica",
        }
        assert entry["code"] == "OK" and entry["replica"] and entry["seconds"] >= 0
