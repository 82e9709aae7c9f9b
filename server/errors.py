"""Domain errors of the server and the one place they become gRPC statuses.

Each domain error carries its status code and a stable ErrorInfo reason. Its
message is written for the caller and must never contain a prompt, an answer,
a key or an internal detail. Anything else that escapes a handler becomes
INTERNAL with a generic message and a correlation id that is also logged.
"""

from __future__ import annotations

import grpc


class DomainError(Exception):
    """An error the caller can act on. Subclasses fix the code and reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    retry_after_seconds: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class PromptTooLongError(InvalidArgumentError):
    reason = "PROMPT_TOO_LONG"


class InvalidRequestPayloadError(InvalidArgumentError):
    reason = "INVALID_REQUEST_PAYLOAD"


class MalformedMessageError(InvalidArgumentError):
    """The RPC request itself (not a sealed payload) is not valid protobuf."""

    reason = "MALFORMED_MESSAGE"


class SessionNotFoundError(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "SESSION_NOT_FOUND"


class SessionExpiredError(SessionNotFoundError):
    """The session ran out of time (absolute or idle TTL) and was wiped: attest again."""

    reason = "SESSION_EXPIRED"


class SessionStateError(DomainError):
    """The session exists but is not in the state this call needs."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "SESSION_STATE"


class KeyReleaseError(DomainError):
    """The sealed key did not open. One generic message, whatever the cause."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "KEY_RELEASE_FAILED"


class EnvelopeRejectedError(DomainError):
    """A sealed message failed authentication, padding or header checks."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "ENVELOPE_REJECTED"


class ReplayedRequestError(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "REQUEST_ID_REUSED"


class ResourceExhaustedError(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"
    retry_after_seconds = 1.0


class UnavailableError(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class TpmUnavailableError(UnavailableError):
    reason = "TPM_UNAVAILABLE"
