"""The faults a server reports, transport-neutral: a kind and a stable reason.

Each fault's kind is one of the canonical error kinds (the google.rpc.Code
names, which gRPC and HTTP/JSON gateways share) and its reason the stable
ErrorInfo reason of docs/ERRORS.md. The transport picks its status code at
the edge (encloud.server.status for gRPC); the server's lower layers raise
these without knowing any transport. The message is written for the caller and
must never contain a prompt, an answer, a key, a size of either or an internal
detail. Anything else that escapes a handler becomes INTERNAL with a generic
message and a correlation id that is also logged.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


class Kind(enum.Enum):
    """Canonical error kinds (google.rpc.Code names)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


def rich_status(
    kind: Kind,
    message: str,
    reason: str,
    domain: str,
    metadata: Mapping[str, str] | None = None,
    retry_after_seconds: float | None = None,
) -> status_pb2.Status:
    """The google.rpc.Status of a fault: its code, message, an ErrorInfo (reason, domain,
    metadata) and, when the caller may retry after a delay, a RetryInfo. Every encloud service
    (the inference server, Sentinel) answers errors this one way; client/_status.py reads it."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata or {}))
    details = [info]
    if retry_after_seconds is not None:
        seconds = int(retry_after_seconds)
        delay = any_pb2.Any()
        delay.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=seconds, nanos=int((retry_after_seconds - seconds) * 1e9)
                )
            )
        )
        details.append(delay)
    return status_pb2.Status(code=code_pb2.Code.Value(kind.value), message=message, details=details)


def status_details(
    status: status_pb2.Status | None,
) -> tuple[str, dict[str, str], float | None]:
    """What rich_status put in a google.rpc.Status: (ErrorInfo reason, its metadata, the
    RetryInfo delay or None); ("", {}, None) for none. The one reader: the clients' and the
    server's when it relays Sentinel."""
    reason, metadata, retry = "", {}, None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        delay = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(delay):
            retry = max(0.0, delay.retry_delay.seconds + delay.retry_delay.nanos / 1e9)
    return reason, metadata, retry


