"""Fixtures shared by the end-to-end, attack and service tests.

They build on each other: the exported model (cached across runs), a real
swtpm in a private folder, a real server process on loopback against it, and
a client whose channel records (or tampers with) every message on the wire.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from leftovers import kill_all, live_descendants
from marker_times import summary_lines
from stack import Stack, running_stack

from encloud.client import Client
from encloud.protocol.policy import Policy

os.environ.setdefault("TSS2_LOG", "all+NONE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


_durations: dict[str, float] = {}
_markers_of: dict[str, set[str]] = {}
_skipped: list[str] = []
# ./dev test sets it: there, a skipped test is a failure (a missing tool or environment
# must be installed by the set-up, not silently left out).
FAIL_ON_SKIP = os.environ.get("ENCLOUD_FAIL_ON_SKIP") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    registered = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for item in items:
        _markers_of[item.nodeid] = {m.name for m in item.iter_markers()} & registered


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _durations:
        terminalreporter.write_sep("=", "wall time per marker")
        for line in summary_lines(_durations, _markers_of):
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a test was skipped under ./dev test, or when a process a test
    started (a server, a swtpm) is still alive after every fixture was torn down (it is
    killed, so one run never leaves servers behind)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if FAIL_ON_SKIP and _skipped:
        if reporter is not None:
            reporter.write_sep("=", "skipped tests count as failures here", red=True)
            for nodeid in _skipped:
                reporter.write_line(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    leftovers = live_descendants()
    if not leftovers:
        return
    kill_all(leftovers)
    lines = [f"  pid {lf.pid}: {lf.command}" for lf in leftovers]
    message = "processes the tests started were still running (now killed):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_sep("=", "left running", red=True)
        reporter.write_line(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def cache_root() -> Path:
    return Path(os.environ.get("ENCLOUD_CACHE_ROOT", Path.home() / ".cache" / "encloud"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from encloud.server.inference.export import DEFAULT_PRECISION, export_model

    # The precision the server ships with, so the tests serve what users get.
    return export_model(None, cache_root(), DEFAULT_PRECISION, progress=lambda _: None)


NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.fixture(scope="session")
def node_client() -> str:
    """node, with clients/node's packages installed (npm ci from its lock, registry cache
    first) unless they are current: every test that runs the Node client asks for this."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: the Node client's tests need Node.js 20")
    lock = NODE_DIR / "package-lock.json"
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        npm = shutil.which("npm")
        assert npm is not None, "npm is missing"
        result = subprocess.run(
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return node


@pytest.fixture(scope="session")
def embeddings_model_dir() -> Path:
    """The embedded all-MiniLM-L6-v2, exported to ONNX (cached like the chat model)."""
    from encloud.server.inference.embeddings_export import export_embeddings_model

    return export_embeddings_model(cache_root(), progress=lambda _: None)


@pytest.fixture(scope="module")
def stack(model_dir: Path) -> Iterator[Stack]:
    """One server per test module (start-up loads the model: a few seconds)."""
    with (
        tempfile.TemporaryDirectory(prefix="encloud-test-") as tmp,
        running_stack(Path(tmp), model_dir) as running,
    ):
        yield running


@pytest.fixture
def fresh_stack(model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    """A server of the test's own, for tests that restart or kill it."""
    with running_stack(tmp_path, model_dir) as running:
        yield running


def sealed_by_client(session: Any, message_type: int, payload: bytes = b"") -> Any:
    """A client-to-server message sealed under a bound session's key with a fresh request
    id, as protobuf: for tests that send what the client library would not."""
    from encloud.protocol.v2 import encloud_pb2 as pb

    sealed = session.c2s.seal(message_type, session.take_request_id(), 0, payload)
    return pb.SealedMessage(
        type=sealed.type, request_id=sealed.request_id, seq=0, sealed=sealed.data
    )


# --- the wire --------------------------------------------------------------------


@dataclass
class Wire:
    """Every message a client sent and received, serialised, in order.

    `tamper` may replace a response (return a new message), or drop it
    (return None); it sees (method, message, index within the call).
    """

    sent: list[tuple[str, bytes]] = field(default_factory=list)
    received: list[tuple[str, Any]] = field(default_factory=list)
    tamper: Callable[[str, Any, int], Any] | None = None

    def all_bytes(self) -> bytes:
        return b"".join(data for _, data in self.sent) + b"".join(
            msg.SerializeToString() for _, msg in self.received
        )

    def received_of(self, method: str) -> list[Any]:
        return [msg for name, msg in self.received if name.endswith(method)]


class _StreamProxy:
    """Wraps a response stream: records (and maybe tampers with) each message."""

    def __init__(self, call: Any, wire: Wire, method: str) -> None:
        self._call = call
        self._wire = wire
        self._method = method
        self._iterator = self._messages()

    def _messages(self) -> Iterator[Any]:
        for index, message in enumerate(self._call):
            if self._wire.tamper is not None:
                message = self._wire.tamper(self._method, message, index)
                if message is None:
                    continue
            self._wire.received.append((self._method, message))
            yield message

    def __iter__(self) -> _StreamProxy:
        return self

    def __next__(self) -> Any:
        return next(self._iterator)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class RecordingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.wire.sent.append((details.method, request.SerializeToString()))
        outcome = continuation(details, request)
        try:
            response = outcome.result()
        except grpc.RpcError:
            return outcome
        if self.wire.tamper is not None:
            replaced = self.wire.tamper(details.method, response, 0)
            if replaced is not response:
                self.wire.received.append((details.method, replaced))
                return _Replaced(outcome, replaced)
        self.wire.received.append((details.method, response))
        return outcome

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.wire.sent.append((details.method, request.SerializeToString()))
        return _StreamProxy(continuation(details, request), self.wire, details.method)


class _Replaced:
    """A completed unary call whose response a test replaced.

    The intercepted channel only calls result() on what an interceptor returns;
    everything else is the real call's.
    """

    def __init__(self, outcome: Any, response: Any) -> None:
        self._outcome = outcome
        self._response = response

    def result(self, timeout: float | None = None) -> Any:
        return self._response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outcome, name)


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def connect(stack: Stack, wire: Wire, tmp_path: Path) -> Iterator[Callable[..., Client]]:
    """Makes clients of the module's server whose wire the test can see."""
    clients: list[Client] = []

    def make(policy: Policy | None = None, address: str | None = None) -> Client:
        channel = grpc.intercept_channel(
            grpc.insecure_channel(address or stack.address), RecordingInterceptor(wire)
        )
        client = Client(
            address or stack.address,
            policy or stack.policy,
            audit_log=tmp_path / "audit.jsonl",
            channel=channel,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
