"""The blocking client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from encloud.client._channel import open_channel
from encloud.protocol import attest as attest_path
from encloud.protocol.embedding import Embeddings, open_embeddings
from encloud.protocol.errors import ServiceError, SessionError, SessionExpiredError
from encloud.protocol.generation import Answer, Completion, Message, StreamReader, open_answer
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc
from encloud.protocol.verifier import VerifiedAttestation
from encloud.protocol.wire import sealed_to_proto

from ._base import (
    DEFAULT_TIMEOUT_SECONDS,
    AuditArg,
    ClientState,
    PolicyArg,
    route_from,
    route_metadata,
)
from ._retry import CallBudget, RetryPolicy, Verdict
from ._status import after_frames, service_error

T = TypeVar("T")
END_TIMEOUT_SECONDS = 2.0


class Client(ClientState):
    """A confidential chat with one encloud server, blocking.

    >>> from encloud.client import Client
    >>> with Client("127.0.0.1:50051", "policy.json", audit_log="audit.jsonl") as client:
    ...     answer = client.infer([("user", "Hello")], max_new_tokens=32)
    ...     for piece in client.stream([("user", "Tell me more")]):
    ...         print(piece, end="")

    The first call attests the server, verifies the evidence against the policy, writes
    the outcome to the audit log, releases a fresh AES-256 data key (or yours, given to
    `release_key`) and checks the server's key confirmation; nothing is sent before.
    Call `attest()` first to look at the attestation before any key leaves.

    `policy` is a Policy or the path of a policy file. `audit_log` is required: a path,
    an AuditLog, or NO_AUDIT to keep none. `timeout` is each call's deadline in seconds
    (None: none); every method takes its own `timeout` too. Failed calls are retried
    only when the status proves nothing was processed (docs/CLIENT.md; at most
    `retry.max_retries` retries and `retry.max_reattests` re-attestations per call, all
    within its deadline). When a session expires or is lost and `auto_reattest` is on,
    the client ends the old session, attests again against the same policy, releases
    the key again and tells you: `reattest_count` goes up and `on_reattest` is called.
    `credentials` makes a TLS or mutual-TLS channel; `channel` uses yours. One Client may
    be shared by threads.
    """

    def __init__(
        self,
        target: str,
        policy: PolicyArg,
        *,
        audit_log: AuditArg,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy | None = None,
        auto_reattest: bool = True,
        on_reattest: Callable[[VerifiedAttestation], None] | None = None,
    ) -> None:
        super().__init__(
            target, policy, audit_log, timeout, retry or RetryPolicy(), auto_reattest, on_reattest
        )
        self._lock = threading.RLock()  # one handshake at a time; sessions change under it
        self._own_channel = channel is None
        if channel is None:
            channel = open_channel(target, credentials)
        self._channel = channel
        self._stub = pb_grpc.InferenceServiceStub(channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- attestation and key release ---------------------------------------------------

    def attest(self, *, timeout: float | None = None) -> VerifiedAttestation:
        """Start a session and verify its evidence against the policy, releasing nothing.

        Raises the VerificationError subclass of the failed check; every outcome goes into
        the audit log, and `last_report` / `last_attempt` keep what was checked. A session
        this client held is ended first."""
        budget = self._budget(timeout)
        with self._lock:
            self._end_quietly(self._session, budget)
            return self._with_retries(
                budget,
                lambda used: self._take(self._drive(self._handshake(release=False), budget)),
                reattest=False,
            )

    def release_key(
        self, dek: bytes | bytearray | None = None, *, timeout: float | None = None
    ) -> None:
        """Release a data key to the attested session: a fresh one, or your 32-byte `dek`
        (kept, with auto_reattest, to release again on re-attestation; wiped on close)."""
        budget = self._budget(timeout)
        with self._lock:
            attempt = self._attested
            if attempt is None:
                raise SessionError(
                    "the key was already released to this session"
                    if self._session is not None
                    else "attest first"
                )
            self._set_caller_dek(dek)
            session = self._with_retries(
                budget,
                lambda used: self._drive(
                    attest_path.release_key(attempt, dek), budget, attempt.route
                ),
                reattest=False,
            )
            self._bind(session)

    # --- inference ----------------------------------------------------------------------

    def infer(
        self, messages: Sequence[Message], *, timeout: float | None = None, **params: Any
    ) -> Answer:
        """One sealed request, one sealed answer bound to it by its transcript hash."""
        budget = self._budget(timeout)

        def once(used: list[attest_path.Session]) -> Answer:
            session = self._ensure_session(budget)
            used.append(session)
            try:
                request_id, sealed, transcript = self._seal(session, messages, params)
                request = pb.InferRequest(
                    session_id=session.session_id, request=sealed_to_proto(sealed)
                )
                reply = self._rpc(self._stub.Infer, request, budget, session.route)
                return open_answer(reply.response, session.s2c, request_id, transcript)
            finally:
                self._done(session)

        return self._with_retries(budget, once)

    def embed(
        self,
        texts: Sequence[str],
        *,
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = False,
        timeout: float | None = None,
    ) -> Embeddings:
        """One sealed batch of texts, one sealed batch of vectors (row i for texts[i]),
        bound to the request by its transcript hash. `dimensions` keeps the first
        components (before normalisation); `truncate` cuts a text above the server's
        per-text token limit instead of refusing it (TEXT_TOO_LONG)."""
        budget = self._budget(timeout)
        texts = list(texts) if not isinstance(texts, str) else texts
        options = {"dimensions": dimensions, "normalize": normalize, "truncate": truncate}

        def once(used: list[attest_path.Session]) -> Embeddings:
            session = self._ensure_session(budget)
            used.append(session)
            try:
                request_id, sealed, transcript = self._seal_embed(session, texts, options)
                request = pb.EmbedRequest(
                    session_id=session.session_id, request=sealed_to_proto(sealed)
                )
                reply = self._rpc(self._stub.Embed, request, budget, session.route)
                return open_embeddings(
                    reply.response, session.s2c, request_id, transcript, len(texts), dimensions
                )
            finally:
                self._done(session)

        return self._with_retries(budget, once)

    def stream(
        self, messages: Sequence[Message], *, timeout: float | None = None, **params: Any
    ) -> ChatStream:
        """A streamed answer: iterate for its text pieces, then read `.completion`.

        `timeout` is the deadline of the whole stream. Leaving the loop early cancels it."""
        return ChatStream(self, messages, params, self._budget(timeout))

    # --- end ------------------------------------------------------------------------------

    def end_session(self, *, timeout: float | None = None) -> None:
        """Seal an END so the server drops the session's keys; then drop ours (and forget
        a DEK of yours: the next session gets a fresh one unless you release yours)."""
        with self._lock:
            session = self._session
            try:
                if session is not None:
                    end = pb.EndSessionRequest(
                        session_id=session.session_id,
                        end=sealed_to_proto(self._seal_end(session)),
                    )
                    self._rpc(self._stub.EndSession, end, self._budget(timeout), session.route)
            finally:
                self._drop_session()
                self._wipe_caller_dek()

    def close(self) -> None:
        try:
            if self._session is not None:
                self.end_session(timeout=END_TIMEOUT_SECONDS)
        except (ServiceError, SessionError):
            pass  # the server may already have dropped it; our keys are wiped anyway
        finally:
            with self._lock:
                self._drop_session()
                self._wipe_caller_dek()
            if self._own_channel:
                self._channel.close()

    # --- internals --------------------------------------------------------------------------

    def _budget(self, timeout: float | None) -> CallBudget:
        return CallBudget(self.retry, self.timeout if timeout is None else timeout)

    def _ensure_session(self, budget: CallBudget) -> attest_path.Session:
        """The live session, marked in use (the caller calls _done): made if needed."""
        with self._lock:
            session = self._live_session()
            if session is not None:
                self._use(session)
                return session
            if self._attested is not None:  # attested by the caller; the key goes now
                attempt = self._attested
                self._bind(
                    self._drive(
                        attest_path.release_key(attempt, self._caller_dek), budget, attempt.route
                    )
                )
            else:
                self._require_key()
                reattesting = self._bound_before
                if reattesting and not budget.use_reattest():
                    raise SessionExpiredError("the session expired again within this call")
                self._take(self._drive(self._handshake(release=True), budget))
                if reattesting:
                    self._reattested("the session's time-to-live ran out")
            assert self._session is not None
            self._use(self._session)
            return self._session

    def _reattest(self, budget: CallBudget, failed: attest_path.Session | None, why: str) -> None:
        """End the failed session (best effort), then a new verified session with the key;
        nothing to do when another call already replaced it."""
        with self._lock:
            if failed is not None and self._session is not failed and self._session is not None:
                return
            self._end_quietly(self._session, budget)
            self._drop_session()
            self._take(self._drive(self._handshake(release=True), budget))
            self._reattested(why)

    def _end_quietly(self, session: attest_path.Session | None, budget: CallBudget) -> None:
        timeout = budget.end_timeout(END_TIMEOUT_SECONDS)
        if session is None or session.retired or timeout is None:
            return
        try:
            end = pb.EndSessionRequest(
                session_id=session.session_id, end=sealed_to_proto(self._seal_end(session))
            )
            self._stub.EndSession(end, timeout=timeout, metadata=route_metadata(session.route))
        except grpc.RpcError:
            pass

    def _with_retries(
        self,
        budget: CallBudget,
        once: Callable[[list[attest_path.Session]], T],
        *,
        reattest: bool = True,
    ) -> T:
        while True:
            used: list[attest_path.Session] = []
            try:
                return once(used)
            except ServiceError as error:
                failure = error
            self._after_failure(budget, failure, reattest, used[-1] if used else None)

    def _after_failure(
        self,
        budget: CallBudget,
        error: ServiceError,
        reattest: bool,
        failed: attest_path.Session | None,
    ) -> None:
        verdict, delay = budget.next_step(error, reattest_allowed=reattest and self.auto_reattest)
        self.retry_count += 1
        if verdict is Verdict.REATTEST:
            self._reattest(budget, failed, f"the server answered {error.reason}")
        if delay:
            time.sleep(delay)

    def _drive(self, steps: Generator[Any, Any, T], budget: CallBudget, route: str = "") -> T:
        """Run one of the protocol's generators, making each RPC it asks for. The routing
        token of an Attest reply goes with the ReleaseKey that follows (and onto the
        handshake's attempt)."""
        try:
            call = next(steps)
            while True:
                try:
                    if isinstance(call, attest_path.AttestCall):
                        reply, route = self._attest_rpc(call.request, budget)
                    else:
                        reply = self._rpc(self._stub.ReleaseKey, call.request, budget, route)
                except ServiceError as error:  # the generator may answer it (suite fallback)
                    call = steps.throw(error)
                    continue
                call = steps.send(reply)
        except StopIteration as done:
            if isinstance(done.value, attest_path.Handshake):
                done.value.attempt.route = route
            return done.value  # type: ignore[no-any-return]
        finally:
            steps.close()

    def _attest_rpc(self, request: Any, budget: CallBudget) -> tuple[Any, str]:
        """Attest, and the routing token from the reply's initial metadata ("" if none)."""
        try:
            reply, call = self._stub.Attest.with_call(request, timeout=budget.remaining())
        except grpc.RpcError as error:
            raise service_error(error) from None
        return reply, route_from(call.initial_metadata())

    @staticmethod
    def _rpc(method: Any, request: Any, budget: CallBudget, route: str = "") -> Any:
        try:
            return method(request, timeout=budget.remaining(), metadata=route_metadata(route))
        except grpc.RpcError as error:
            raise service_error(error) from None


class ChatStream:
    """The text pieces of a streamed answer; `.completion` once it ended.

    Frames are checked as they arrive (encloud.protocol.generation.StreamReader). Before
    the first frame a retryable failure sends the request again, sealed under a new
    request id; after it, a failure ends the stream with its error: an answer is never
    sent twice, and a stream without its final frame is a TruncatedStreamError, never a
    short answer. Leaving the loop early cancels the call."""

    def __init__(
        self,
        client: Client,
        messages: Sequence[Message],
        params: dict[str, Any],
        budget: CallBudget,
    ) -> None:
        self._client = client
        self._messages = messages
        self._params = params
        self._budget = budget
        self._call: Any = None
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        client = self._client
        while True:
            reader: StreamReader | None = None
            session: attest_path.Session | None = None
            try:
                session = client._ensure_session(self._budget)
                request_id, sealed, transcript = client._seal(session, self._messages, self._params)
                reader = StreamReader(session.s2c, request_id, transcript)
                self._call = client._stub.StreamInfer(
                    pb.StreamInferRequest(
                        session_id=session.session_id, request=sealed_to_proto(sealed)
                    ),
                    timeout=self._budget.remaining(),
                    metadata=route_metadata(session.route),
                )
                for response in self._call:
                    text = reader.feed(response.frame)
                    if text:  # None for the final frame; "" for an empty frame (a frame clock)
                        yield text
                self.completion = reader.finish()
                return
            except grpc.RpcError as rpc_error:
                failure = service_error(rpc_error)
                if reader is not None and reader.frames > 0:
                    raise after_frames(failure, reader.frames) from None
            except ServiceError as error:
                failure = error
            finally:
                if self.completion is None and self._call is not None:
                    self._call.cancel()  # an error, or the caller left the loop early
                if session is not None:
                    client._done(session)
            client._after_failure(self._budget, failure, True, session)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()


def first_use_evidence(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
) -> attest_path.FirstUseEvidence:
    """DEV ONLY: what a server shows about itself, unverified (trust on first use).

    One Attest with a fresh nonce; nothing is verified and nothing released (the server's
    pending session expires on its own). For `encloud policy init` and tests that need a
    server's own values; never a substitute for `Client.attest`."""
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    try:
        stub = pb_grpc.InferenceServiceStub(channel)
        steps = attest_path.first_use_evidence()
        call = next(steps)
        try:
            reply = stub.Attest(call.request, timeout=timeout)
        except grpc.RpcError as error:
            raise service_error(error) from None
        try:
            steps.send(reply)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        raise AssertionError("first_use_evidence asks for one call")
    finally:
        channel.close()
