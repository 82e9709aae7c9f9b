"""The confidential inference core: the domain logic behind the gRPC servicer.

Takes and returns domain types only (bytes, Sealed, Evidence); the servicer
translates protobuf. Every plaintext lives only inside these methods, between
opening a request and sealing its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from encloud.protocol.embedding import embedding_response, padded_rows
from encloud.protocol.encoding import sha256
from encloud.protocol.envelope import MessageType, Sealed, transcript_next, transcript_start
from encloud.protocol.evidence import Evidence
from encloud.protocol.faults import (
    DomainError,
    InvalidArgumentError,
    ModelNotServedError,
    PromptTooLongError,
    ResourceExhaustedError,
    SessionStateError,
    TextTooLongError,
    UnavailableError,
    UnsupportedSuiteError,
)
from encloud.protocol.handshake import (
    COMMITMENT_LENGTH,
    MAX_NONCE_LENGTH,
    MIN_NONCE_LENGTH,
    HpkeSuiteId,
    is_supported,
    quote_qualifying_data,
)
from encloud.protocol.key_broker import PendingRelease, prepare_job_release
from encloud.server import grpc_converters as converters
from encloud.server.inference.embedder import Embedding
from encloud.server.inference.engine import ChatTurn, GenerationParams, GenerationResult
from encloud.server.inference.scheduler import AsyncStream
from encloud.server.limits import PeerRateLimiter, ServerBusyError
from encloud.server.metrics import Metrics
from encloud.server.sessions import ActiveCall, Session, SessionState, SessionStore, StepCounter
from encloud.server.settings import Settings

log = logging.getLogger("encloud.service")
JOB_PEER = "job"
"""The engine's fairness name for job records: a job shares the engine as one caller."""


class Attester(Protocol):
    """What the service needs from the TPM side: evidence bound to qualifying data."""

    def evidence(self, qualifying_data: bytes) -> Evidence: ...


class TextEngine(Protocol):
    def astream(
        self,
        params: GenerationParams,
        should_stop: Callable[[], bool],
        peer: str = "",
        on_end: Callable[[str], None] | None = None,
    ) -> AsyncStream: ...

    def count_prompt_tokens(self, messages: Sequence[ChatTurn]) -> int: ...