class DomainError(Exception):
    """An error the caller can act on. Subclasses fix the kind and reason."""

    kind: Kind = Kind.INTERNAL
    reason: str = "INTERNAL"
    retry_after_seconds: float | None = None

    def __init__(self, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # ErrorInfo metadata: machine-readable facts the caller may act on (never a secret).
        self.metadata = dict(metadata or {})


class InvalidArgumentError(DomainError):
    kind = Kind.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class PromptTooLongError(InvalidArgumentError):
    reason = "PROMPT_TOO_LONG"


class TextTooLongError(InvalidArgumentError):
    """An Embed text above the per-text token limit, without `truncate`."""

    reason = "TEXT_TOO_LONG"


class ModelNotServedError(DomainError):
    """The method needs a model role (chat, embeddings) this server did not measure."""

    kind = Kind.UNIMPLEMENTED
    reason = "MODEL_NOT_SERVED"


class InvalidRequestPayloadError(InvalidArgumentError):
    reason = "INVALID_REQUEST_PAYLOAD"


class MalformedMessageError(InvalidArgumentError):
    """The RPC request itself (not a sealed payload) is not valid protobuf."""

    reason = "MALFORMED_MESSAGE"


class SessionNotFoundError(DomainError):
    kind = Kind.NOT_FOUND
    reason = "SESSION_NOT_FOUND"


class SessionExpiredError(SessionNotFoundError):
    """The session ran out of time (absolute or idle TTL) and was wiped: attest again."""

    reason = "SESSION_EXPIRED"


class SessionStateError(DomainError):
    """The session exists but is not in the state this call needs."""

    kind = Kind.FAILED_PRECONDITION
    reason = "SESSION_STATE"


class KeyReleaseError(DomainError):
    """The sealed key did not open. One generic message, whatever the cause."""

    kind = Kind.PERMISSION_DENIED
    reason = "KEY_RELEASE_FAILED"


class EnvelopeRejectedError(DomainError):
    """A sealed message failed authentication, padding or header checks."""

    kind = Kind.PERMISSION_DENIED
    reason = "ENVELOPE_REJECTED"


class ReplayedRequestError(DomainError):
    kind = Kind.ALREADY_EXISTS
    reason = "REQUEST_ID_REUSED"


class ResourceExhaustedError(DomainError):
    kind = Kind.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"
    retry_after_seconds = 1.0


class UnavailableError(DomainError):
    kind = Kind.UNAVAILABLE
    reason = "UNAVAILABLE"


class TpmUnavailableError(UnavailableError):
    reason = "TPM_UNAVAILABLE"


class UnsupportedProtocolVersionError(DomainError):
    """A client of another protocol version (v1) called this server."""

    kind = Kind.FAILED_PRECONDITION
    reason = "UNSUPPORTED_PROTOCOL_VERSION"


class UnsupportedSuiteError(InvalidArgumentError):
    """The AttestRequest names an HPKE suite this server does not offer; the client may try
    another suite its policy accepts."""

    reason = "UNSUPPORTED_SUITE"


# --- confidential batch jobs (the inference server's JobService) ------------------------------


class JobsNotServedError(DomainError):
    """This server has no Sentinel to fetch a job's key from (sentinel_address unset)."""

    kind = Kind.UNIMPLEMENTED
    reason = "JOBS_NOT_SERVED"


class JobInputError(InvalidArgumentError):
    """The call is not a manifest then the sealed input, or the input does not fit the
    manifest (its key id, its record count, a record that is not a chat request)."""

    reason = "JOB_INPUT_INVALID"


class JobInputTooLargeError(DomainError):
    kind = Kind.RESOURCE_EXHAUSTED
    reason = "JOB_INPUT_TOO_LARGE"


class JobRunningError(DomainError):
    """The same job is running in another call on this server right now."""

    kind = Kind.FAILED_PRECONDITION
    reason = "JOB_RUNNING"


class SentinelUnavailableError(UnavailableError):
    """Sentinel did not answer: nothing of the job was run or written; call again later."""

    reason = "SENTINEL_UNAVAILABLE"


class SentinelAnswerError(UnavailableError):
    """Sentinel's answer does not open under the server's request (another key, a sealed key
    that does not open): nothing of the job ran."""

    reason = "SENTINEL_ANSWER_INVALID"


class SentinelRefusal(DomainError):
    """Sentinel refused the job's key: the server relays Sentinel's own kind, reason and
    metadata (a SentinelFault's reason, docs/SENTINEL.md), so the caller gets the typed
    Sentinel error."""

    def __init__(
        self, kind: Kind, reason: str, message: str, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"Sentinel refused the job's key: {message}", metadata)
        self.kind = kind
        self.reason = reason


# --- Sentinel, the key broker (docs/SENTINEL.md) -------------------------------------------


class SentinelFault(DomainError):
    """A refusal of the key broker. Each subclass is one ErrorInfo reason; the client's
    mirror is encloud.protocol.errors.SentinelError (same reasons)."""


class OwnerUnknownFault(SentinelFault):
    """No client certificate, or one that no registered owner pinned."""

    kind = Kind.UNAUTHENTICATED
    reason = "OWNER_UNKNOWN"


class NotKeyOwnerFault(SentinelFault):
    """The key id is outside the caller's namespace ("<owner>/...")."""

    kind = Kind.PERMISSION_DENIED
    reason = "NOT_KEY_OWNER"


class KeyNotFoundFault(SentinelFault):
    kind = Kind.NOT_FOUND
    reason = "KEY_NOT_FOUND"


class KeyExistsFault(SentinelFault):
    kind = Kind.ALREADY_EXISTS
    reason = "KEY_EXISTS"


class KeyRevokedFault(SentinelFault):
    kind = Kind.FAILED_PRECONDITION
    reason = "KEY_REVOKED"


class KeyImportFault(SentinelFault):
    """The sealed key did not open under the import key (or is not 32 bytes)."""

    kind = Kind.INVALID_ARGUMENT
    reason = "KEY_IMPORT_FAILED"


class PolicyRejectedFault(SentinelFault):
    kind = Kind.INVALID_ARGUMENT
    reason = "POLICY_REJECTED"


class OrderMalformedFault(SentinelFault):
    kind = Kind.INVALID_ARGUMENT
    reason = "ORDER_MALFORMED"


class OrderSignatureFault(SentinelFault):
    """The order is not signed by a signing key of the key's owner."""

    kind = Kind.PERMISSION_DENIED
    reason = "ORDER_SIGNATURE"


class OrderExpiredFault(SentinelFault):
    kind = Kind.PERMISSION_DENIED
    reason = "ORDER_EXPIRED"


class OrderUsedFault(SentinelFault):
    kind = Kind.ALREADY_EXISTS
    reason = "ORDER_USED"


class NonceUnknownFault(SentinelFault):
    """The nonce was never issued, was used already, or expired: ask for a new one."""

    kind = Kind.FAILED_PRECONDITION
    reason = "NONCE_UNKNOWN"


class AttestationRefusedFault(SentinelFault):
    """The evidence failed a verifier check against the key's policy; metadata names it."""

    kind = Kind.PERMISSION_DENIED
    reason = "ATTESTATION_REFUSED"


class ModelMismatchFault(SentinelFault):
    """The attested workload does not run the model the order names."""

    kind = Kind.PERMISSION_DENIED
    reason = "MODEL_MISMATCH"


class InputMismatchFault(SentinelFault):
    """The sealed input the workload received is not the one the job manifest names."""

    kind = Kind.PERMISSION_DENIED
    reason = "INPUT_MISMATCH"


class JobFinishedFault(SentinelFault):
    """The job ended done: its manifest never releases the key again (a second run)."""

    kind = Kind.FAILED_PRECONDITION
    reason = "JOB_FINISHED"


class JobHeldFault(SentinelFault):
    """A release of the job is live: in this start-up of the workload, or on another
    machine. Only a newer start-up of the same machine, or a release that ended paused,
    makes way for a new one."""

    kind = Kind.FAILED_PRECONDITION
    reason = "JOB_HELD"


class JobReleaseUnknownFault(SentinelFault):
    """EndJobRelease names no live release of a known job (ended, superseded, or never)."""

    kind = Kind.FAILED_PRECONDITION
    reason = "JOB_RELEASE_UNKNOWN"


class JobProofFault(SentinelFault):
    """EndJobRelease's proof is not made with the job's key."""

    kind = Kind.PERMISSION_DENIED
    reason = "JOB_PROOF"


class KekRotatedFault(SentinelFault):
    """The database's keys were rewrapped under a new KEK since this Sentinel started: it
    must be restarted with the new KEK file; it writes and releases nothing until then."""

    kind = Kind.UNAVAILABLE
    reason = "KEK_ROTATED"


class DatabaseUnavailableFault(SentinelFault):
    """The key database does not answer; nothing of the call was written."""

    kind = Kind.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"
    retry_after_seconds = 1.0
