"""The embedder: loads a verified embedding-model folder (``embeddings_export.py``) and turns
texts into vectors under plain ONNX Runtime.

Imports only the standard library, numpy, onnxruntime, tokenizers and this package (never torch,
nothing of the server above inference).

The graph returns the masked mean of BERT's last hidden states (sentence-transformers' mean
pooling, ``embeddings.json`` says so); here each vector is cut to the first ``dimensions``
components and then, if asked, divided by its L2 norm (the model's own ``Normalize`` step).
Texts are tokenised with the folder's ``tokenizer.json`` without its recorded padding and
truncation (fixed at 128) and cut to the model's ``max_tokens`` (``[CLS]`` + the first
``max_tokens - 2`` tokens + ``[SEP]``, as sentence-transformers truncates).

:meth:`Embedder.embed` runs in the caller's thread. :meth:`Embedder.aembed` hands the texts to
one worker thread, which takes every request waiting, sorts all their texts by length, runs
them ``max_batch_texts`` at a time (so concurrent callers share ``session.run`` calls and the
padding stays small) and resolves each caller's future on its own loop as soon as its last
text is done. ONNX Runtime releases the GIL while it runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tokenizers

from encloud.protocol.faults import InvalidArgumentError, UnavailableError
from encloud.server.inference.manifest import Manifest, ModelIntegrityError, verify_model_folder

EMBEDDINGS_CONFIG = "embeddings.json"
DEFAULT_MAX_BATCH_TEXTS = 32
_INPUTS = ("input_ids", "attention_mask")
# torch.nn.functional.normalize's floor, as sentence-transformers' Normalize uses it.
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class Embedding:
    """The result of one request."""

    vectors: np.ndarray  # float32 [n_texts, dims], C-contiguous
    token_counts: list[int]  # tokens per text as run (after truncation), incl. [CLS]/[SEP]


@dataclass(frozen=True)
class _Config:
    dimension: int
    max_tokens: int
    pooling: str
    normalize: bool
    inputs: tuple[str, ...]
    output: str


@dataclass(eq=False)
class _Job:
    """One aembed call on its way through the worker."""

    texts: list[str]
    dimensions: int
    normalize: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    tokens: list[list[int]] | None = None  # already tokenised (aembed_tokens)
    pooled: np.ndarray | None = None
    counts: list[int] = field(default_factory=list)
    remaining: int = 0
    error: BaseException | None = None
    settled: bool = False


def _read_config(folder: Path) -> _Config:
    try:
        raw = json.loads((folder / EMBEDDINGS_CONFIG).read_text(encoding="utf-8"))
        config = _Config(
            dimension=int(raw["dimension"]),
            max_tokens=int(raw["max_tokens"]),
            pooling=str(raw["pooling"]),
            normalize=bool(raw["normalize"]),
            inputs=tuple(raw["inputs"]),
            output=str(raw["output"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelIntegrityError(f"{EMBEDDINGS_CONFIG} unreadable: {exc}") from None
    if config.pooling != "mean" or config.dimension < 1 or config.max_tokens < 3:
        raise ModelIntegrityError(f"{EMBEDDINGS_CONFIG}: unsupported model configuration")
    return config


def _session(folder: Path, threads: int, config: _Config) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = [o.name for o in session.get_outputs()]
    if (
        set(inputs) != set(_INPUTS)
        or set(config.inputs) != set(_INPUTS)
        or config.output not in outputs
    ):
        raise ModelIntegrityError("model.onnx does not have the inputs and output it should")
    return session


def _tokenizer(folder: Path) -> tokenizers.Tokenizer:
    """The folder's tokeniser without tokenizer.json's fixed 128 padding and truncation: texts
    are cut to ``max_tokens`` by ``Embedder._cut``, after they were counted."""
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InvalidArgumentError("texts must be a sequence of strings")
    return list(texts)


def _finish(pooled: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """Keep the first ``dimensions`` components, then L2-normalise if asked."""
    vectors = np.array(pooled[:, :dimensions], dtype=np.float32, order="C")
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, _NORM_EPS)
    return vectors


def _settle(job: _Job) -> None:
    """Resolve the caller's future (on its loop); a cancelled caller is simply skipped."""
    if job.settled:
        return
    job.settled = True
    if job.error is None:
        assert job.pooled is not None
        result: Any = Embedding(_finish(job.pooled, job.dimensions, job.normalize), job.counts)
    else:
        result = job.error

    def deliver() -> None:
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
        job.loop.call_soon_threadsafe(deliver)


def _live(job: _Job) -> bool:
    """Whether a job still needs work: not settled, and its caller still waits (a cancelled
    caller's texts are not run)."""
    if job.future.cancelled():
        job.settled = True
    return not job.settled