class EmbeddingModel(Protocol):
    """What the service needs from the embedding model: batched across callers."""

    @property
    def dimension(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    async def aembed_tokens(
        self,
        tokens: Sequence[list[int]],
        *,
        dimensions: int | None = None,
        normalize: bool = True,
    ) -> Embedding: ...


@dataclass(frozen=True)
class AttestResult:
    session_id: bytes
    session_public_key: bytes
    ttl_seconds: int
    evidence: Evidence


async def _on_a_clock(
    source: AsyncIterator[str | GenerationResult], interval: float
) -> AsyncIterator[str | GenerationResult]:
    """Re-time an answer onto a fixed clock: at every tick, the text that arrived since the last
    one (possibly empty); at the first tick after the engine finished, that text, then the
    result. Frames then follow elapsed time only (docs/THREAT_MODEL.md)."""
    pending: list[str] = []
    outcome: list[GenerationResult | BaseException] = []
    finished = asyncio.Event()

    async def pump() -> None:
        try:
            async for item in source:
                if isinstance(item, GenerationResult):
                    outcome.append(item)
                    break
                pending.append(item)
        except Exception as error:  # re-raised on the clock's side
            outcome.append(error)
        finally:
            finished.set()

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(pump())
    tick = loop.time()
    try:
        while True:
            tick += interval
            await asyncio.sleep(max(0.0, tick - loop.time()))
            done = finished.is_set()
            text = "".join(pending)
            pending.clear()
            if done and outcome and isinstance(outcome[0], BaseException):
                raise outcome[0]
            yield text
            if done:
                if outcome:
                    yield outcome[0]  # type: ignore[misc]
                return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await source.aclose()  # type: ignore[attr-defined]


class _EngineBooks:
    """A queued request's gauges and cancel counts, kept exact across the engine thread
    (should_stop, on_end) and the event loop: each request leaves the queue-depth gauge once
    and the running gauge once, whichever side sees it end."""

    def __init__(self, metrics: Metrics, steps: StepCounter) -> None:
        self._metrics = metrics
        self._steps = steps
        self._lock = threading.Lock()
        self._started = False
        self._ended = False

    def queued(self) -> None:
        self._metrics.queue_depth.inc()

    def should_stop(self) -> bool:  # engine thread, before each of the request's steps
        with self._lock:
            if not self._started and not self._ended:
                self._started = True
                self._metrics.queue_depth.dec()
                self._metrics.running.inc()
        return self._steps.should_stop()

    def on_end(self, finish: str) -> None:  # engine thread, once
        with self._lock:
            if self._ended:
                return
            self._ended = True
            if self._started:
                self._metrics.running.dec()
            else:
                self._metrics.queue_depth.dec()
        after = self._steps.steps_after_cancel
        if after is not None and finish == "cancelled":
            self._metrics.cancels.inc()
            if after > 1:
                self._metrics.cancel_overruns.inc()


def _not_started() -> GenerationResult:
    """The result of a generation cancelled before the engine read its prompt."""
    return GenerationResult(finish_reason="cancelled", prompt_tokens=0, completion_tokens=0)


# Which of these ended an answer says something about it: the metrics show one value.
_COMPLETED = {"stop": "completed", "length": "completed"}


class InferenceCore:
    def __init__(
        self,
        settings: Settings,
        attester: Attester,
        engine: TextEngine | None,
        sessions: SessionStore,
        metrics: Metrics | None = None,
        *,
        embedder: EmbeddingModel | None = None,
    ) -> None:
        self._settings = settings
        self._attester = attester
        self._engine = engine
        self._embedder = embedder
        self._sessions = sessions
        self._metrics = metrics or Metrics()
        self._tpm_executor = ThreadPoolExecutor(1, thread_name_prefix="tpm")
        self._attest_limiter = PeerRateLimiter(
            settings.attest_rate_per_second, settings.attest_burst
        )
        self._admitted = 0
        self._per_peer_calls: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    # --- Attest and ReleaseKey -------------------------------------------------------

    async def attest(
        self, nonce: bytes, suite: HpkeSuiteId, commitment: bytes, peer: str = ""
    ) -> AttestResult:
        self._check_open()
        if not MIN_NONCE_LENGTH <= len(nonce) <= MAX_NONCE_LENGTH:
            raise InvalidArgumentError(
                f"the nonce must be {MIN_NONCE_LENGTH} to {MAX_NONCE_LENGTH} bytes"
            )
        if len(commitment) != COMMITMENT_LENGTH:
            raise InvalidArgumentError(f"the client commitment must be {COMMITMENT_LENGTH} bytes")
        if not is_supported(suite):
            raise UnsupportedSuiteError("unsupported HPKE suite")
        try:
            self._attest_limiter.take(peer)
        except ResourceExhaustedError:
            self._metrics.admission_rejected.labels("attest_rate").inc()
            raise
        session = self._sessions.create(suite, nonce, commitment, peer)
        try:
            qualifying_data = quote_qualifying_data(
                suite,
                nonce,
                commitment,
                session.public_key,
                session.session_id,
                session.ttl_seconds,
            )
            loop = asyncio.get_running_loop()
            evidence = await loop.run_in_executor(
                self._tpm_executor, self._attester.evidence, qualifying_data
            )
        except BaseException:
            self._sessions.drop(session, "fault")
            raise
        session.attest_digest = sha256(evidence.quote_attest)  # H_ev
        return AttestResult(session.session_id, session.public_key, session.ttl_seconds, evidence)

    async def release_key(self, session_id: bytes, sealed_key: bytes) -> Sealed:
        self._check_open()
        session = self._sessions.get(session_id)
        if session.state is not SessionState.PENDING:
            raise SessionStateError("the session already has a key")
        self._sessions.admit_bound(session)
        # A refused release neither closes nor extends the session: it may come from anyone
        # who saw the Attest reply. Only the attesting client can bind (its commitment).
        confirmation = session.bind(sealed_key)
        self._sessions.touch(session)
        return confirmation

    # --- what a job needs (server/jobs.py) ---------------------------------------------

    async def prepare_job_release(
        self, manifest: bytes, input_sha256: bytes, nonce: bytes
    ) -> PendingRelease:
        """Sentinel's ReleaseJobKey request for a job, quoted on the TPM's thread."""
        self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tpm_executor,
            functools.partial(
                prepare_job_release, manifest, input_sha256, nonce, self._attester.evidence
            ),
        )

    async def generate_for_job(self, params: GenerationParams) -> tuple[str, GenerationResult]:
        """One job record on the engine, batched with every other request: its answer."""
        self._check_open()
        if self._engine is None:
            raise ModelNotServedError("this server serves no chat model")
        call = ActiveCall(peer=JOB_PEER)
        pieces: list[str] = []
        async for item in self._generate(params, call):
            if isinstance(item, GenerationResult):
                return "".join(pieces), item
            pieces.append(item)
        raise RuntimeError("a generation ended without its result")

    # --- inference ---------------------------------------------------------------------

    async def infer(self, session_id: bytes, sealed_request: Sealed) -> Sealed:
        session, params = self._open_request(session_id, sealed_request)
        transcript = transcript_start(session_id, sealed_request.request_id, sealed_request.data)
        pieces: list[str] = []
        result: GenerationResult | None = None
        async with self._call(session, sealed_request.request_id) as call:
            async for item in self._generate(params, call):
                if isinstance(item, GenerationResult):
                    result = item
                else:
                    pieces.append(item)
            if result is None:  # the generation failed: _generate raised instead
                raise RuntimeError("a generation ended without its result")
            payload = converters.response_payload("".join(pieces), result, transcript)
            return session.sealer().seal(
                MessageType.RESPONSE, sealed_request.request_id, 0, payload
            )

    async def stream(self, session_id: bytes, sealed_request: Sealed) -> AsyncIterator[Sealed]:
        session, params = self._open_request(session_id, sealed_request)
        request_id = sealed_request.request_id
        transcript = transcript_start(session_id, request_id, sealed_request.data)
        seq = 0
        finish_reason = "cancelled"
        result: GenerationResult | None = None
        interval = self._settings.stream_frame_interval_ms / 1000.0
        async with self._call(session, request_id) as call:
            items = self._generate(params, call)
            if interval > 0:
                items = _on_a_clock(items, interval)
            async for item in items:
                if isinstance(item, GenerationResult):
                    result, finish_reason = item, item.finish_reason
                    break
                sealer = session.sealer()
                if sealer.remaining <= 1:
                    call.cancel.set()
                    finish_reason = "key_exhausted"
                    break
                payload = converters.chunk_payload(item)
                frame = sealer.seal(MessageType.FRAME, request_id, seq, payload)
                transcript = transcript_next(transcript, seq, payload)
                seq += 1
                yield frame
            final = converters.final_payload(finish_reason, result, transcript)
            yield session.sealer().seal(MessageType.FINAL, request_id, seq, final, reserved=True)

    async def embed(self, session_id: bytes, sealed_request: Sealed) -> Sealed:
        """One sealed batch of texts -> one sealed batch of vectors (docs/PROTOCOL.md, Embed)."""
        self._check_open()
        embedder = self._embedder
        if embedder is None:
            raise ModelNotServedError("this server serves no embedding model")
        session = self._sessions.get(session_id)
        payload = session.open_from_client(sealed_request, MessageType.EMBED_REQUEST)
        self._sessions.touch(session)
        params = converters.embed_params_from_payload(payload, self._settings)
        if params.dimensions is not None and params.dimensions > embedder.dimension:
            raise InvalidArgumentError(
                f"dimensions is above the model's {embedder.dimension} (in the runtime event)"
            )
        request_id = sealed_request.request_id
        transcript = transcript_start(session_id, request_id, sealed_request.data)
        admitted = time.monotonic()
        outcome = "error"
        try:
            # Admitted first (the queue limits), then tokenised once, off the event loop.
            async with self._call(session, request_id) as call:
                tokens = await asyncio.to_thread(embedder.tokenize, params.texts)
                if call.cancel.is_set():  # EndSession, expiry or shutdown while tokenising
                    raise SessionStateError("the session ended")
                prompt_tokens = self._check_embed_tokens(
                    [len(ids) for ids in tokens], params.truncate, embedder.max_tokens
                )
                result = await embedder.aembed_tokens(
                    tokens, dimensions=params.dimensions, normalize=params.normalize
                )
                count, dimensions = result.vectors.shape
                payload = embedding_response(
                    result.vectors.astype("<f4").tobytes(),
                    count,
                    dimensions,
                    padded_rows(count, self._settings.embed_max_texts),
                    prompt_tokens,
                    transcript,
                )
                sealed = session.sealer().seal(MessageType.EMBED_RESPONSE, request_id, 0, payload)
                outcome = "completed"
                return sealed
        finally:
            self._metrics.embed_requests.labels(outcome).inc()
            self._metrics.embed_seconds.observe(time.monotonic() - admitted)

    def _check_embed_tokens(self, counts: Sequence[int], truncate: bool, per_text: int) -> int:
        """The tokens the model will run (after truncation to `per_text`, the embedder's
        limit: the model's, or embed_max_tokens_per_text below it), within the limits."""
        for index, tokens in enumerate(counts):
            if tokens > per_text and not truncate:
                raise TextTooLongError(
                    f"text {index} is above the per-text token limit (embed_max_tokens_per_text "
                    "or the model's, in the attested runtime event); ask to truncate to embed it"
                )
        total = sum(min(tokens, per_text) for tokens in counts)
        if total > self._settings.embed_max_total_tokens:
            raise InvalidArgumentError(
                "the texts are above the server's total token limit (embed_max_total_tokens "
                "in the attested runtime event)"
            )
        return total

    async def end_session(self, session_id: bytes, sealed_end: Sealed) -> None:
        session = self._sessions.get(session_id)
        session.open_end(sealed_end)
        running = list(session.calls.values())
        for call in running:
            call.cancel.set()
        # Let running streams seal their final frame before the keys go.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(call.done.wait() for call in running)),
                timeout=self._settings.end_session_grace_seconds,
            )
        self._sessions.drop(session, "ended")

    # --- lifecycle -----------------------------------------------------------------------

    def sweep(self) -> None:
        """Periodic: drop expired sessions (wiping their keys), forget idle peers."""
        self._sessions.sweep()
        self._attest_limiter.sweep()

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls; wait up to `timeout` for running ones. True if none is left."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except TimeoutError:
            return False
        return True

    def cancel_all(self) -> int:
        """Ask every running generation to stop; each seals a CANCELLED final frame."""
        return self._sessions.cancel_all_calls()

    def shutdown(self) -> None:
        self._draining = True
        self._sessions.drop_all("shutdown")
        self._tpm_executor.shutdown(wait=False)

    @property
    def running_calls(self) -> int:
        return self._admitted

    # --- helpers -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._draining:
            raise UnavailableError("the server is shutting down")

    def _open_request(
        self, session_id: bytes, sealed_request: Sealed
    ) -> tuple[Session, GenerationParams]:
        self._check_open()
        if self._engine is None:
            raise ModelNotServedError("this server serves no chat model (embeddings only)")
        session = self._sessions.get(session_id)
        payload = session.open_from_client(sealed_request, MessageType.REQUEST)
        self._sessions.touch(session)  # it authenticated: the idle timer may move
        return session, converters.generation_params_from_payload(payload, self._settings)

    @contextlib.asynccontextmanager
    async def _call(self, session: Session, request_id: int) -> AsyncIterator[ActiveCall]:
        if len(session.calls) >= self._settings.max_streams_per_session:
            self._metrics.admission_rejected.labels("session_streams").inc()
            raise ResourceExhaustedError("too many concurrent requests in this session")
        if self._per_peer_calls[session.peer] >= self._settings.max_queued_requests_per_peer:
            self._metrics.admission_rejected.labels("queue_per_peer").inc()
            raise ServerBusyError("too many of this peer's requests are waiting; retry later")
        if self._admitted >= self._settings.max_queued_requests:
            self._metrics.admission_rejected.labels("queue").inc()
            raise ServerBusyError("the server is busy; retry later")
        call = ActiveCall()
        call.peer = session.peer
        session.calls[request_id] = call
        self._admitted += 1
        self._per_peer_calls[session.peer] += 1
        self._idle.clear()
        try:
            yield call
        except (DomainError, asyncio.CancelledError):
            raise
        except Exception:
            # An unexpected failure inside a session's call: fail closed, drop its keys.
            self._sessions.drop(session, "fault")
            raise
        finally:
            call.cancel.set()
            call.done.set()
            session.calls.pop(request_id, None)
            self._sessions.touch(session)
            self._admitted -= 1
            self._per_peer_calls[session.peer] -= 1
            if not self._per_peer_calls[session.peer]:
                del self._per_peer_calls[session.peer]
            if self._admitted == 0:
                self._idle.set()

    async def _generate(
        self, params: GenerationParams, call: ActiveCall
    ) -> AsyncIterator[str | GenerationResult]:
        """Run the request on the engine and yield its output on the event loop.

        The engine thread hands each step's output for every request on this loop over in
        one wake-up (Engine.astream); no thread waits per request. Leaving this generator
        early (client cancel or disconnect, deadline, session end, shutdown, error) sets the
        call's cancel signal, which the engine checks before every step of the request.
        """
        metrics = self._metrics
        engine = self._engine
        assert engine is not None  # _open_request refused the request otherwise
        cancel = call.cancel
        limit = self._settings.max_prompt_tokens
        books = _EngineBooks(metrics, cancel.steps)
        admitted = time.monotonic()
        first: float | None = None
        last = admitted
        pieces = 0
        finish = "cancelled"
        stream = None
        try:
            if cancel.is_set():  # cancelled before it was queued: not even a prefill
                yield _not_started()
                return
            if limit is not None and engine.count_prompt_tokens(params.messages) > limit:
                finish = "error"
                raise PromptTooLongError(
                    "the prompt is above the server's limit (max_prompt_tokens in the "
                    "attested runtime event)"
                )
            books.queued()
            try:
                stream = engine.astream(params, books.should_stop, call.peer, on_end=books.on_end)
            except BaseException:
                books.on_end("error")  # refused before the engine saw it
                raise
            cancel.when_set(stream.cancel)  # a waiting request leaves without running
            async for item in stream:
                if isinstance(item, GenerationResult):
                    finish = item.finish_reason
                else:
                    last = time.monotonic()
                    pieces += 1
                    if first is None:
                        first = last
                        metrics.ttft.observe(first - admitted)
                yield item
        except Exception:  # not GeneratorExit or CancelledError: the caller left
            finish = "error"
            raise
        finally:
            if stream is not None:
                await stream.aclose()
            cancel.set()
            metrics.generations.labels(_COMPLETED.get(finish, finish)).inc()
            metrics.generation_seconds.observe(time.monotonic() - admitted)
            if first is not None and pieces > 1:
                metrics.tpot.observe((last - first) / (pieces - 1))
