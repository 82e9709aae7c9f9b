"""The asyncio client: a real grpc.aio client whose stream is an async iterator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

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


class AsyncClient(ClientState):
    """A confidential chat with one encloud server, on asyncio.

    >>> import asyncio
    >>> from encloud.client import AsyncClient
    >>> async def main() -> None:
    ...     async with AsyncClient("127.0.0.1:50051", "policy.json", audit_log="a.jsonl") as c:
    ...         async for piece in c.stream([("user", "Hello")], max_new_tokens=32):
    ...             print(piece, end="")

    The same protocol, checks, audit log, retries and re-attestation as `Client` (whose
    docstring says what each argument means); every method is a coroutine and `stream`
    returns an async iterator. Create and use it in one event loop; its tasks may share
    it. Verification and the audit log's writes run on a worker thread, off the loop."""

    def __init__(
        self,
        target: str,
        policy: PolicyArg,
        *,
        audit_log: AuditArg,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy | None = None,
        auto_reattest: bool = True,
        on_reattest: Callable[[VerifiedAttestation], None] | None = None,
    ) -> None:
        super().__init__(
            target, policy, audit_log, timeout, retry or RetryPolicy(), auto_reattest, on_reattest
        )
        self._lock: asyncio.Lock | None = None  # made in the loop, on first use
        self._own_channel = channel is None
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, credentials)
                if credentials is not None
                else grpc.aio.insecure_channel(target)
            )
        self._channel = channel
        self._stub = pb_grpc.InferenceServiceStub(channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # --- attestation and key release ---------------------------------------------------

    async def attest(self, *, timeout: float | None = None) -> VerifiedAttestation:
        """Start a session and verify its evidence against the policy, releasing nothing."""
        budget = self._budget(timeout)

        async def once(used: list[attest_path.Session]) -> VerifiedAttestation:
            return self._take(await self._drive(self._handshake(release=False), budget))

        async with self._guard:
            await self._end_quietly(self._session, budget)
            return await self._with_retries(budget, once, reattest=False)

    async def release_key(
        self, dek: bytes | bytearray | None = None, *, timeout: float | None = None
    ) -> None:
        """Release a data key to the attested session: a fresh one, or your 32-byte `dek`."""
        budget = self._budget(timeout)
        async with self._guard:
            attempt = self._attested
            if attempt is None:
                raise SessionError(
                    "the key was already released to this session"
                    if self._session is not None
                    else "attest first"
                )
            self._set_caller_dek(dek)

            async def once(used: list[attest_path.Session]) -> attest_path.Session:
                return await self._drive(
                    attest_path.release_key(attempt, dek), budget, attempt.route
                )

            self._bind(await self._with_retries(budget, once, reattest=False))

    # --- inference ----------------------------------------------------------------------

    async def infer(
        self, messages: Sequence[Message], *, timeout: float | None = None, **params: Any
    ) -> Answer:
        """One sealed request, one sealed answer bound to it by its transcript hash."""
        budget = self._budget(timeout)

        async def once(used: list[attest_path.Session]) -> Answer:
            session = await self._ensure_session(budget)
            used.append(session)
            try:
                request_id, sealed, transcript = self._seal(session, messages, params)
                request = pb.InferRequest(
                    session_id=session.session_id, request=sealed_to_proto(sealed)
                )
                reply = await self._rpc(self._stub.Infer, request, budget, session.route)
                return open_answer(reply.response, session.s2c, request_id, transcript)
            finally:
                self._done(session)

        return await self._with_retries(budget, once)

    async def embed(
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

        async def once(used: list[attest_path.Session]) -> Embeddings:
            session = await self._ensure_session(budget)
            used.append(session)
            try:
                request_id, sealed, transcript = self._seal_embed(session, texts, options)
                request = pb.EmbedRequest(
                    session_id=session.session_id, request=sealed_to_proto(sealed)
                )
                reply = await self._rpc(self._stub.Embed, request, budget, session.route)
                return open_embeddings(
                    reply.response, session.s2c, request_id, transcript, len(texts), dimensions
                )
            finally:
                self._done(session)

        return await self._with_retries(budget, once)

    def stream(
        self, messages: Sequence[Message], *, timeout: float | None = None, **params: Any
    ) -> AsyncChatStream:
        """A streamed answer: `async for` its text pieces, then read `.completion`."""
        return AsyncChatStream(self, messages, params, self._budget(timeout))

    # --- end ------------------------------------------------------------------------------

    async def end_session(self, *, timeout: float | None = None) -> None:
        """Seal an END so the server drops the session's keys; then drop ours."""
        async with self._guard:
            session = self._session
            try:
                if session is not None:
                    end = pb.EndSessionRequest(
                        session_id=session.session_id,
                        end=sealed_to_proto(self._seal_end(session)),
                    )
                    await self._rpc(
                        self._stub.EndSession, end, self._budget(timeout), session.route
                    )
            finally:
                self._drop_session()
                self._wipe_caller_dek()

    async def close(self) -> None:
        try:
            if self._session is not None:
                await self.end_session(timeout=END_TIMEOUT_SECONDS)
        except (ServiceError, SessionError):
            pass
        finally:
            self._drop_session()
            self._wipe_caller_dek()
            if self._own_channel:
                await self._channel.close()

    # --- internals --------------------------------------------------------------------------

    def _budget(self, timeout: float | None) -> CallBudget:
        return CallBudget(self.retry, self.timeout if timeout is None else timeout)

    async def _ensure_session(self, budget: CallBudget) -> attest_path.Session:
        """The live session, marked in use (the caller calls _done): made if needed."""
        async with self._guard:
            session = self._live_session()
            if session is not None:
                self._use(session)
                return session
            if self._attested is not None:
                attempt = self._attested
                self._bind(
                    await self._drive(
                        attest_path.release_key(attempt, self._caller_dek), budget, attempt.route
                    )
                )
            else:
                self._require_key()
                reattesting = self._bound_before
                if reattesting and not budget.use_reattest():
                    raise SessionExpiredError("the session expired again within this call")
                self._take(await self._drive(self._handshake(release=True), budget))
                if reattesting:
                    self._reattested("the session's time-to-live ran out")
            assert self._session is not None
            self._use(self._session)
            return self._session

    async def _reattest(
        self, budget: CallBudget, failed: attest_path.Session | None, why: str
    ) -> None:
        async with self._guard:
            if failed is not None and self._session is not failed and self._session is not None:
                return  # another task already attested again
            await self._end_quietly(self._session, budget)
            self._drop_session()
            self._take(await self._drive(self._handshake(release=True), budget))
            self._reattested(why)

    async def _end_quietly(self, session: attest_path.Session | None, budget: CallBudget) -> None:
        timeout = budget.end_timeout(END_TIMEOUT_SECONDS)
        if session is None or session.retired or timeout is None:
            return
        try:
            end = pb.EndSessionRequest(
                session_id=session.session_id, end=sealed_to_proto(self._seal_end(session))
            )
            await self._stub.EndSession(
                end, timeout=timeout, metadata=route_metadata(session.route)
            )
        except grpc.RpcError:
            pass

    async def _with_retries(
        self,
        budget: CallBudget,
        once: Callable[[list[attest_path.Session]], Awaitable[T]],
        *,
        reattest: bool = True,
    ) -> T:
        while True:
            used: list[attest_path.Session] = []
            try:
                return await once(used)
            except ServiceError as error:
                failure = error
            await self._after_failure(budget, failure, reattest, used[-1] if used else None)

    async def _after_failure(
        self,
        budget: CallBudget,
        error: ServiceError,
        reattest: bool,
        failed: attest_path.Session | None,
    ) -> None:
        verdict, delay = budget.next_step(error, reattest_allowed=reattest and self.auto_reattest)
        self.retry_count += 1
        if verdict is Verdict.REATTEST:
            await self._reattest(budget, failed, f"the server answered {error.reason}")
        if delay:
            await asyncio.sleep(delay)

    async def _drive(self, steps: Generator[Any, Any, T], budget: CallBudget, route: str = "") -> T:
        """Run one of the protocol's generators; its CPU work (verification) and the audit
        log's fsync run on a worker thread. The routing token of an Attest reply goes with
        the ReleaseKey that follows (and onto the handshake's attempt)."""
        try:
            done, value = _advance(steps, None)
            while not done:
                try:
                    if isinstance(value, attest_path.AttestCall):
                        reply, route = await self._attest_rpc(value.request, budget)
                    else:
                        reply = await self._rpc(self._stub.ReleaseKey, value.request, budget, route)
                except ServiceError as error:  # the generator may answer it (suite fallback)
                    done, value = _throw(steps, error)
                    continue
                done, value = await asyncio.to_thread(_advance, steps, reply)
            if isinstance(value, attest_path.Handshake):
                value.attempt.route = route
            return value  # type: ignore[no-any-return]
        finally:
            steps.close()

    async def _attest_rpc(self, request: Any, budget: CallBudget) -> tuple[Any, str]:
        """Attest, and the routing token from the reply's initial metadata ("" if none)."""
        try:
            call = self._stub.Attest(request, timeout=budget.remaining())
            reply = await call
            return reply, route_from(await call.initial_metadata())
        except grpc.RpcError as error:
            raise service_error(error) from None

    @staticmethod
    async def _rpc(method: Any, request: Any, budget: CallBudget, route: str = "") -> Any:
        try:
            return await method(request, timeout=budget.remaining(), metadata=route_metadata(route))
        except grpc.RpcError as error:
            raise service_error(error) from None


def _advance(steps: Generator[Any, Any, Any], reply: Any) -> tuple[bool, Any]:
    """(False, the next call) or (True, the result): StopIteration must not cross a Future."""
    try:
        return False, (next(steps) if reply is None else steps.send(reply))
    except StopIteration as done:
        return True, done.value


def _throw(steps: Generator[Any, Any, Any], error: BaseException) -> tuple[bool, Any]:
    try:
        return False, steps.throw(error)
    except StopIteration as done:
        return True, done.value


class AsyncChatStream:
    """The text pieces of a streamed answer as an async iterator; `.completion` at the end.

    The same frame checks and retry rules as encloud.client.ChatStream; leaving the loop
    early cancels the call."""

    def __init__(
        self,
        client: AsyncClient,
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

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        client = self._client
        while True:
            reader: StreamReader | None = None
            session: attest_path.Session | None = None
            try:
                session = await client._ensure_session(self._budget)
                request_id, sealed, transcript = client._seal(session, self._messages, self._params)
                reader = StreamReader(session.s2c, request_id, transcript)
                self._call = client._stub.StreamInfer(
                    pb.StreamInferRequest(
                        session_id=session.session_id, request=sealed_to_proto(sealed)
                    ),
                    timeout=self._budget.remaining(),
                    metadata=route_metadata(session.route),
                )
                async for response in self._call:
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
                    self._call.cancel()
                if session is not None:
                    client._done(session)
            await client._after_failure(self._budget, failure, True, session)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
