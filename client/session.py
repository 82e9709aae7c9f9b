"""The typed Python client: attest, verify, release the key, chat encrypted.

    with EncloudClient("127.0.0.1:50051", policy=load_policy(path)) as client:
        attestation = client.attest()          # verified against the policy
        client.release_key()                   # fresh DEK, key confirmation checked
        for piece in client.stream([("user", "Hello")]):
            print(piece, end="")

Every prompt and answer is sealed under keys derived from the released DEK.
Nothing is sent before the attestation verified and the key confirmation
proved that the attested session holds the key.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from encloud.protocol.audit import AuditLog, attestation_entry
from encloud.protocol.envelope import (
    MessageType,
    OpeningKey,
    Sealed,
    SealingKey,
    transcript_next,
    transcript_start,
)
from encloud.protocol.errors import (
    EnvelopeError,
    KeyConfirmationError,
    ServiceError,
    SessionError,
    SessionExpiredError,
    StreamOrderError,
    TranscriptMismatchError,
    TruncatedStreamError,
    VerificationError,
)
from encloud.protocol.evidence import Evidence
from encloud.protocol.handshake import (
    SESSION_SECRET_LENGTH,
    SUITE_V1,
    HpkeSuiteId,
    TrafficKeys,
    derive_traffic_keys,
    handshake_hash,
    new_dek,
    quote_qualifying_data,
    release_info,
    seal_key,
    split_enc,
)
from encloud.protocol.policy import Policy, policy_digest
from encloud.protocol.v1 import encloud_pb2 as pb
from encloud.protocol.v1 import encloud_pb2_grpc as pb_grpc
from encloud.protocol.verifier import VerifiedAttestation, verify_with_report
from encloud.protocol.wire import evidence_from_proto, sealed_from_proto, sealed_to_proto

ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_KEY_EXHAUSTED: "key_exhausted",
}
NONCE_LENGTH = 32
SESSION_EXPIRED = "SESSION_EXPIRED"

log = logging.getLogger("encloud.client")

Message = tuple[str, str] | Mapping[str, str]


@dataclass(frozen=True)
class Completion:
    """How an answer ended (the text itself is streamed or in Answer)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Answer:
    text: str
    completion: Completion


@dataclass
class _Session:
    session_id: bytes
    suite: HpkeSuiteId
    nonce: bytes
    public_key: bytes
    ttl_seconds: int
    expires_at: float
    attest_digest: bytes
    attestation: VerifiedAttestation
    keys: TrafficKeys | None = None
    c2s: SealingKey | None = None
    s2c: OpeningKey | None = None
    next_request_id: int = 1

    def wipe(self) -> None:
        for key in (self.c2s, self.s2c):
            if key is not None:
                key.wipe()
        if self.keys is not None:
            self.keys.wipe()
        self.keys = self.c2s = self.s2c = None


class ChatStream:
    """Iterates over the text pieces of a streamed answer; `.completion` after the end.

    Frames are checked as they arrive: contiguous seqs, each authenticated for
    this session, request and position; the stream must end with a valid final
    frame whose transcript hash matches, and nothing may follow it.
    """

    def __init__(
        self,
        responses: Iterator[pb.StreamInferResponse],
        opener: OpeningKey,
        request_id: int,
        transcript: bytes,
        on_error: Any,
        restart: Callable[[], ChatStream] | None = None,
    ) -> None:
        self._responses = responses
        self._opener = opener
        self._request_id = request_id
        self._transcript = transcript
        self._on_error = on_error
        self._restart = restart
        self._current: ChatStream = self
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._frames()
        except ServiceError as error:
            # The server expired the session (idle or absolute TTL) and nothing
            # was received yet: the request never ran, so it is sent
            # again on a fresh session.
            if self._restart is None or error.reason != SESSION_EXPIRED:
                raise
            self._current = self._restart()
            yield from self._current
            self.completion = self._current.completion

    def _frames(self) -> Iterator[str]:
        seq = 0
        try:
            for response in self._responses:
                if self.completion is not None:
                    raise StreamOrderError("a frame arrived after the final frame")
                sealed = sealed_from_proto(response.frame)
                if sealed.type == MessageType.FRAME:
                    payload = self._opener.open(sealed, MessageType.FRAME, self._request_id, seq)
                    self._transcript = transcript_next(self._transcript, seq, payload)
                    seq += 1
                    self._restart = None  # an answer has started: never sent twice
                    yield pb.GenerationChunk.FromString(payload).text
                elif sealed.type == MessageType.FINAL:
                    self._restart = None
                    payload = self._opener.open(sealed, MessageType.FINAL, self._request_id, seq)
                    self.completion = _check_final(
                        pb.GenerationFinal.FromString(payload), self._transcript
                    )
                else:
                    raise StreamOrderError("unexpected message type in a stream")
        except grpc.RpcError as error:
            raise self._on_error(error) from None
        if self.completion is None:
            raise TruncatedStreamError("the stream ended without its final frame")

    def cancel(self) -> None:
        current = self._current._responses if self._current is not self else self._responses
        cancel = getattr(current, "cancel", None)
        if cancel is not None:
            cancel()


