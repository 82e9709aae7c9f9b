"""Prometheus metrics, served on their own port (settings.metrics_port).

Labels are bounded and never carry content: the RPC method, the status code
name, how a generation ended. No series holds a size or a token count, not even as a
server-wide total: on a quiet server a total moves by exactly one request's sealed usage
(docs/OPERATIONS.md). Every series but the timing histograms moves by the same amount for
a 5-token and a 500-token request (tests/test_metrics_service.py). Timings are the one
side channel left, and they are as visible to anyone watching the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# The process's memory moves with what it holds, and so with the size of the requests in
# flight: left to the platform (cgroup metrics), which reports it per container anyway.
_PROCESS_SERIES_KEPT = {
    "process_cpu_seconds",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
}


class _ProcessWithoutMemory(Collector):
    def __init__(self) -> None:
        self._inner = ProcessCollector(registry=None)

    def collect(self) -> Iterable[Metric]:
        return [m for m in self._inner.collect() if m.name in _PROCESS_SERIES_KEPT]


_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """One registry per server, so tests and embedders never share global state."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "encloud_requests",
            "RPCs finished, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.errors = Counter(
            "encloud_errors",
            "RPCs that ended with a status other than OK, by method, code and ErrorInfo reason.",
            ["method", "code", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "encloud_time_to_first_token_seconds",
            "From admission of a generation to its first text piece.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "encloud_time_per_output_token_seconds",
            "Mean time between text pieces of one generation, after the first.",
            buckets=_TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "encloud_generation_seconds",
            "From admission to the end of a generation.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "encloud_generations",
            "Generations ended: completed (an end token, a stop string or the token limit: "
            "which one says something about the answer, so they are one value), cancelled "
            "or error.",
            ["finish_reason"],
            registry=r,
        )
        self.embed_requests = Counter(
            "encloud_embed_requests",
            "Embed requests ended: completed, or error (no count of texts or tokens: those "
            "describe the plaintext).",
            ["outcome"],
            registry=r,
        )
        self.embed_seconds = Histogram(
            "encloud_embed_seconds",
            "From admission to the sealed response of an Embed request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cancels = Counter(
            "encloud_cancels",
            "Generations the engine stopped on a cancel (client cancel, disconnect, "
            "deadline, EndSession, shutdown).",
            registry=r,
        )
        self.cancel_overruns = Counter(
            "encloud_cancel_overruns",
            "Cancelled generations in which more than one decode step ran after the cancel "
            "reached the engine (0 while cancellation works: the step in flight may finish).",
            registry=r,
        )
        self.active_sessions = Gauge(
            "encloud_active_sessions",
            "Sessions alive, by state (pending: no key yet; bound: key released).",
            ["state"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "encloud_sessions_ended",
            "Sessions dropped and wiped, by cause.",
            ["cause"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "encloud_queue_depth",
            "Admitted generations waiting for the engine.",
            registry=r,
        )
        self.running = Gauge(
            "encloud_running_generations",
            "Generations the engine is working on.",
            registry=r,
        )
        self.admission_rejected = Counter(
            "encloud_admission_rejected",
            "Calls refused with RESOURCE_EXHAUSTED, by limit.",
            ["limit"],
            registry=r,
        )

        r.register(_ProcessWithoutMemory())

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[ThreadingHTTPServer, int]:
        """Serve GET /metrics (and nothing else: every other path is 404) from a daemon
        thread; returns (server, port). OSError when the address is taken."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                body = metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes are not logged

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server, int(server.server_address[1])