class Embedder:
    """One loaded embedding model. Create with :meth:`Embedder.load`; ``embed`` may be called
    from any thread, ``aembed`` from event loops; :meth:`close` stops the worker."""

    def __init__(
        self,
        manifest: Manifest,
        config: _Config,
        session: ort.InferenceSession,
        tokenizer: tokenizers.Tokenizer,
        pad_id: int,
        max_batch_texts: int,
        max_tokens: int,
    ) -> None:
        self._manifest = manifest
        self._config = config
        self._max_tokens = max_tokens
        self._session = session
        self._tokenizer = tokenizer
        self._pad_id = pad_id
        self._max_batch = max_batch_texts
        self._runs = 0
        self._runs_lock = threading.Lock()
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="embedder", daemon=True)
        self._worker.start()

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        threads: int = 0,
        max_batch_texts: int = DEFAULT_MAX_BATCH_TEXTS,
        max_tokens: int | None = None,
    ) -> Embedder:
        """Verify ``folder`` against its manifest (:class:`ModelIntegrityError` if it does not
        match), load the graph and the tokeniser and start the worker. ``threads``: ONNX
        Runtime intra-op threads (0: its default); ``max_batch_texts``: texts per
        ``session.run``; ``max_tokens``: a per-text limit below the model's (None: the
        model's), so a server's lower limit is also where texts are cut."""
        if threads < 0:
            raise ValueError("threads must be 0 (the default) or more")
        if max_batch_texts < 1:
            raise ValueError("max_batch_texts must be at least 1")
        folder = Path(folder)
        manifest = verify_model_folder(folder)
        config = _read_config(folder)
        session = _session(folder, threads, config)
        limit = min(max_tokens or config.max_tokens, config.max_tokens)
        if limit < 3:
            raise ValueError("max_tokens must leave room for a token between [CLS] and [SEP]")
        tokenizer = _tokenizer(folder)
        pad_id = tokenizer.token_to_id("[PAD]") or 0
        return cls(manifest, config, session, tokenizer, pad_id, max_batch_texts, limit)

    # ------------------------------------------------------------------ properties

    @property
    def model_digest(self) -> bytes:
        return self._manifest.model_digest

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def dimension(self) -> int:
        return self._config.dimension

    @property
    def max_tokens(self) -> int:
        """Tokens per text the model reads (special tokens included); longer texts are cut.
        The model's own limit unless ``load`` was given a lower one."""
        return self._max_tokens

    @property
    def batches_run(self) -> int:
        """``session.run`` calls so far, by ``embed`` and the worker (tests, metrics)."""
        return self._runs

    def facts(self) -> dict:
        """What the embedder found or derived, JSON-able; never a setting it was given."""
        from encloud.server.inference.engine import cpu_feature_class

        return {
            "onnxruntime": ort.__version__,
            "tokenizers": tokenizers.__version__,
            "model_digest": self.model_digest.hex(),
            "dimension": self.dimension,
            "max_tokens": self._config.max_tokens,  # the model's; a lower limit is a setting
            "pooling": self._config.pooling,
            "normalizes": self._config.normalize,
            "session_options": {
                "inter_op_num_threads": 1,
                "execution_mode": "sequential",
                "graph_optimization_level": "all",
                "providers": self._session.get_providers(),
            },
            "cpu_feature_class": cpu_feature_class(),
        }

    # ------------------------------------------------------------------ tokens

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text before truncation, [CLS] and [SEP] included."""
        return [len(ids) for ids in self.tokenize(texts)]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, untruncated, [CLS] and [SEP] included: count them, then hand
        them to :meth:`aembed_tokens`, so a text is tokenised once."""
        return [e.ids for e in self._tokenizer.encode_batch(_texts(texts))]

    def _cut(self, ids: list[int]) -> list[int]:
        """[CLS] + the first max_tokens - 2 tokens + [SEP], as sentence-transformers cuts."""
        if len(ids) <= self._max_tokens:
            return ids
        return [*ids[: self._max_tokens - 1], ids[-1]]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [self._cut(ids) for ids in self.tokenize(texts)]

    def _dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self._config.dimension
        if (
            not isinstance(dimensions, int)
            or isinstance(dimensions, bool)
            or not 1 <= dimensions <= self._config.dimension
        ):
            raise InvalidArgumentError(f"dimensions must be between 1 and {self._config.dimension}")
        return dimensions

    # ------------------------------------------------------------------ running

    def _run(self, rows: Sequence[list[int]]) -> np.ndarray:
        """One ``session.run`` over right-padded rows: pooled vectors ``[len(rows), dim]``."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        with self._runs_lock:
            self._runs += 1
        feed = {"input_ids": ids, "attention_mask": mask}
        return self._session.run([self._config.output], feed)[0]

    def _chunks(self, order: list[int]) -> list[list[int]]:
        return [order[i : i + self._max_batch] for i in range(0, len(order), self._max_batch)]

    def _pool(self, rows: list[list[int]]) -> np.ndarray:
        """Pooled vectors for ``rows`` in order, run shortest first in batches."""
        out = np.empty((len(rows), self._config.dimension), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for chunk in self._chunks(order):
            out[chunk] = self._run([rows[i] for i in chunk])
        return out

    def embed(
        self, texts: Sequence[str], *, dimensions: int | None = None, normalize: bool = True
    ) -> Embedding:
        """Embed ``texts`` in the caller's thread (each cut to :attr:`max_tokens` tokens)."""
        texts = _texts(texts)
        dims = self._dimensions(dimensions)
        if not texts:
            return Embedding(np.zeros((0, dims), dtype=np.float32), [])
        rows = self._encode(texts)
        return Embedding(_finish(self._pool(rows), dims, normalize), [len(r) for r in rows])

    async def aembed(
        self, texts: Sequence[str], *, dimensions: int | None = None, normalize: bool = True
    ) -> Embedding:
        """:meth:`embed` through the worker thread, batched with other callers' texts."""
        texts = _texts(texts)
        dims = self._dimensions(dimensions)
        if not texts:
            return Embedding(np.zeros((0, dims), dtype=np.float32), [])
        return await self._submit(texts, None, dims, normalize)

    async def aembed_tokens(
        self,
        tokens: Sequence[list[int]],
        *,
        dimensions: int | None = None,
        normalize: bool = True,
    ) -> Embedding:
        """:meth:`aembed` of texts already tokenised by :meth:`tokenize` (each cut here to
        :attr:`max_tokens`)."""
        dims = self._dimensions(dimensions)
        rows = [self._cut(list(ids)) for ids in tokens]
        if not rows:
            return Embedding(np.zeros((0, dims), dtype=np.float32), [])
        return await self._submit([], rows, dims, normalize)

    async def _submit(
        self, texts: list[str], tokens: list[list[int]] | None, dims: int, normalize: bool
    ) -> Embedding:
        loop = asyncio.get_running_loop()
        job = _Job(texts, dims, bool(normalize), loop, loop.create_future(), tokens)
        with self._wake:
            if self._closed:
                raise UnavailableError("the embedder is closed")
            self._pending.append(job)
            self._wake.notify()
        return await job.future

    # ------------------------------------------------------------------ the worker

    def _take(self) -> list[_Job] | None:
        """Every waiting job (at least one), or None once closed."""
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            jobs = list(self._pending)
            self._pending.clear()
            return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._serve(jobs)
            except BaseException as exc:  # never let the worker die: fail what is left
                for job in jobs:
                    if job.error is None:
                        job.error = exc
                    _settle(job)

    def _serve(self, jobs: list[_Job]) -> None:
        rows: list[tuple[_Job, int, list[int]]] = []
        for job in jobs:
            if not _live(job):
                continue
            try:
                ids = job.tokens if job.tokens is not None else self._encode(job.texts)
            except Exception as exc:
                job.error = exc
                _settle(job)
                continue
            job.pooled = np.empty((len(ids), self._config.dimension), dtype=np.float32)
            job.counts = [len(r) for r in ids]
            job.remaining = len(ids)
            rows.extend((job, i, r) for i, r in enumerate(ids))
        rows.sort(key=lambda row: len(row[2]))
        for start in range(0, len(rows), self._max_batch):
            self._serve_batch([r for r in rows[start : start + self._max_batch] if _live(r[0])])

    def _serve_batch(self, batch: list[tuple[_Job, int, list[int]]]) -> None:
        """Run one batch; a failure fails only the jobs with a text in it."""
        if not batch:
            return
        try:
            pooled = self._run([r for _, _, r in batch])
        except Exception as exc:
            for job, _, _ in batch:
                job.error = exc
                _settle(job)
            return
        for (job, i, _), vector in zip(batch, pooled, strict=True):
            assert job.pooled is not None
            job.pooled[i] = vector
            job.remaining -= 1
            if job.remaining == 0:
                _settle(job)

    def close(self) -> None:
        """Stop the worker; waiting ``aembed`` calls fail with UnavailableError."""
        with self._wake:
            self._closed = True
            left = list(self._pending)
            self._pending.clear()
            self._wake.notify_all()
        for job in left:
            job.error = UnavailableError("the embedder is closed")
            _settle(job)
        if self._worker is not threading.current_thread():
            self._worker.join()


__all__ = ["DEFAULT_MAX_BATCH_TEXTS", "EMBEDDINGS_CONFIG", "Embedder", "Embedding"]
