"""encloud's Python client: attest the server, release a data key, chat end to end encrypted.

    from encloud.client import Client

    with Client("127.0.0.1:50051", "policy.json", audit_log="audit.jsonl") as client:
        for piece in client.stream([("user", "Hello")], max_new_tokens=64):
            print(piece, end="")

`AsyncClient` is the same on asyncio. Both verify every attestation against the
policy before any key leaves, write every outcome to the audit log, and raise the
typed errors below. docs/CLIENT.md has the whole API.
"""

from encloud.protocol.audit import AuditLog
from encloud.protocol.embedding import Embeddings
from encloud.protocol.errors import (
    AkUntrustedError,
    DecryptError,
    EmbeddingFormatError,
    EncloudError,
    EnvelopeError,
    KeyConfirmationError,
    PolicyError,
    PolicyIncompleteError,
    RoleNotAttestedError,
    ServiceError,
    SessionError,
    SessionExpiredError,
    StreamOrderError,
    TranscriptMismatchError,
    TruncatedStreamError,
    VerificationError,
)
from encloud.protocol.generation import Answer, Completion, Message
from encloud.protocol.policy import Policy, load_policy, parse_policy
from encloud.protocol.verifier import CheckResult, VerifiedAttestation

from ._aio import AsyncChatStream, AsyncClient
from ._base import NO_AUDIT, NoAudit
from ._channel import require_port, tls_credentials
from ._retry import RetryPolicy
from ._sync import ChatStream, Client, first_use_evidence

__all__ = [
    "NO_AUDIT",
    "AkUntrustedError",
    "Answer",
    "AsyncChatStream",
    "AsyncClient",
    "AuditLog",
    "ChatStream",
    "CheckResult",
    "Client",
    "Completion",
    "DecryptError",
    "EmbeddingFormatError",
    "Embeddings",
    "EncloudError",
    "EnvelopeError",
    "KeyConfirmationError",
    "Message",
    "NoAudit",
    "Policy",
    "PolicyError",
    "PolicyIncompleteError",
    "RetryPolicy",
    "RoleNotAttestedError",
    "ServiceError",
    "SessionError",
    "SessionExpiredError",
    "StreamOrderError",
    "TranscriptMismatchError",
    "TruncatedStreamError",
    "VerificationError",
    "VerifiedAttestation",
    "first_use_evidence",
    "load_policy",
    "parse_policy",
    "require_port",
    "tls_credentials",
]
