"""Faults through a real server process: cancel, disconnect, deadline, SIGKILL, SIGTERM.

Cancellation is measured in decode steps, not seconds: the server counts every
generation the engine stopped on a cancel (encloud_cancels_total) and those in which
more than one decode step ran after the cancel reached it (encloud_cancel_overruns_total);
the engine checks `should_stop` before each step, so at most the one step in flight may
finish.
"""

from __future__ import annotations

import base64
import os
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import ServiceError, TruncatedStreamError
from encloud.protocol.policy import load_policy
from encloud.server.devstack import ServerProcess, start_swtpm

pytestmark = pytest.mark.faults

LONG_PROMPT = "Write a very long story about a dragon who learns to bake bread. Use many chapters."
LONG = {"max_new_tokens": 400}


def metric_samples(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def wait_idle(address: str, rounds: int = 200) -> dict[str, float]:
    """Poll (bounded) until no generation runs or waits; returns the last samples."""
    for _ in range(rounds):
        samples = metric_samples(address)
        if (
            samples.get("encloud_running_generations{}", 0) == 0
            and samples.get("encloud_queue_depth{}", 0) == 0
        ):
            return samples
        time.sleep(0.05)
    raise AssertionError("generations did not end")


def cancel_steps(samples: dict[str, float]) -> tuple[float, float]:
    """(cancelled generations, of which with at most one step after the cancel)."""
    cancels = samples.get("encloud_cancels_total{}", 0.0)
    return cancels, cancels - samples.get("encloud_cancel_overruns_total{}", 0.0)


class Server:
    def __init__(self, root: Path, model_dir: Path, **settings: object) -> None:
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.swtpm = start_swtpm(root / "swtpm")
        self.process = ServerProcess(
            root, self.swtpm.tcti, model_dir, extra_env={"TMPDIR": str(self.tmp)}, **settings
        )

    def start(self) -> str:
        address = self.process.start()
        self.policy = load_policy(self.process.policy_path)
        return address

    def client(self, **kwargs: object) -> Client:
        client = Client(self.process.address, self.policy, audit_log=NO_AUDIT, **kwargs)  # type: ignore[arg-type]
        client.attest()
        client.release_key()
        return client

    def close(self) -> None:
        self.process.kill()
        self.swtpm.stop()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="encloud-faults-") as tmp:
        running = Server(Path(tmp), model_dir)
        running.start()
        yield running
        running.close()


@pytest.fixture
def own_server(model_dir: Path, tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path, model_dir, shutdown_grace_seconds=3, shutdown_notice_seconds=1)
    yield running
    running.close()


def test_client_cancel_stops_within_one_decode_step_and_frees_the_slot(server: Server) -> None:
    metrics = server.process.metrics_address
    before = cancel_steps(wait_idle(metrics))
    with server.client() as client:
        stream = client.stream([("user", LONG_PROMPT)], **LONG)
        pieces = iter(stream)
        received = [next(pieces) for _ in range(5)]
        assert all(received)
        stream.cancel()
        with pytest.raises(ServiceError) as cancelled:
            list(pieces)
        assert cancelled.value.code == "CANCELLED"
        after = cancel_steps(wait_idle(metrics))
        assert after[0] == before[0] + 1, "the cancel did not reach the engine"
        assert after[1] == before[1] + 1, "more than one decode step ran after the cancel"
        # The slot is free: the same session takes max_streams_per_session new calls.
        answer = client.infer([("user", "Say yes.")], max_new_tokens=4)
        assert answer.completion.finish_reason in {"stop", "length"}


def test_client_disconnect_stops_the_generation(server: Server) -> None:
    metrics = server.process.metrics_address
    before = cancel_steps(wait_idle(metrics))
    channel = grpc.insecure_channel(server.process.address)
    client = Client(server.process.address, server.policy, channel=channel, audit_log=NO_AUDIT)
    client.attest()
    client.release_key()
    pieces = iter(client.stream([("user", LONG_PROMPT)], **LONG))
    next(pieces)
    next(pieces)
    channel.close()  # the TCP connection goes away mid-stream
    after = cancel_steps(wait_idle(metrics))
    assert after[0] == before[0] + 1
    assert after[1] == before[1] + 1
    client._drop_session()


def test_passed_deadline_stops_the_generation(server: Server) -> None:
    metrics = server.process.metrics_address
    before = cancel_steps(wait_idle(metrics))
    with server.client(timeout=60.0) as client:
        with pytest.raises(ServiceError) as expired:
            # this call's own deadline: far shorter than 400 tokens take
            list(client.stream([("user", LONG_PROMPT)], timeout=0.5, **LONG))
        assert expired.value.code == "DEADLINE_EXCEEDED"
        after = cancel_steps(wait_idle(metrics))
        assert after[0] == before[0] + 1
        assert after[1] == before[1] + 1


