"""gRPC statuses back into encloud's errors: the client's mirror of encloud.server.status."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from encloud.protocol.errors import (
    SENTINEL_ERRORS,
    EncloudError,
    ServiceError,
    TruncatedStreamError,
)
from encloud.protocol.faults import status_details

# Statuses that, without the server's ErrorInfo, mean the transport broke (a crash, a reset
# connection, a proxy ending the HTTP/2 stream without trailers).
_BROKEN = frozenset({"UNAVAILABLE", "UNKNOWN", "INTERNAL"})


def service_error(error: grpc.RpcError) -> ServiceError:
    """A failed call as a ServiceError: the status code, the server's message, and the
    ErrorInfo reason and RetryInfo delay from the google.rpc.Status trailer when present
    (grpc.aio's AioRpcError has the same accessors as a blocking call)."""
    return ServiceError(*_details(error))


def sentinel_error(error: grpc.RpcError) -> ServiceError:
    """A failed call to Sentinel as its typed error (SENTINEL_ERRORS by ErrorInfo reason,
    with the ErrorInfo metadata); a plain ServiceError for any other status."""
    code, message, reason, retry, metadata = _details(error)
    typed = SENTINEL_ERRORS.get(reason, ServiceError)
    return typed(code, message, reason, retry, metadata)


def _details(error: grpc.RpcError) -> tuple[str, str, str, float | None, dict[str, str]]:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or ""
    try:
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    except (ValueError, DecodeError):  # a trailer that contradicts the status or is garbage
        status = None
    reason, metadata, retry = status_details(status)
    return code.name, message, reason, retry, metadata


def after_frames(failure: ServiceError, frames: int) -> EncloudError:
    """What a stream that failed after `frames` frames raises: the server's own status when
    it sent one (ErrorInfo reason), the caller's cancel or deadline as it is, and a
    TruncatedStreamError when the transport broke: the answer is incomplete, whichever way
    the connection said so (UNAVAILABLE from a crashed server, UNKNOWN through a proxy)."""
    if failure.code in _BROKEN and not failure.reason:
        return TruncatedStreamError(
            f"the stream broke after {frames} frame(s), before its final frame "
            f"({failure.code}: {failure})"
        )
    return failure
