"""The batch scheduler: one thread owns every onnxruntime-genai ``Generator`` and steps them.

Why this shape (figures in docs/MODEL_PIPELINE.md): on CPU, onnxruntime-genai 0.18 has no
continuous batching (its ``Engine`` schedules paged-attention models, which the builder makes
only for CUDA/WebGPU; for our model it runs static batches of at most 4 and admits nobody until
a batch drains). A ``Generator`` with ``batch_size = n`` does batch well (total decode tok/s of
batch 8 is ~2.7x batch 1 here), but its rows are fixed at creation. So requests are admitted in
*cohorts*: whatever is waiting when the scheduler looks (after a short quiet window, so a burst
of concurrent streams lands in one cohort) becomes one ``Generator`` (prompts right-padded with a
pad token that no prompt contains); up to ``max_cohorts`` cohorts run side by side, stepped in
turn, so a request that arrives while others decode waits for one step of each running cohort,
not for them to finish.

Every request keeps its own decoding parameters: rows that sample (or use a repetition
penalty) choose their token with their own :class:`~encloud.server.inference.sampling.Sampler`
and the chosen token is forced through ``Generator.set_logits``; plain greedy cohorts use the
generator's own argmax.

A request whose ``should_stop()`` is true (checked before each of its decode steps) or whose
consumer went away leaves at the next step: no further token is chosen, detokenised or
delivered for it, and its result says ``cancelled``. Its row's slot still rides along in the
cohort's batched matmuls until the cohort ends (a ``Generator`` cannot drop a row), and the
cohort (with its KV cache) is freed as soon as every row has finished. KV caches belong to one
cohort's generator and are never shared between requests or reused.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime_genai as og

from encloud.server.inference.sampling import Sampler

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_COHORTS = 4
# Admission: after the first waiting request, wait until no new one arrived for QUIET seconds
# (at most WINDOW seconds) so streams started together decode together.
DEFAULT_ADMISSION_QUIET_S = 0.002
DEFAULT_ADMISSION_WINDOW_S = 0.010


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)  # identity: waiting-list removal must never compare token arrays
class _Request:
    ids: np.ndarray
    max_new_tokens: int  # already capped by the context
    stops: tuple[str, ...]
    stop_ids: frozenset[int]
    sampler: Sampler
    should_stop: Callable[[], bool]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    abandoned: threading.Event = field(default_factory=threading.Event)
    completion: int = 0
    pending: str = ""
    detok: object = None
    done: bool = False
    peer: str = ""
    """Whose request it is: cohort slots and places are shared between peers."""

    def wants_stop(self) -> bool:
        return self.abandoned.is_set() or bool(self.should_stop())


@dataclass
class _Cohort:
    generator: og.Generator
    rows: list[_Request]
    steps: int = 0

    @property
    def live(self) -> list[tuple[int, _Request]]:
        return [(i, r) for i, r in enumerate(self.rows) if not r.done]


@dataclass
class SchedulerStats:
    """Counters for tests and benchmarks (no per-request sizes leave the process)."""

    cohorts_started: int = 0
    largest_batch: int = 0
    decode_steps: int = 0


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class BatchScheduler:
    """Owns the model's generators on one daemon thread; see the module docstring."""

    def __init__(
        self,
        model: og.Model,
        tokenizer: og.Tokenizer,
        *,
        eos_ids: frozenset[int],
        pad_id: int,
        context_length: int,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_cohorts: int = DEFAULT_MAX_COHORTS,
        admission_quiet_s: float = DEFAULT_ADMISSION_QUIET_S,
        admission_window_s: float = DEFAULT_ADMISSION_WINDOW_S,
    ) -> None:
        if max_batch < 1 or max_cohorts < 1:
            raise ValueError("max_batch and max_cohorts must be at least 1")
        self._model = model
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self._context_length = context_length
        self.max_batch = max_batch
        self.max_cohorts = max_cohorts
        self._quiet = admission_quiet_s
        self._window = admission_window_s
        self._incoming: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: list[_Request] = []
        self._cohorts: list[_Cohort] = []
        self._held = threading.Event()
        self._closed = False
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._loop, name="encloud-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side

    def submit(self, request: _Request) -> Iterator[str | GenerationResult]:
        """Queue ``request`` and relay its output; closing the iterator cancels it."""
        if self._closed:
            raise RuntimeError("scheduler is closed")
        self._incoming.put(request)
        try:
            while True:
                item = request.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            request.abandoned.set()

    @contextlib.contextmanager
    def hold_admission(self) -> Iterator[None]:
        """For tests and benchmarks: admit nothing while held, then everything waiting at
        release together (up to ``max_batch`` per cohort)."""
        self._held.set()
        try:
            yield
        finally:
            self._held.clear()
            self._incoming.put(None)  # wake the loop

    def waiting(self) -> int:
        """Requests submitted and not yet in a cohort (approximate, for tests)."""
        return len(self._waiting) + self._incoming.qsize()

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

    def _admission_window(self) -> None:
        """Let a burst of arrivals finish arriving before forming a cohort."""
        start = last = time.monotonic()
        seen = len(self._waiting)
        while True:
            now = time.monotonic()
            if now - last >= self._quiet or now - start >= self._window:
                return
            time.sleep(self._quiet / 4)
            self._drain(block=False)
            if len(self._waiting) != seen:
                seen, last = len(self._waiting), time.monotonic()

    def _loop(self) -> None:
        while not self._closed:
            try:
                self._turn()
            except Exception as exc:  # a scheduler bug: fail what it holds, keep serving
                # Type and place only: an exception's message may quote request data.
                frames = traceback.extract_tb(exc.__traceback__)[-5:]
                log.error(
                    "scheduler turn failed; its requests get the error",
                    extra={
                        "error_type": type(exc).__name__,
                        "where": [f"{f.filename}:{f.lineno}" for f in frames],
                    },
                )
                self._fail([r for c in self._cohorts for r in c.rows], exc)
                self._fail(self._waiting, exc)
                self._cohorts.clear()
                self._waiting.clear()
        for cohort in self._cohorts:
            self._fail(cohort.rows, RuntimeError("engine closed"))
        self._fail(self._waiting, RuntimeError("engine closed"))

    def _turn(self) -> None:
        """Take arrivals, admit what fits, and run one decode step of every cohort."""
        self._drain(block=not self._cohorts and not self._waiting)
        if self._waiting and not self._held.is_set() and len(self._cohorts) < self.max_cohorts:
            if not self._cohorts:
                self._admission_window()
            self._admit()
        for cohort in list(self._cohorts):
            try:
                self._step(cohort)
            except Exception as exc:  # delivered to every row of the cohort
                self._fail(cohort.rows, exc)
            if all(r.done for r in cohort.rows):
                self._cohorts.remove(cohort)
                del cohort  # frees the generator and its KV cache

    def _fail(self, rows: Sequence[_Request], exc: BaseException) -> None:
        for r in rows:
            if not r.done:
                r.done = True
                r.out.put(exc)

    def _admit(self) -> None:
        # Cancelled while waiting: answer without generating.
        for r in [r for r in self._waiting if r.wants_stop()]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        while self._waiting and len(self._cohorts) < self.max_cohorts:
            candidates = self._admissible()
            if not candidates:
                return
            # A prompt that contains the pad token cannot be right-padded: it runs alone.
            first = candidates[0]
            if self._pad_id in first.ids:
                batch = [first]
            else:
                batch = [r for r in candidates if self._pad_id not in r.ids][: self.max_batch]
            chosen = {id(r) for r in batch}
            self._waiting = [r for r in self._waiting if id(r) not in chosen]
            try:
                self._cohorts.append(self._start(batch))
            except Exception as exc:  # delivered to the requests it concerns
                self._fail(batch, exc)

    def _admissible(self) -> list[_Request]:
        """Waiting requests that may start a cohort now, in a fair order.

        The last free cohort slot is kept for peers with no row running, so one peer's
        spread-out requests cannot take every slot while another waits: that peer's next
        request starts within one step of each running cohort. Within a cohort, peers take
        turns (round robin in arrival order), so a burst of one peer does not fill the
        batch ahead of another's request."""
        waiting = self._waiting
        if self.max_cohorts > 1 and len(self._cohorts) == self.max_cohorts - 1:
            busy = {r.peer for c in self._cohorts for r in c.rows if not r.done}
            waiting = [r for r in waiting if r.peer not in busy]
        by_peer: dict[str, list[_Request]] = {}
        for r in waiting:
            by_peer.setdefault(r.peer, []).append(r)
        turns: list[_Request] = []
        queues = list(by_peer.values())
        while queues:
            turns.extend(q.pop(0) for q in queues)
            queues = [q for q in queues if q]
        return turns

    def _start(self, batch: list[_Request]) -> _Cohort:
        n = len(batch)
        width = max(len(r.ids) for r in batch)
        max_length = min(max(len(r.ids) + r.max_new_tokens for r in batch), self._context_length)
        params = og.GeneratorParams(self._model)
        params.set_search_options(batch_size=n, do_sample=False, max_length=max_length)
        generator = og.Generator(self._model, params)
        tokens = np.full((n, width), self._pad_id, dtype=np.int32)
        for i, r in enumerate(batch):
            tokens[i, : len(r.ids)] = r.ids
            r.detok = self._tokenizer.create_stream()
        generator.append_tokens(tokens if n > 1 else tokens[0])
        self.stats.cohorts_started += 1
        self.stats.largest_batch = max(self.stats.largest_batch, n)
        return _Cohort(generator, batch)

    def _step(self, cohort: _Cohort) -> None:
        for _i, r in cohort.live:
            if r.wants_stop():
                self._finish(r, "cancelled")
        live = cohort.live
        if not live:
            return
        gen = cohort.generator
        if any(r.sampler.needs_logits for _i, r in live):
            n = len(cohort.rows)
            logits = np.asarray(gen.get_logits()).reshape(n, -1)
            forced = np.full(logits.shape, -np.inf, dtype=np.float32)
            for i, r in enumerate(cohort.rows):
                tok = r.sampler.choose(logits[i]) if not r.done else self._pad_id
                forced[i, tok] = 0.0
            gen.set_logits(forced)
        gen.generate_next_token()
        cohort.steps += 1
        self.stats.decode_steps += 1
        tokens = gen.get_next_tokens()
        for i, r in live:
            self._deliver(r, int(tokens[i]))

    def _deliver(self, r: _Request, token: int) -> None:
        r.completion += 1
        r.sampler.observe(token)
        if token in self._eos_ids or token in r.stop_ids:
            self._finish(r, "stop")
            return
        piece = r.detok.decode(token)  # type: ignore[attr-defined]
        if piece:
            if not r.stops:
                r.out.put(piece)
            else:
                r.pending += piece
                cuts = [i for i in (r.pending.find(s) for s in r.stops) if i >= 0]
                if cuts:
                    cut = min(cuts)
                    if cut:
                        r.out.put(r.pending[:cut])
                    r.pending = ""
                    self._finish(r, "stop")
                    return
                keep = _stop_holdback(r.pending, r.stops)
                if len(r.pending) > keep:
                    r.out.put(r.pending[: len(r.pending) - keep])
                    r.pending = r.pending[len(r.pending) - keep :]
        if r.completion >= r.max_new_tokens:
            self._finish(r, "length")

    def _finish(self, r: _Request, reason: str) -> None:
        if r.done:
            return
        r.done = True
        if r.pending:
            r.out.put(r.pending)
            r.pending = ""
        r.detok = None
        r.out.put(GenerationResult(reason, len(r.ids), r.completion))


def describe(scheduler: BatchScheduler) -> dict[str, object]:
    """The scheduler's answer-affecting settings, for the runtime event (no floats)."""
    return {
        "kind": "cohorts of onnxruntime-genai Generators, right-padded",
        "max_batch": scheduler.max_batch,
        "max_cohorts": scheduler.max_cohorts,
        "pad_token_id": scheduler._pad_id,
    }


def pad_token_id(special_ids: Sequence[int], excluded: frozenset[int], fallback: int) -> int:
    """The pad token for right-padding cohorts: the smallest special token that is neither an
    end nor a begin token (chat messages may not contain special tokens, so prompts rarely hold
    it; one that does runs alone)."""
    for tid in sorted(special_ids):
        if tid not in excluded:
            return int(tid)
    return int(fallback)


__all__ = ["BatchScheduler", "GenerationResult", "SchedulerStats", "describe", "pad_token_id"]
