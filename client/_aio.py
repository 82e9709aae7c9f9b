"""The asyncio client: a real grpc.aio client whose stream is an async iterator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from encloud.protocol import attest as attest_path
from encloud.protocol.errors import ServiceError, SessionError
from encloud.protocol.generation import Answer, Completion, Message, StreamReader, open_answer
from encloud.protocol.v1 import encloud_pb2 as pb
from encloud.protocol.v1 import encloud_pb2_grpc as pb_grpc
from encloud.protocol.verifier import VerifiedAttestation
from encloud.protocol.wire import sealed_to_proto

from ._base import DEFAULT_TIMEOUT_SECONDS, AuditArg, ClientState, PolicyArg
from ._retry import CallBudget, RetryPolicy, Verdict
from ._status import service_error

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
    returns an async iterator. Create it inside the event loop that uses it."""

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

    # --- attestation and key release ---------------------------------------------------

    async def attest(self, *, timeout: float | None = None) -> VerifiedAttestation:
        """Start a session and verify its evidence against the policy, releasing nothing."""
        budget = self._budget(timeout)

        async def once() -> VerifiedAttestation:
            return self._take(await self._drive(self._handshake(release=False), budget))

        return await self._with_retries(budget, once, False)

    async def release_key(
        self, dek: bytes | bytearray | None = None, *, timeout: float | None = None
    ) -> None:
        """Release a data key to the attested session: a fresh one, or your 32-byte `dek`."""
        if self._attested is None:
            raise SessionError(
                "the key was already released to this session"
                if self._session is not None
                else "attest first"
            )
        self._keep_caller_dek(dek)
        budget = self._budget(timeout)
        attempt = self._attested

        async def once() -> attest_path.Session:
            return await self._drive(attest_path.release_key(attempt, self._caller_dek), budget)

        session = await self._with_retries(budget, once, False)
        self._attested = None
        self._session = session

    # --- inference ----------------------------------------------------------------------

    async def infer(
        self, messages: Sequence[Message], *, timeout: float | None = None, **params: Any
    ) -> Answer:
        """One sealed request, one sealed answer bound to it by its transcript hash."""
        budget = self._budget(timeout)

        async def once() -> Answer:
            session = await self._ensure_session(budget)
            request_id, sealed, transcript = self._seal(session, messages, params)
            request = pb.InferRequest(
                session_id=session.session_id, request=sealed_to_proto(sealed)
            )
            reply = await self._rpc(self._stub.Infer, request, budget)
            return open_answer(reply.response, session.s2c, request_id, transcript)

        return await self._with_retries(budget, once)

    def stream(
        self, messages: Sequence[Message], *, timeout: float | None = None, **params: Any
    ) -> AsyncChatStream:
        """A streamed answer: `async for` its text pieces, then read `.completion`."""
        return AsyncChatStream(self, messages, params, self._budget(timeout))

    # --- end ------------------------------------------------------------------------------

    async def end_session(self, *, timeout: float | None = None) -> None:
        """Seal an END so the server drops the session's keys; then drop ours."""
        session = self._session
        try:
            if session is not None:
                end = pb.EndSessionRequest(
                    session_id=session.session_id, end=sealed_to_proto(self._seal_end(session))
                )
                await self._rpc(self._stub.EndSession, end, self._budget(timeout))
        finally:
            self._drop_session()

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
        session = self._live_session()
        if session is not None:
            return session
        if self._attested is not None:
            session = await self._drive(
                attest_path.release_key(self._attested, self._caller_dek), budget
            )
            self._attested = None
            self._session = session
            return session
        self._require_key()
        reattesting = self.last_attempt is not None
        self._take(await self._drive(self._handshake(release=True), budget))
        if reattesting:
            self._reattested("the session's time-to-live ran out")
        assert self._session is not None
        return self._session

    async def _reattest(self, budget: CallBudget, why: str) -> None:
        old = self._session
        if old is not None:
            try:
                end = pb.EndSessionRequest(
                    session_id=old.session_id, end=sealed_to_proto(self._seal_end(old))
                )
                await self._stub.EndSession(end, timeout=END_TIMEOUT_SECONDS)
            except grpc.RpcError:
                pass
        self._drop_session()
        self._take(await self._drive(self._handshake(release=True), budget))
        self._reattested(why)

    async def _with_retries(
        self, budget: CallBudget, once: Callable[[], Awaitable[T]], reattest: bool = True
    ) -> T:
        while True:
            try:
                return await once()
            except ServiceError as error:
                failure = error
            await self._after_failure(budget, failure, reattest)

    async def _after_failure(self, budget: CallBudget, error: ServiceError, reattest: bool) -> None:
        verdict, delay = budget.next_step(error, reattest_allowed=reattest and self.auto_reattest)
        self.retry_count += 1
        if verdict is Verdict.REATTEST:
            await self._reattest(budget, f"the server answered {error.reason}")
        if delay:
            await asyncio.sleep(delay)

    async def _drive(self, steps: Generator[Any, Any, T], budget: CallBudget) -> T:
        try:
            call = next(steps)
            while True:
                method = (
                    self._stub.Attest
                    if isinstance(call, attest_path.AttestCall)
                    else self._stub.ReleaseKey
                )
                call = steps.send(await self._rpc(method, call.request, budget))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    @staticmethod
    async def _rpc(method: Any, request: Any, budget: CallBudget) -> Any:
        try:
            return await method(request, timeout=budget.remaining())
        except grpc.RpcError as error:
            raise service_error(error) from None


class AsyncChatStream:
    """The text pieces of a streamed answer as an async iterator; `.completion` at the end.

    The same frame checks and retry rules as encloud.client.ChatStream."""

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
            try:
                session = await client._ensure_session(self._budget)
                request_id, sealed, transcript = client._seal(session, self._messages, self._params)
                reader = StreamReader(session.s2c, request_id, transcript)
                self._call = client._stub.StreamInfer(
                    pb.StreamInferRequest(
                        session_id=session.session_id, request=sealed_to_proto(sealed)
                    ),
                    timeout=self._budget.remaining(),
                )
                async for response in self._call:
                    text = reader.feed(response.frame)
                    if text is not None:
                        yield text
                self.completion = reader.finish()
                return
            except grpc.RpcError as rpc_error:
                failure = service_error(rpc_error)
                if reader is not None and reader.frames > 0:
                    raise failure from None
            except ServiceError as error:
                failure = error
            await client._after_failure(self._budget, failure, True)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
