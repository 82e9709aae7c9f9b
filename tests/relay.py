"""A gRPC relay in front of a real server that can answer a call with a status of its own.

It forwards every call's raw bytes to the server (it cannot read sealed payloads) and, when
the plan says so, answers instead with a status carrying ErrorInfo and RetryInfo as the
server would, or forwards the first stream frame and then fails the stream. It records
each call's method and request bytes, so a test can count attempts and read request ids.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass
class Fault:
    """Answer with this status instead of forwarding (`after_frames`: forward that many
    stream messages first)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    retry_after: float | None = None
    after_frames: int = 0


@dataclass
class Relay:
    target: str
    plan: dict[str, list[Fault]] = field(default_factory=dict)
    """Method name (e.g. "Infer") -> faults for its next calls, in order."""
    calls: list[tuple[str, bytes]] = field(default_factory=list)
    metadata: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    """Each call's method and the metadata the client sent with it."""
    rewrite: dict[str, Callable[[bytes], bytes]] = field(default_factory=dict)
    """Method name -> a function applied to each request's bytes before forwarding."""
    rewrite_reply: dict[str, Callable[[bytes], bytes]] = field(default_factory=dict)
    rewrite_stream: dict[str, Callable[[int, bytes], bytes]] = field(default_factory=dict)
    """Method name -> a function of (index, message bytes) applied to each streamed reply."""
    """Method name -> a function applied to each unary reply's bytes before returning it."""
    address: str = ""
    _server: grpc.Server | None = None
    _channel: grpc.Channel | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Relay:
        self._channel = grpc.insecure_channel(self.target)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self._server.add_generic_rpc_handlers((_Handler(self),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
        if self._channel is not None:
            self._channel.close()

    def of(self, method: str) -> list[bytes]:
        """The request bytes of every call to `method` that reached the relay."""
        return [data for name, data in self.calls if name == method]

    def _next_fault(
        self, method: str, request: bytes, context: grpc.ServicerContext | None = None
    ) -> Fault | None:
        with self._lock:
            self.calls.append((method, request))
            if context is not None:
                sent = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
                self.metadata.append((method, sent))
            queue = self.plan.get(method, [])
            return queue.pop(0) if queue else None

    def _forwarded(self, method: str, request: bytes) -> bytes:
        change = self.rewrite.get(method)
        return change(request) if change is not None else request


def _abort(context: grpc.ServicerContext, fault: Fault) -> None:
    details = []
    if fault.reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=fault.reason, domain="encloud.v2"))
        details.append(info)
    if fault.retry_after is not None:
        delay = any_pb2.Any()
        seconds = int(fault.retry_after)
        delay.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=seconds, nanos=int((fault.retry_after - seconds) * 1e9)
                )
            )
        )
        details.append(delay)
    status = status_pb2.Status(code=fault.code.value[0], message=fault.message, details=details)
    context.abort_with_status(rpc_status.to_status(status))


def _relay_status(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
    if isinstance(error, grpc.Call):
        context.set_trailing_metadata(error.trailing_metadata() or ())
        context.abort(error.code(), error.details() or "")


def _passed_on(context: grpc.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The client's own metadata (the routing token), without gRPC's reserved keys."""
    return tuple(
        (k, v)
        for k, v in context.invocation_metadata()
        if k.startswith("encloud-") and isinstance(v, str)
    )


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        full = details.method
        name = full.rsplit("/", 1)[-1]
        relay = self._relay
        assert relay._channel is not None
        if name == "StreamInfer":
            upstream_stream = relay._channel.unary_stream(full)

            def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                fault = relay._next_fault(name, request, context)
                if fault is not None and fault.after_frames == 0:
                    _abort(context, fault)
                messages = upstream_stream(
                    relay._forwarded(name, request),
                    timeout=context.time_remaining(),
                    metadata=_passed_on(context),
                )
                change = relay.rewrite_stream.get(name)
                try:
                    for sent, message in enumerate(messages, start=1):
                        yield change(sent - 1, message) if change is not None else message
                        if fault is not None and sent >= fault.after_frames:
                            _abort(context, fault)
                except grpc.RpcError as error:  # the server's own status, details and all
                    _relay_status(context, error)

            return grpc.unary_stream_rpc_method_handler(stream)
        upstream: Any = relay._channel.unary_unary(full)

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            fault = relay._next_fault(name, request, context)
            if fault is not None:
                _abort(context, fault)
            try:
                reply, call = upstream.with_call(
                    relay._forwarded(name, request),
                    timeout=context.time_remaining(),
                    metadata=_passed_on(context),
                )
                context.send_initial_metadata(call.initial_metadata() or ())
            except grpc.RpcError as error:  # the server's own status, details and all
                _relay_status(context, error)
                raise
            change = relay.rewrite_reply.get(name)
            return change(reply) if change is not None else reply

        return grpc.unary_unary_rpc_method_handler(unary)
