"""Continuous batching: one thread steps every running request, admitting new ones at each step.

Each step (figures in docs/MODEL_PIPELINE.md):

1. Requests whose ``should_stop()`` is true, or whose consumer went away, leave: a waiting one is
   answered ``cancelled`` without running; a running one frees its slot at once.
2. Waiting requests are admitted while a row is free (``max_batch``) and the KV token budget
   holds (the sum over admitted requests of prompt + new-token limit, capped by the context, is
   at most ``kv_budget_tokens``). Peers with fewer rows running go first and peers take turns
   (:func:`admissible`), so one peer's flood does not keep another's request from the next row
   that frees. A request that does not fit waits.
3. One decode call runs every decoding row (rows of different lengths share it: each row has
   its own sequence length), then prompts are prefilled, first come first served, in chunks,
   at most ``prefill_chunk_tokens`` prompt tokens per step in all. So a running row waits at most
   one chunk between tokens, and a prompt of ``p`` tokens gets its first token within
   ``ceil(p / chunk)`` steps of its first chunk.
4. Every row's token is chosen by its own :class:`~.sampling.Sampler` (greedy is an argmax over
   the step's logits), detokenised, checked against stop strings, and its output handed on:
   once per step for all rows (one wake of each waiting event loop, see :class:`Delivery`).

Rows are kept compact: rows ``0 .. D-1`` decode, the rows after them are being prefilled. When a
decoding row ends, the last decoding row's cache moves into its place; when a prefill ends, its
row swaps with the first prefilling row. Moves copy only the cached tokens. A finished row's
pages go back to the kernel (runner.release).

Caches are never shared between requests or reused: a slot's next owner starts at length 0 and
writes before it reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from encloud.server.inference.runner import ModelRunner
from encloud.server.inference.sampling import Sampler
from encloud.server.inference.tokenizer import ChatTokenizer, TextStream

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
DEFAULT_PREFILL_CHUNK_TOKENS = 256
DEFAULT_KV_BUDGET_TOKENS = 16384


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


class Delivery:
    """Where a request's output goes: a thread-safe queue (``stream``), or an event loop's
    deque woken once per step for all of its requests (``astream``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.inbox: collections.deque[object] = collections.deque()
        self.ready = asyncio.Event() if loop is not None else None

    def take(self, items: list[object]) -> None:
        """On the event loop: the step's items arrive."""
        self.inbox.extend(items)
        assert self.ready is not None
        self.ready.set()


@dataclass(eq=False)  # identity: list removal must never compare token arrays
class _Request:
    ids: np.ndarray
    max_new_tokens: int  # already capped by the context
    stops: tuple[str, ...]
    stop_ids: frozenset[int]
    sampler: Sampler
    should_stop: Callable[[], bool]
    peer: str = ""
    on_end: Callable[[str], None] | None = None
    """Called once on the engine thread when the request ends, however it ends ("stop",
    "length", "cancelled" or "error"); should_stop is not called after it."""
    delivery: Delivery = field(default_factory=Delivery)
    abandoned: threading.Event = field(default_factory=threading.Event)
    # Scheduler-thread state.
    row: int = -1
    decoding: bool = False  # its prompt is cached and it has a token to feed
    order: int = 0  # admission order: prompts are prefilled first come, first served
    cached: int = 0  # tokens in the KV cache
    next_token: int = -1  # chosen, not yet in the cache
    completion: int = 0
    pending: str = ""
    detok: TextStream | None = None
    done: bool = False
    outbox: list[object] = field(default_factory=list)

    @property
    def reserved(self) -> int:
        """KV tokens this request may come to hold."""
        return len(self.ids) + self.max_new_tokens

    def wants_stop(self) -> bool:
        return self.abandoned.is_set() or bool(self.should_stop())


class AsyncStream:
    """One request's output on its event loop: text pieces, then one GenerationResult."""

    def __init__(self, request: _Request) -> None:
        self._request = request
        self._ended = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str | GenerationResult:
        delivery = self._request.delivery
        assert delivery.ready is not None
        if self._ended:
            raise StopAsyncIteration
        while not delivery.inbox:
            delivery.ready.clear()
            await delivery.ready.wait()
        item = delivery.inbox.popleft()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if isinstance(item, GenerationResult):
            self._ended = True
        return item  # type: ignore[return-value]

    def cancel(self) -> None:
        """From any thread: the request leaves at the engine's next step (or never starts)."""
        self._request.abandoned.set()

    async def aclose(self) -> None:
        self._ended = True
        self._request.abandoned.set()


@dataclass
class SchedulerStats:
    """Counters for tests and benchmarks (no per-request sizes leave the process)."""

    steps: int = 0
    prefill_calls: int = 0
    largest_batch: int = 0
    admitted: int = 0


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def admissible(
    waiting: Sequence[_Request], *, running_peers: Sequence[str], free_rows: int, budget_left: int
) -> list[_Request]:
    """Which waiting requests to admit now, in a fair order.

    Peers with fewer rows running go first, and peers take turns (one request each per turn,
    each peer's requests in arrival order), so one peer's burst or flood does not keep another
    peer's request waiting: it takes the next row that frees. No row is held back while nobody
    else waits, so one caller alone can use every row. A request whose prompt + new-token
    limit does not fit the budget left waits (one behind it that fits may go first)."""
    running: dict[str, int] = {}
    for peer in running_peers:
        running[peer] = running.get(peer, 0) + 1
    by_peer: dict[str, list[_Request]] = {}
    for r in waiting:
        by_peer.setdefault(r.peer, []).append(r)
    chosen: list[_Request] = []
    while free_rows > 0 and by_peer:
        # Fewest rows running first; ties in order of each peer's first arrival.
        peer = min(by_peer, key=lambda p: running.get(p, 0))
        queue_ = by_peer[peer]
        r = queue_.pop(0)
        if not queue_:
            del by_peer[peer]
        if r.reserved > budget_left:
            continue
        chosen.append(r)
        running[peer] = running.get(peer, 0) + 1
        free_rows -= 1
        budget_left -= r.reserved
    return chosen


class BatchScheduler:
    """Owns the runner on one daemon thread; see the module docstring."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: ChatTokenizer,
        *,
        eos_ids: frozenset[int],
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS,
    ) -> None:
        if max_batch < 1 or max_batch > runner.max_rows:
            raise ValueError("max_batch must be between 1 and the runner's rows")
        if prefill_chunk_tokens < 1 or kv_budget_tokens < 2:
            raise ValueError("prefill_chunk_tokens and kv_budget_tokens must be positive")
        self._runner = runner
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self.max_batch = max_batch
        self.chunk = prefill_chunk_tokens
        self.kv_budget = kv_budget_tokens
        self._incoming: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: list[_Request] = []
        self._rows: list[_Request] = []  # index == KV row; decoding rows first
        self._finished: list[_Request] = []  # ended this step, output not yet handed on
        self._held = threading.Event()
        self._closed = False
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._loop, name="encloud-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side

    def submit(self, request: _Request) -> Iterator[str | GenerationResult]:
        """Queue ``request`` and relay its output; closing the iterator cancels it."""
        if self._closed:
            raise RuntimeError("scheduler is closed")
        self._incoming.put(request)
        try:
            while True:
                item = request.delivery.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
                if isinstance(item, GenerationResult):
                    return
        finally:
            request.abandoned.set()

    def asubmit(self, request: _Request) -> AsyncStream:
        """Queue ``request`` now and return its output as an async iterator for the event loop
        its Delivery belongs to; closing the iterator (even unstarted) cancels it."""
        if self._closed:
            raise RuntimeError("scheduler is closed")
        assert request.delivery.ready is not None
        self._incoming.put(request)
        return AsyncStream(request)

    @contextlib.contextmanager
    def hold_admission(self) -> Iterator[None]:
        """For tests and benchmarks: admit nothing while held, then everything waiting at
        release in one step (as far as rows and the budget allow)."""
        self._held.set()
        try:
            yield
        finally:
            self._held.clear()
            self._incoming.put(None)  # wake the loop

    def waiting(self) -> int:
        """Requests submitted and not yet admitted (approximate, for tests)."""
        return len(self._waiting) + self._incoming.qsize()

    def running(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        self._closed = True
        self._incoming.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ scheduler thread

    def _drain(self, block: bool) -> None:
        try:
            item = self._incoming.get(timeout=0.05) if block else self._incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._waiting.append(item)
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._closed:
            try:
                self._step()
            except Exception as exc:  # a scheduler bug: fail what it holds, keep serving
                # Type and place only: an exception's message may quote request data.
                frames = traceback.extract_tb(exc.__traceback__)[-5:]
                log.error(
                    "engine step failed; its requests get the error",
                    extra={
                        "error_type": type(exc).__name__,
                        "where": [f"{f.filename}:{f.lineno}" for f in frames],
                    },
                )
                for r in self._rows:
                    r.row = -1  # the buffer is dropped whole: no row moves on the way out
                for r in [*self._rows, *self._waiting]:
                    self._fail(r, exc)
                self._runner.clear()
                self._rows.clear()
                self._waiting.clear()
            self._flush()
        for r in [*self._rows, *self._waiting]:
            self._fail(r, RuntimeError("engine closed"))
        self._flush()

    def _step(self) -> None:
        idle = not self._rows and (not self._waiting or self._held.is_set())
        self._drain(block=idle)
        if not self._held.is_set():
            self._drain(block=False)  # whatever arrived meanwhile is admitted in this step too
            self._admit()
        self._drop_stopped()
        if not self._rows:
            return
        self.stats.steps += 1
        self._decode()
        self._prefill()

    # --- admission and leaving

    def _drop_stopped(self) -> None:
        """A waiting request leaves once abandoned (its consumer closed the stream or its call
        was cancelled); ``should_stop`` is asked at admission and before each step it runs in."""
        for r in [r for r in self._waiting if r.abandoned.is_set()]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._rows if r.wants_stop()]:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        chosen = admissible(
            self._waiting,
            running_peers=[r.peer for r in self._rows],
            free_rows=self.max_batch - len(self._rows),
            budget_left=self.kv_budget - sum(r.reserved for r in self._rows),
        )
        for r in chosen:
            self._waiting.remove(r)
            if r.wants_stop():
                self._finish(r, "cancelled")
                continue
            r.row = len(self._rows)
            r.order = self.stats.admitted
            r.detok = self._tokenizer.decoder()
            self._rows.append(r)
            self.stats.admitted += 1

    def _decoding(self) -> int:
        """Rows 0 .. D-1 decode; the count D."""
        n = 0
        while n < len(self._rows) and self._rows[n].decoding:
            n += 1
        return n

    def _remove_row(self, r: _Request) -> None:
        """Free ``r``'s row, keeping decoding rows first and every row compact."""
        rows = self._rows
        i = rows.index(r)
        d = self._decoding()
        last = len(rows) - 1
        if i < d:
            # The last decoding row fills the hole; the last row then fills its place.
            self._place(rows[d - 1], i)
            if d - 1 != last:
                self._place(rows[last], d - 1)
        elif i != last:
            self._place(rows[last], i)
        rows.pop()
        # Its pages go back; the buffer itself stays. Dropping and re-allocating it when the
        # engine went idle cost the next prompt 250-500 ms after a pause of a second or more
        # (measured, in process: 365-400 ms against ~55 ms; cause not pinned down).
        self._runner.release(last)
        r.row = -1

    def _place(self, r: _Request, row: int) -> None:
        if r.row == row:
            return
        self._runner.move(r.row, row, r.cached)
        self._rows[row] = r
        r.row = row

    def _promote(self, r: _Request) -> None:
        """A prefill finished: move ``r`` to the first non-decoding row."""
        d = self._decoding()  # r is not counted yet: its row is >= d
        other = self._rows[d]
        if other is not r:
            self._runner.swap(r.row, d, r.cached, other.cached)
            self._rows[d], self._rows[r.row] = r, other
            other.row, r.row = r.row, d
        r.decoding = True

    # --- the step

    def _decode(self) -> None:
        d = self._decoding()
        if not d:
            return
        rows = self._rows[:d]
        self._runner.ensure(max(r.cached for r in rows) + 1, [r.cached for r in self._rows])
        tokens = np.array([[r.next_token] for r in rows], dtype=np.int64)
        logits = self._runner.run(0, tokens, [r.cached for r in rows])
        self.stats.largest_batch = max(self.stats.largest_batch, d)
        for r in rows:
            r.cached += 1
        chosen = self._choose(rows, logits)
        for r, token in zip(rows, chosen, strict=True):
            self._deliver(r, token)

    def _prefill(self) -> None:
        """This step's prompt chunks, first come first served, ``chunk`` tokens in all. Chunks
        of the same length on adjacent rows at the same position run as one batched call."""
        budget = self.chunk
        planned: list[tuple[_Request, int]] = []
        for r in sorted((r for r in self._rows if not r.decoding), key=lambda r: r.order):
            if budget <= 0:
                break
            n = min(budget, len(r.ids) - r.cached)
            planned.append((r, n))
            budget -= n
        if not planned:
            return
        self._runner.ensure(
            max(r.cached + n for r, n in planned), [row.cached for row in self._rows]
        )
        done: list[tuple[_Request, np.ndarray]] = []
        for group in _adjacent_groups(planned):
            first, n = group[0]
            pieces = np.stack([r.ids[r.cached : r.cached + n] for r, _ in group])
            logits = self._runner.run(first.row, pieces, [r.cached for r, _ in group])
            self.stats.prefill_calls += 1
            for i, (r, _) in enumerate(group):
                r.cached += n
                if r.cached == len(r.ids):
                    done.append((r, logits[i : i + 1]))
        for r, logits in done:  # rows move from here on: after every call of the step
            self._promote(r)
            self._deliver(r, self._choose([r], logits)[0])

    def _choose(self, rows: list[_Request], logits: np.ndarray) -> list[int]:
        greedy = np.argmax(logits, axis=-1)
        return [
            r.sampler.choose(logits[i]) if r.sampler.needs_logits else int(greedy[i])
            for i, r in enumerate(rows)
        ]

    # --- output

    def _deliver(self, r: _Request, token: int) -> None:
        r.completion += 1
        r.sampler.observe(token)
        r.next_token = token
        if token in self._eos_ids or token in r.stop_ids:
            self._finish(r, "stop")
            return
        assert r.detok is not None
        piece = r.detok.step(token)
        if piece:
            if not r.stops:
                r.outbox.append(piece)
            else:
                r.pending += piece
                cuts = [i for i in (r.pending.find(s) for s in r.stops) if i >= 0]
                if cuts:
                    cut = min(cuts)
                    if cut:
                        r.outbox.append(r.pending[:cut])
                    r.pending = ""
                    self._finish(r, "stop")
                    return
                keep = _stop_holdback(r.pending, r.stops)
                if len(r.pending) > keep:
                    r.outbox.append(r.pending[: len(r.pending) - keep])
                    r.pending = r.pending[len(r.pending) - keep :]
        if r.completion >= r.max_new_tokens:
            self._finish(r, "length")

    def _finish(self, r: _Request, reason: str) -> None:
        if r.done:
            return
        if r.pending:
            r.outbox.append(r.pending)
            r.pending = ""
        self._end(r, GenerationResult(reason, len(r.ids), r.completion))

    def _fail(self, r: _Request, exc: BaseException) -> None:
        if not r.done:
            self._end(r, exc)

    def _end(self, r: _Request, last: object) -> None:
        r.done = True
        r.detok = None
        r.outbox.append(last)
        if r.on_end is not None:
            reason = last.finish_reason if isinstance(last, GenerationResult) else "error"
            try:
                r.on_end(reason)
            except Exception:  # a caller's bookkeeping must not stop the engine
                log.exception("on_end callback failed")
        if r.row >= 0 and r in self._rows:
            self._remove_row(r)
        self._finished.append(r)

    def _flush(self) -> None:
        """Hand this step's output on: each event loop is woken once for all its requests."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Delivery, list[object]]]] = {}
        for r in [*self._rows, *self._finished]:
            if not r.outbox:
                continue
            items, r.outbox = r.outbox, []
            loop = r.delivery.loop
            if loop is None:
                for item in items:
                    r.delivery.queue.put(item)
            else:
                by_loop.setdefault(loop, []).append((r.delivery, items))
        self._finished = []
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody waits
                loop.call_soon_threadsafe(_hand_over, batch)


def _adjacent_groups(planned: list[tuple[_Request, int]]) -> list[list[tuple[_Request, int]]]:
    """Chunks that can share one call: the same length, the same cached length, and rows next
    to each other (a call covers a contiguous range of the buffer's rows)."""
    groups: list[list[tuple[_Request, int]]] = []
    for r, n in sorted(planned, key=lambda item: item[0].row):
        last = groups[-1][-1] if groups else None
        if last is not None and (
            last[1] == n and last[0].cached == r.cached and last[0].row + 1 == r.row
        ):
            groups[-1].append((r, n))
        else:
            groups.append([(r, n)])
    return groups


def _hand_over(batch: list[tuple[Delivery, list[object]]]) -> None:
    for delivery, items in batch:
        delivery.take(items)


def describe(scheduler: BatchScheduler) -> dict[str, object]:
    """How the engine batches, for the runtime event (no floats)."""
    return {
        "kind": "continuous batching, per-step admission, chunked prefill",
        "max_batch": scheduler.max_batch,
        "prefill_chunk_tokens": scheduler.chunk,
        "kv_budget_tokens": scheduler.kv_budget,
    }


__all__ = [
    "AsyncStream",
    "BatchScheduler",
    "Delivery",
    "GenerationResult",
    "SchedulerStats",
    "admissible",
    "describe",
]