class EncloudClient:
    """A session with one server.

    When the session expires (its TTL on our clock, or the server answers
    NOT_FOUND with reason SESSION_EXPIRED: idle or absolute TTL) and
    `auto_reattest` is on, the client attests again, verifies the new evidence
    against the same policy, releases the key again (a fresh DEK, or the
    caller's own DEK if one was given), and sends the request on the new
    session. It tells the caller: `reattest_count` goes up, `on_reattest` is
    called with the new verified attestation, and a log record is written to
    the `encloud.client` logger. A request is only resent when the server did
    not run it (SESSION_EXPIRED is answered before anything is opened). An
    unknown session (SESSION_NOT_FOUND: a restarted server, a wrong id) is
    raised to the caller.

    `credentials` makes a TLS (or mutual TLS) channel; without it and without
    `channel`, the channel is plaintext (the envelope still seals content).
    """

    def __init__(
        self,
        target: str,
        policy: Policy,
        *,
        audit_log: Path | None = None,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_seconds: float = 60.0,
        auto_reattest: bool = True,
        on_reattest: Callable[[VerifiedAttestation], None] | None = None,
    ) -> None:
        self.target = target
        self.policy = policy
        self._policy_digest = policy_digest(policy)
        self._audit = AuditLog(audit_log) if audit_log is not None else None
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials)
                if credentials is not None
                else grpc.insecure_channel(target)
            )
        self._channel = channel
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._timeout = timeout_seconds
        self._session: _Session | None = None
        self.auto_reattest = auto_reattest
        self.on_reattest = on_reattest
        self.reattest_count = 0
        self._caller_dek: bytearray | None = None

    def __enter__(self) -> EncloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- attestation and key release ------------------------------------------------

    def attest(self, nonce: bytes | None = None) -> VerifiedAttestation:
        """Start a session and verify its evidence against the policy.

        Raises a VerificationError subclass naming the failed check. Every
        outcome goes into the audit log.
        """
        self._drop_session()
        nonce = os.urandom(NONCE_LENGTH) if nonce is None else nonce
        suite = SUITE_V1
        request = pb.AttestRequest(
            nonce=nonce,
            suite=pb.HpkeSuite(kem_id=suite.kem_id, kdf_id=suite.kdf_id, aead_id=suite.aead_id),
        )
        reply = self._call(self._stub.Attest, request)
        received_at = time.monotonic()
        evidence = evidence_from_proto(reply.evidence)
        expected = quote_qualifying_data(
            suite, nonce, reply.session_public_key, reply.session_id, reply.ttl_seconds
        )
        verified, report, failure = verify_with_report(
            evidence,
            self.policy,
            expected_qualifying_data=expected,
            session_ttl_seconds=reply.ttl_seconds,
        )
        self.last_report = report
        self._record(nonce, evidence, verified, failure)
        if failure is not None:
            raise failure
        assert verified is not None
        self._session = _Session(
            session_id=reply.session_id,
            suite=suite,
            nonce=nonce,
            public_key=reply.session_public_key,
            ttl_seconds=reply.ttl_seconds,
            expires_at=received_at + reply.ttl_seconds,
            attest_digest=verified.attest_digest,
            attestation=verified,
        )
        return verified

    def release_key(self, dek: bytes | bytearray | None = None) -> None:
        """Seal the DEK (fresh by default) to the attested session and check the
        server's key confirmation before anything else is sent."""
        session = self._live_session()
        if session.keys is not None:
            raise SessionError("the key was already released to this session")
        if dek is not None and self.auto_reattest and dek is not self._caller_dek:
            self._wipe_caller_dek()
            self._caller_dek = bytearray(dek)  # to release again on re-attestation
        dek_bytes = bytearray(dek) if dek is not None else new_dek()
        secret = bytearray(os.urandom(SESSION_SECRET_LENGTH))
        try:
            info = release_info(session.suite, session.session_id, session.attest_digest)
            sealed_key = seal_key(session.suite, session.public_key, dek_bytes, secret, info)
            h_hs = handshake_hash(
                session.suite,
                session.nonce,
                session.public_key,
                session.session_id,
                session.ttl_seconds,
                session.attest_digest,
                split_enc(session.suite, sealed_key),
            )
            keys = derive_traffic_keys(dek_bytes, secret, h_hs)
        finally:
            dek_bytes[:] = bytes(len(dek_bytes))
            secret[:] = bytes(len(secret))
        reply = self._call(
            self._stub.ReleaseKey,
            pb.ReleaseKeyRequest(session_id=session.session_id, sealed_key=sealed_key),
        )
        confirm = OpeningKey(bytearray(keys.kc), session.session_id)
        try:
            proof = confirm.open(
                sealed_from_proto(reply.key_confirmation), MessageType.KEY_CONFIRM, 0, 0
            )
        except EnvelopeError as error:
            keys.wipe()
            raise KeyConfirmationError("the server did not prove it holds the key") from error
        finally:
            confirm.wipe()
        if not hmac.compare_digest(proof, h_hs):
            keys.wipe()
            raise KeyConfirmationError("the key confirmation is for another handshake")
        session.keys = keys
        session.c2s = SealingKey(keys.c2s, session.session_id)
        session.s2c = OpeningKey(keys.s2c, session.session_id)

    @property
    def attestation(self) -> VerifiedAttestation | None:
        return self._session.attestation if self._session else None

    # --- inference ---------------------------------------------------------------------

    def infer(self, messages: Sequence[Message], **params: Any) -> Answer:
        session, request_id, sealed = self._seal_request(messages, params)
        try:
            reply = self._call(
                self._stub.Infer,
                pb.InferRequest(session_id=session.session_id, request=sealed_to_proto(sealed)),
            )
        except ServiceError as error:
            if not self.auto_reattest or error.reason != SESSION_EXPIRED:
                raise
            self._reattest("the server expired the session")
            return self.infer(messages, **params)
        assert session.s2c is not None
        payload = session.s2c.open(
            sealed_from_proto(reply.response), MessageType.RESPONSE, request_id, 0
        )
        response = pb.GenerationResponse.FromString(payload)
        expected = transcript_start(session.session_id, request_id, sealed.data)
        completion = _check_final(response.final, expected)
        return Answer(response.text, completion)

    def stream(self, messages: Sequence[Message], **params: Any) -> ChatStream:
        session, request_id, sealed = self._seal_request(messages, params)
        responses = self._stub.StreamInfer(
            pb.StreamInferRequest(session_id=session.session_id, request=sealed_to_proto(sealed)),
            timeout=self._timeout,
        )
        assert session.s2c is not None
        restart: Callable[[], ChatStream] | None = None
        if self.auto_reattest:

            def restart() -> ChatStream:
                self._reattest("the server expired the session")
                return self.stream(messages, **params)

        return ChatStream(
            responses,
            session.s2c,
            request_id,
            transcript_start(session.session_id, request_id, sealed.data),
            _service_error,
            restart,
        )

    # --- end ---------------------------------------------------------------------------

    def end_session(self) -> None:
        """Seal an END so the server drops the session's keys; then drop ours."""
        session = self._session
        if session is None or session.c2s is None:
            self._drop_session()
            return
        request_id = self._next_request_id(session)
        sealed = session.c2s.seal(MessageType.END, request_id, 0, b"")
        try:
            self._call(
                self._stub.EndSession,
                pb.EndSessionRequest(session_id=session.session_id, end=sealed_to_proto(sealed)),
            )
        finally:
            self._drop_session()

    def close(self) -> None:
        try:
            if self._session is not None and self._session.keys is not None:
                self.end_session()
        except (ServiceError, SessionError):
            pass  # the server may already have dropped it; our keys are wiped anyway
        finally:
            self._drop_session()
            self._wipe_caller_dek()
            self._channel.close()

    # --- helpers -----------------------------------------------------------------------

    def _seal_request(
        self, messages: Sequence[Message], params: Mapping[str, Any]
    ) -> tuple[_Session, int, Sealed]:
        session = self._live_session()
        if session.c2s is None:
            raise SessionError("release the key before sending requests")
        request = _generation_request(messages, params)
        request_id = self._next_request_id(session)
        sealed = session.c2s.seal(MessageType.REQUEST, request_id, 0, request.SerializeToString())
        return session, request_id, sealed

    @staticmethod
    def _next_request_id(session: _Session) -> int:
        request_id = session.next_request_id
        session.next_request_id += 1
        return request_id

    def _live_session(self) -> _Session:
        if self._session is None:
            raise SessionError("attest first")
        if time.monotonic() >= self._session.expires_at:
            had_key = self._session.keys is not None
            self._drop_session()
            if not (self.auto_reattest and had_key):
                raise SessionExpiredError("the session expired; attest again")
            self._reattest("the session's time-to-live ran out")
            assert self._session is not None
        return self._session

    def _reattest(self, why: str) -> None:
        """A new verified session with the key released again; tells the caller."""
        self._drop_session()
        attestation = self.attest()
        self.release_key(dek=self._caller_dek)
        self.reattest_count += 1
        log.info("re-attested: %s", why)
        if self.on_reattest is not None:
            self.on_reattest(attestation)

    def _wipe_caller_dek(self) -> None:
        if self._caller_dek is not None:
            self._caller_dek[:] = bytes(len(self._caller_dek))
        self._caller_dek = None

    def _drop_session(self) -> None:
        if self._session is not None:
            self._session.wipe()
        self._session = None

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _service_error(error) from None

    def _record(
        self,
        nonce: bytes,
        evidence: Evidence,
        verified: VerifiedAttestation | None,
        failure: VerificationError | None,
    ) -> None:
        if self._audit is None:
            return
        self._audit.append(
            attestation_entry(
                server=self.target,
                nonce=nonce,
                quote_attest=evidence.quote_attest,
                policy_digest=self._policy_digest,
                ak_fingerprint=verified.ak_fingerprint if verified else None,
                model_digest=verified.model_digest if verified else None,
                failed_check=failure.check if failure is not None else None,
            )
        )