def _forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret)]


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(form in data for form in _forms(needle)):
                hits.append(path)
    return hits


def test_sigkill_mid_stream_gives_unavailable_and_leaves_no_plaintext(
    own_server: Server, tmp_path: Path
) -> None:
    own_server.start()
    canary = f"canary-{os.urandom(8).hex()}"
    # Positive control: the same scan finds the canary where it is planted.
    control = tmp_path / "control"
    control.mkdir()
    (control / "planted.bin").write_bytes(b"x" + base64.b64encode(canary.encode()) + b"y")
    assert _files_containing(control, canary.encode())

    client = own_server.client()
    stream = client.stream([("user", f"{LONG_PROMPT} {canary}")], **LONG)
    pieces = iter(stream)
    next(pieces)
    assert own_server.process.process is not None
    own_server.process.process.send_signal(signal.SIGKILL)
    own_server.process.process.wait()
    with pytest.raises(TruncatedStreamError, match="UNAVAILABLE"):
        list(pieces)  # the connection broke after frames: an incomplete answer
    with pytest.raises(ServiceError) as refused:
        client.infer([("user", canary)], max_new_tokens=4)
    assert refused.value.code == "UNAVAILABLE"
    client._drop_session()
    # Nothing in the server's working folder (log, state, swtpm state) or its TMPDIR.
    assert not _files_containing(tmp_path / "state", canary.encode())
    assert not [p for p in _files_containing(tmp_path, canary.encode()) if control not in p.parents]


def test_sigterm_drains_then_cancels_with_a_sealed_final_and_exits_zero(
    own_server: Server,
) -> None:
    own_server.process.launch()
    early = own_server.process.listening_address()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(early))
    # Listening, but the model and TPM are not ready: NOT_SERVING (or not up yet).
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    own_server.process.wait_ready()
    own_server.policy = load_policy(own_server.process.policy_path)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    client = own_server.client()
    stream = client.stream([("user", LONG_PROMPT)], max_new_tokens=2000)
    pieces = iter(stream)
    next(pieces)
    text: list[str] = []
    reader = threading.Thread(target=lambda: text.extend(pieces))
    reader.start()
    assert own_server.process.process is not None
    own_server.process.process.send_signal(signal.SIGTERM)
    # Within shutdown_notice_seconds health answers, NOT_SERVING, while the stream still runs.
    wait_for(
        lambda: (
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        ),
        "health turning NOT_SERVING",
        seconds=30,
    )
    assert reader.is_alive()
    reader.join(timeout=60)
    assert not reader.is_alive()
    # The stream ended with a valid sealed final frame (transcript checked by the client).
    assert stream.completion is not None
    assert stream.completion.finish_reason in {"cancelled", "length", "stop"}
    assert own_server.process.process.wait(timeout=60) == 0
    log = own_server.process.log_text()
    assert "stopped; session keys wiped" in log
    client._drop_session()


def test_end_session_while_its_infer_waits_for_the_engine(model_dir: Path, tmp_path: Path) -> None:
    """EndSession reaches an Infer that has not started yet: the Infer is answered at once
    with a sealed `cancelled` answer, and EndSession does not wait for the engine."""
    running = Server(tmp_path, model_dir, max_batch=1)
    try:
        running.start()
        metrics = running.process.metrics_address
        busy, waiting = running.client(), running.client()
        stream = busy.stream([("user", LONG_PROMPT)], max_new_tokens=300)
        pieces = iter(stream)
        assert next(pieces)  # the engine's one row is taken
        answers: list[object] = []

        def ask() -> None:
            try:
                answers.append(waiting.infer([("user", "Say hi.")], max_new_tokens=8))
            except Exception as error:
                answers.append(error)

        asker = threading.Thread(target=ask)
        asker.start()
        wait_for(
            lambda: metric_samples(metrics).get("encloud_queue_depth{}", 0) == 1,
            "the Infer queueing",
        )
        waiting.end_session(timeout=30)
        stream.cancel()  # frees the row (only matters when the Infer still waits)
        asker.join(timeout=60)
        assert not asker.is_alive()
        (answer,) = answers
        assert not isinstance(answer, Exception), answer
        assert answer.completion.finish_reason == "cancelled"  # type: ignore[attr-defined]
        assert answer.text == ""  # type: ignore[attr-defined]
        busy.close()
    finally:
        running.close()
