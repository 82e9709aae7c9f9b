"""The typed errors of encloud. Every failure a caller can act on has a class.

Verification errors carry the name of the check that failed and what differed,
never a key or a plaintext. The server maps its own domain errors to gRPC
status codes in encloud.server.status; the client maps gRPC status codes back
to ServiceError in encloud.client._status.
"""

from __future__ import annotations


class EncloudError(Exception):
    """Base of every error this package raises on purpose."""


# --- attestation --------------------------------------------------------------


class VerificationError(EncloudError):
    """Evidence failed a check. `check` names the check, `detail` what differed."""

    check: str = "verification"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.check}: {detail}")
        self.detail = detail


class MalformedEvidenceError(VerificationError):
    """A TPM structure or the evidence container does not parse strictly."""

    check = "parse"


class MalformedAttestResponseError(MalformedEvidenceError):
    """The Attest reply's session values are not what the protocol allows (a session id
    not 16 bytes, a session key not the suite's length, a TTL outside 1..2^32-1)."""

    check = "attest_response"


class AkUntrustedError(VerificationError):
    """The attestation key is not one the policy trusts."""

    check = "ak_trust"


class AkAttributesError(VerificationError):
    """The AK is not a restricted, sign-only key fixed to its TPM."""

    check = "ak_attributes"


class SignatureError(VerificationError):
    """The quote's signature does not verify under the AK."""

    check = "signature"


class AttestMagicError(VerificationError):
    """TPMS_ATTEST magic is not TPM_GENERATED_VALUE."""

    check = "magic"


class AttestTypeError(VerificationError):
    """TPMS_ATTEST type is not TPM_ST_ATTEST_QUOTE."""

    check = "attest_type"


class QualifiedSignerError(VerificationError):
    """The quote names another key as its signer."""

    check = "qualified_signer"


class NonceMismatchError(VerificationError):
    """The qualifying data is not the one this client expects (stale or foreign quote)."""

    check = "qualifying_data"


class PcrSelectionError(VerificationError):
    """The quoted PCR selection differs from the policy's."""

    check = "pcr_selection"


class PcrDigestError(VerificationError):
    """The quoted PCR digest does not match the PCR values shipped beside it."""

    check = "pcr_digest"


class PcrValueError(VerificationError):
    """A PCR value is not allowed by the policy."""

    check = "pcr_value"


class EventLogFormatError(VerificationError):
    """The workload event log does not parse strictly."""

    check = "event_log_format"


class EventDigestError(VerificationError):
    """An event's digest does not match its content."""

    check = "event_digest"


class EventLogReplayError(VerificationError):
    """The event log does not replay to the quoted workload PCR."""

    check = "event_log_replay"


class EventSequenceError(VerificationError):
    """The workload events are not the sequence the policy expects."""

    check = "event_sequence"


class ModelNotAllowedError(VerificationError):
    """The measured model digest is not allowed by the policy."""

    check = "model_digest"


class RuntimeNotAllowedError(VerificationError):
    """The measured runtime event is not allowed by the policy."""

    check = "runtime_event"


class SessionTtlError(VerificationError):
    """The server offers a session longer than the policy accepts."""

    check = "session_ttl"


class PolicyError(EncloudError):
    """A policy file is invalid; the message names the field."""


class PolicyIncompleteError(VerificationError, PolicyError):
    """A policy leaves out something it must state (a production policy's AK trust,
    hardware roots, boot PCR pins, ...). `gaps` lists every missing item; the verifier
    raises it before it reads any evidence."""

    check = "policy"

    def __init__(self, gaps: list[str]) -> None:
        super().__init__("the policy is incomplete: " + "; ".join(gaps))
        self.gaps = list(gaps)


# --- key release and envelope ---------------------------------------------------


class KeyConfirmationError(EncloudError):
    """The server's key confirmation does not prove it holds our key."""


class EnvelopeError(EncloudError):
    """A sealed message was refused. Deliberately vague about why."""


class DecryptError(EnvelopeError):
    """A sealed message failed authentication or its padding is invalid."""


class HeaderMismatchError(EnvelopeError):
    """A sealed message's clear header (type, request id, seq) is not the expected one."""


class StreamOrderError(EnvelopeError):
    """Stream frames arrived out of order, duplicated, or after the final frame."""


class TruncatedStreamError(EnvelopeError):
    """A stream ended without a valid final frame: never a short answer."""


class TranscriptMismatchError(EnvelopeError):
    """The final frame's transcript hash differs from the one the client computed."""


class ReleaseOrderError(EncloudError):
    """An owner's release order that Sentinel must not act on."""


class ReleaseOrderFormatError(ReleaseOrderError):
    """Not a signed release order of this version in canonical form."""


class ReleaseOrderSignatureError(ReleaseOrderError):
    """The order's signature is not the owner's over its exact bytes."""


class ReleaseOrderExpiredError(ReleaseOrderError):
    """The order's expiry has passed."""


class EmbeddingFormatError(EnvelopeError):
    """An opened Embed response does not have the shape its request asked for."""


class KeyExhaustedError(EnvelopeError):
    """The session key reached its message budget; start a new session."""


# --- sessions and service ---------------------------------------------------------


class SessionError(EncloudError):
    """The session is unknown, expired, ended, or not in the right state."""


class SessionExpiredError(SessionError):
    """The session's time-to-live ran out."""


class RoleNotAttestedError(SessionError):
    """The attested server measured no model of the role a call needs (chat for Infer and
    StreamInfer, embeddings for Embed): the client sent nothing."""


