"""Sentinel's one place where errors become gRPC statuses (the blocking server's twin of
encloud.server.status): a DomainError becomes its code with a google.rpc.Status carrying an
ErrorInfo (reason and metadata); anything else is INTERNAL with a correlation id, whose type
and place go to the log, never its message."""

from __future__ import annotations

import functools
import logging
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from encloud.protocol.faults import DomainError, Kind, rich_status

log = logging.getLogger("encloud.sentinel.status")
access = logging.getLogger("encloud.sentinel.access")

ERROR_DOMAIN = "encloud.sentinel.v1"
STATUS_CODES: dict[Kind, grpc.StatusCode] = {kind: grpc.StatusCode[kind.value] for kind in Kind}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _status(error: BaseException) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    if isinstance(error, DomainError):
        code, message, reason, metadata = (
            STATUS_CODES[error.kind],
            error.message,
            error.reason,
            error.metadata,
        )
    else:
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
        code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
        message = f"internal error (correlation id {correlation_id})"
        metadata = {"correlation_id": correlation_id}
    retry = error.retry_after_seconds if isinstance(error, DomainError) else None
    return (
        code,
        reason,
        rich_status(Kind[code.name], message, reason, ERROR_DOMAIN, metadata, retry),
    )


def unary_errors(
    handler: Callable[[Any, Req, grpc.ServicerContext], Resp],
) -> Callable[[Any, Req, grpc.ServicerContext], Resp]:
    """Wrap a blocking unary handler: one access-log line per call, faults to statuses."""
    method = handler.__name__

    @functools.wraps(handler)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        started = time.monotonic()
        try:
            response = handler(self, request, context)
        except Exception as error:  # every failure leaves as a status, never a traceback
            code, reason, status = _status(error)
            _access(method, code, reason, started)
            context.abort_with_status(rpc_status.to_status(status))
            raise  # unreachable: abort_with_status raises
        _access(method, grpc.StatusCode.OK, "OK", started)
        return response

    return wrapper


def refuse(context: grpc.ServicerContext, method: str, error: BaseException) -> None:
    """Answer a call with the status for `error` before its handler ran (a request that does
    not parse). Always raises."""
    code, reason, status = _status(error)
    _access(method, code, reason, time.monotonic())
    context.abort_with_status(rpc_status.to_status(status))


def _access(method: str, code: grpc.StatusCode, reason: str, started: float) -> None:
    access.info(
        "rpc",
        extra={
            "method": method,
            "code": code.name,
            "reason": reason,
            "seconds": round(time.monotonic() - started, 4),
        },
    )