def _generation_request(
    messages: Sequence[Message], params: Mapping[str, Any]
) -> pb.GenerationRequest:
    request = pb.GenerationRequest()
    for message in messages:
        role, content = (
            (message["role"], message["content"])
            if isinstance(message, Mapping)
            else (message[0], message[1])
        )
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        request.messages.add(role=ROLES[role], content=content)
    known = {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "repetition_penalty",
        "stop_token_ids",
    }
    unknown = set(params) - known
    if unknown:
        raise TypeError(f"unknown generation parameters: {sorted(unknown)}")
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty"):
        if params.get(name) is not None:
            setattr(request, name, params[name])
    request.stop.extend(params.get("stop", ()))
    request.stop_token_ids.extend(params.get("stop_token_ids", ()))
    return request


def _check_final(final: pb.GenerationFinal, expected_transcript: bytes) -> Completion:
    if not hmac.compare_digest(final.transcript_hash, expected_transcript):
        raise TranscriptMismatchError("the final frame does not match what was received")
    reason = FINISH_REASONS.get(final.finish_reason)
    if reason is None:
        raise StreamOrderError("the final frame has no valid finish reason")
    return Completion(reason, final.usage.prompt_tokens, final.usage.completion_tokens)


def _service_error(error: grpc.RpcError) -> ServiceError:
    """A gRPC failure as a ServiceError with the server's ErrorInfo reason."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = error.details() if isinstance(error, grpc.Call) else ""
    reason = ""
    if isinstance(error, grpc.Call):
        for key, value in error.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        reason = info.reason
    return ServiceError(code.name, message or "", reason)


def user(content: str) -> tuple[str, str]:
    return ("user", content)


def iter_text(pieces: Iterable[str]) -> str:
    return "".join(pieces)
