"""The one place where errors become gRPC statuses.

A DomainError becomes its own code with a google.rpc.Status carrying an
ErrorInfo (its reason) and, for RESOURCE_EXHAUSTED, a RetryInfo. Anything else
becomes INTERNAL with a generic message and a correlation id; the server log
gets the id, the exception type and where it was raised, never its message
(an exception message may quote a plaintext).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from encloud.protocol.faults import DomainError, Kind, rich_status
from encloud.server.metrics import Metrics

log = logging.getLogger("encloud.status")
# One line per RPC of the inference service (ENCLOUD_ACCESS_LOG=false turns it off).
access = logging.getLogger("encloud.access")

ERROR_DOMAIN = "encloud.v2"
STATUS_CODES: dict[Kind, grpc.StatusCode] = {kind: grpc.StatusCode[kind.value] for kind in Kind}
"""Each transport-neutral fault kind's gRPC status code: the only place they meet."""

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _rich_status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str], retry: float | None
) -> status_pb2.Status:
    return rich_status(Kind[code.name], message, reason, ERROR_DOMAIN, metadata, retry)


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    retry: float | None = None,
) -> None:
    status = _rich_status(code, message, reason, metadata or {}, retry)
    await context.abort_with_status(rpc_status.to_status(status))


async def abort_for(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Abort the RPC with the status for `error`. Always raises."""
    if isinstance(error, DomainError):
        await _abort(
            context,
            STATUS_CODES[error.kind],
            error.message,
            error.reason,
            metadata=error.metadata,
            retry=error.retry_after_seconds,
        )
    correlation_id = uuid.uuid4().hex
    frames = traceback.extract_tb(error.__traceback__)
    log.error(
        "unexpected error",
        extra={
            "correlation_id": correlation_id,
            "error_type": type(error).__name__,
            "where": [f"{frame.filename}:{frame.lineno}" for frame in frames[-5:]],
        },
    )
    await _abort(
        context,
        grpc.StatusCode.INTERNAL,
        f"internal error (correlation id {correlation_id})",
        "INTERNAL",
        metadata={"correlation_id": correlation_id},
    )


def _record(
    servicer: Any, method: str, started: float, code: grpc.StatusCode, reason: str = ""
) -> None:
    """Count the RPC and write its access-log line: method, status, duration, replica; never
    a size, a token count, a session or request id, or a peer address."""
    access.info(
        "rpc",
        extra={
            "method": method,
            "code": code.name,
            "reason": reason or code.name,
            "seconds": round(time.monotonic() - started, 4),
            "replica": getattr(servicer, "replica", ""),
        },
    )
    metrics: Metrics | None = getattr(servicer, "metrics", None)
    if metrics is None:
        return
    metrics.requests.labels(method, code.name).inc()
    if code is not grpc.StatusCode.OK:
        metrics.errors.labels(method, code.name, reason or code.name).inc()


def _outcome(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, DomainError):
        return STATUS_CODES[error.kind], error.reason
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "CANCELLED"
    return grpc.StatusCode.INTERNAL, "INTERNAL"


def unary_errors(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        started = time.monotonic()
        try:
            response = await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            _record(self, method, started, grpc.StatusCode.CANCELLED, "CANCELLED")
            raise
        except Exception as error:
            _record(self, method, started, *_outcome(error))
            await abort_for(context, error)
            raise  # unreachable: abort_for raises
        _record(self, method, started, grpc.StatusCode.OK)
        return response

    return wrapper


def stream_errors(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        try:
            async for item in handler(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            _record(self, method, started, grpc.StatusCode.CANCELLED, "CANCELLED")
            raise
        except Exception as error:
            _record(self, method, started, *_outcome(error))
            await abort_for(context, error)
            raise
        _record(self, method, started, grpc.StatusCode.OK)

    return wrapper