class ServiceError(EncloudError):
    """The server refused a call: `code` is the status code's name (e.g. "NOT_FOUND"),
    `reason` the ErrorInfo reason of docs/ERRORS.md ("" when the server sent none),
    `retry_after_seconds` the RetryInfo delay when the server said when to try again, and
    `metadata` the ErrorInfo metadata (e.g. an INTERNAL error's correlation_id)."""

    def __init__(
        self,
        code: str,
        message: str,
        reason: str = "",
        retry_after_seconds: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds
        self.metadata = dict(metadata or {})


class SentinelError(ServiceError):
    """Sentinel (the key broker) refused a call. Each subclass is one ErrorInfo reason of
    docs/SENTINEL.md; `metadata` holds the ErrorInfo metadata (ATTESTATION_REFUSED names the
    failed verifier check in `check`)."""

    reason_name = ""


class OwnerUnknownError(SentinelError):
    reason_name = "OWNER_UNKNOWN"


class NotKeyOwnerError(SentinelError):
    reason_name = "NOT_KEY_OWNER"


class KeyNotFoundError(SentinelError):
    reason_name = "KEY_NOT_FOUND"


class KeyExistsError(SentinelError):
    reason_name = "KEY_EXISTS"


class KeyRevokedError(SentinelError):
    reason_name = "KEY_REVOKED"


class KeyImportError(SentinelError):
    reason_name = "KEY_IMPORT_FAILED"


class PolicyRejectedError(SentinelError):
    reason_name = "POLICY_REJECTED"


class OrderMalformedError(SentinelError):
    reason_name = "ORDER_MALFORMED"


class OrderSignatureError(SentinelError):
    reason_name = "ORDER_SIGNATURE"


class OrderExpiredError(SentinelError):
    reason_name = "ORDER_EXPIRED"


class OrderUsedError(SentinelError):
    reason_name = "ORDER_USED"


class NonceUnknownError(SentinelError):
    reason_name = "NONCE_UNKNOWN"


class AttestationRefusedError(SentinelError):
    reason_name = "ATTESTATION_REFUSED"

    @property
    def check(self) -> str:
        """The verifier check that failed (its report name, e.g. "ak_trust")."""
        return self.metadata.get("check", "")


class ModelMismatchError(SentinelError):
    reason_name = "MODEL_MISMATCH"


class KekRotatedError(SentinelError):
    reason_name = "KEK_ROTATED"


class DatabaseUnavailableError(SentinelError):
    reason_name = "DATABASE_UNAVAILABLE"


class InputMismatchError(SentinelError):
    reason_name = "INPUT_MISMATCH"


class JobFinishedError(SentinelError):
    reason_name = "JOB_FINISHED"


class JobHeldError(SentinelError):
    reason_name = "JOB_HELD"


class JobReleaseUnknownError(SentinelError):
    reason_name = "JOB_RELEASE_UNKNOWN"


class JobProofError(SentinelError):
    reason_name = "JOB_PROOF"


SENTINEL_ERRORS: dict[str, type[SentinelError]] = {
    cls.reason_name: cls for cls in SentinelError.__subclasses__()
}
"""Each Sentinel ErrorInfo reason's typed error."""


# --- audit log and evidence bundles -----------------------------------------------------


class AuditLogError(EncloudError):
    """The audit log or its checkpoints do not verify. `seq` names the first entry at fault
    (None when the fault is not one entry's, e.g. a bad checkpoint signature)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class BundleError(EncloudError):
    """An offline evidence bundle does not parse strictly; the message names the field."""


# --- hardware reports (SEV-SNP, Azure HCL, configfs-tsm, TDX) ---------------------------


class HardwareReportError(VerificationError):
    """The CVM's hardware report does not bind the evidence as the policy requires."""

    check = "hardware_report"


class HardwareReportFormatError(HardwareReportError):
    """A hardware report (SEV-SNP report, HCL report, TDX quote) does not parse strictly."""

    check = "hardware_report_parse"


class HardwareChainError(HardwareReportError):
    """The report signer's certificate chain (VCEK -> ASK -> ARK) does not validate to the
    policy's vendor roots."""

    check = "hardware_chain"


class HardwareSignatureError(HardwareReportError):
    """The hardware report is not signed by the certified key (e.g. an unknown VCEK)."""

    check = "hardware_signature"


class ReportDataMismatchError(HardwareReportError):
    """The report's REPORT_DATA does not bind the runtime claims or this session."""

    check = "report_data"


class RuntimeClaimsError(HardwareReportError):
    """Azure's runtime claims do not carry the quoting AK, or do not meet the policy."""

    check = "runtime_claims"


class HardwarePolicyError(HardwareReportError):
    """A hardware report field is not allowed by the policy."""

    check = "hardware_policy"


class DebugEnabledError(HardwarePolicyError):
    """The guest policy allows debugging: the host could read the guest's memory."""

    check = "hardware_debug"


class MeasurementNotAllowedError(HardwarePolicyError):
    """The launch measurement is not one the policy allows."""

    check = "hardware_measurement"


class TcbTooLowError(HardwarePolicyError):
    """A TCB component (boot loader, TEE, SNP firmware, microcode) is below the policy."""

    check = "hardware_tcb"


class VmplError(HardwarePolicyError):
    """The report comes from another VM privilege level than the policy requires."""

    check = "hardware_vmpl"


class HardwareBindingRequiredError(HardwareReportError):
    """A production policy got evidence without a verified hardware binding (vTPM only)."""

    check = "hardware_binding"


class PlatformMismatchError(HardwareReportError):
    """The evidence's hardware report is of another platform than the policy names,
    or of one that is refused outright (plain SEV without SNP)."""

    check = "hardware_platform"


class PlainSevRefusedError(PlatformMismatchError):
    """Plain SEV (or SEV-ES) without SNP: no signed report, so no hardware binding at all."""

    check = "hardware_platform"
