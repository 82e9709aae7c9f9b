"""The engine: loads a verified model folder and streams chat completions.

Imports neither torch nor transformers (directly or indirectly) nor onnxruntime-genai: only the
standard library, numpy, onnxruntime, tokenizers, jinja2 and this package.

The exported graph runs under plain ONNX Runtime (:mod:`.runner`), which releases Python's GIL
while it computes; :class:`~.scheduler.BatchScheduler` batches concurrent ``stream`` /
``astream`` calls continuously (see that module, and docs/MODEL_PIPELINE.md for the figures).
Prompts are rendered and tokenised by :class:`~.tokenizer.ChatTokenizer` with the chat template
recorded in the verified manifest (so the template that is measured in the model digest is the
one used).

Known answer (in :meth:`Engine.facts`)::

    known_answer = SHA256(E("encloud/v1 known answer", T_1, T_2))
    T_i = u32_be(token_1) || ... || u32_be(token_k)

the token ids greedily decoded (at most ``KNOWN_ANSWER_NEW_TOKENS``, stopping early only at
eos, which is included) for the fixed chat prompts ``KNOWN_ANSWER_PROMPTS`` (each one user
turn, rendered with the model's chat template), computed once at load, one request at a time,
through the same scheduler that serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from encloud.protocol.encoding import encode, sha256, u32
from encloud.protocol.faults import InvalidArgumentError, PromptTooLongError
from encloud.server.inference.kv_buffer import KVLayout, KVStore
from encloud.server.inference.manifest import Manifest, verify_model_folder
from encloud.server.inference.runner import ModelRunner
from encloud.server.inference.sampling import Sampler
from encloud.server.inference.scheduler import (
    DEFAULT_KV_BUDGET_TOKENS,
    DEFAULT_MAX_BATCH,
    DEFAULT_PREFILL_CHUNK_TOKENS,
    AsyncStream,
    BatchScheduler,
    Delivery,
    GenerationResult,
    _Request,
    _stop_holdback,
    describe,
)
from encloud.server.inference.tokenizer import ChatTokenizer

ROLES = frozenset({"system", "user", "assistant"})
ENGINE_NAME = "onnxruntime"
KNOWN_ANSWER_LABEL = "encloud/v1 known answer"
KNOWN_ANSWER_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
)
KNOWN_ANSWER_NEW_TOKENS = 16
_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidArgumentError(f"role must be one of {sorted(ROLES)}")
        if not isinstance(self.content, str):
            raise InvalidArgumentError("message content must be text")


@dataclass(frozen=True)
class GenerationParams:
    messages: tuple[ChatTurn, ...]
    max_new_tokens: int
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # None or 1.0: off. >1 discourages every token already in the prompt or the answer.
    repetition_penalty: float | None = None
    # Token ids that end the answer (finish reason "stop"), beside the model's end tokens.
    stop_token_ids: tuple[int, ...] = ()


def cpu_feature_class() -> str:
    """Architecture plus the SIMD/matrix features that select ONNX Runtime's CPU kernels."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    present = [f for f in _CPU_FLAGS if f in flags]
    return "+".join([platform.machine() or "unknown", *present])


def cuda_available() -> bool:
    """Whether CUDA can run here: the installed ONNX Runtime has the CUDA provider
    (onnxruntime-gpu) and the machine has an NVIDIA device node."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


class Engine:
    """One loaded model. Create with :meth:`Engine.load`. ``stream`` may be called from several
    threads at once and ``astream`` from event loops; the scheduler thread batches them."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        tokenizer: ChatTokenizer,
        runner: ModelRunner,
        *,
        threads: int,
        spinning: bool,
        context_length: int,
        eos_ids: frozenset[int],
    ) -> None:
        self._folder = folder
        self._manifest = manifest
        self._tokenizer = tokenizer
        self._runner = runner
        self._threads = threads
        self._spinning = spinning
        self._context_length = context_length
        self._eos_ids = eos_ids
        self._vocab_size = runner.vocab_size
        self._known_answer = ""
        self._scheduler: BatchScheduler | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        threads: int = 2,
        provider: str = "cpu",
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS,
        spinning: bool = True,
        kv_store: Callable[[KVLayout], KVStore] | None = None,
    ) -> Engine:
        """Verify ``folder`` against its manifest, load it, start the scheduler (``max_batch``
        rows, prompts prefilled ``prefill_chunk_tokens`` at a time, at most
        ``kv_budget_tokens`` cached tokens reserved in all) and compute the known answer.
        ``kv_store`` replaces the provider's KV store (tests: the device store over host
        memory)."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        folder = Path(folder)
        manifest = verify_model_folder(folder)
        genai_cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        context_length = int(genai_cfg["model"]["context_length"])
        cfg_eos = genai_cfg["model"].get("eos_token_id", [])
        eos_ids = frozenset(int(t) for t in (cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]))
        tokenizer = ChatTokenizer(folder, manifest.chat_template)
        runner = ModelRunner(
            folder,
            threads=threads,
            spinning=spinning,
            provider=provider,
            max_rows=max_batch,
            max_len=min(context_length, kv_budget_tokens),
            kv_store=kv_store,
        )
        engine = cls(
            folder,
            manifest,
            tokenizer,
            runner,
            threads=threads,
            spinning=spinning,
            context_length=context_length,
            eos_ids=eos_ids,
        )
        engine._scheduler = BatchScheduler(
            runner,
            tokenizer,
            eos_ids=eos_ids,
            max_batch=max_batch,
            prefill_chunk_tokens=prefill_chunk_tokens,
            kv_budget_tokens=kv_budget_tokens,
        )
        try:
            engine._known_answer = engine._compute_known_answer()
        except BaseException:
            engine.close()
            raise
        return engine

    def close(self) -> None:
        """Stop the scheduler thread; running generations end with an error."""
        if self._scheduler is not None:
            self._scheduler.close()

    def _compute_known_answer(self) -> str:
        fields = []
        for prompt in KNOWN_ANSWER_PROMPTS:
            tokens = self._greedy_ids((ChatTurn("user", prompt),), KNOWN_ANSWER_NEW_TOKENS)
            fields.append(b"".join(u32(t) for t in tokens))
        return sha256(encode(KNOWN_ANSWER_LABEL, *fields)).hex()

    def _greedy_ids(self, messages: tuple[ChatTurn, ...], n: int) -> list[int]:
        """Greedy token ids (eos included) through the serving path."""
        tokens: list[int] = []
        request = self._request(
            GenerationParams(messages=messages, max_new_tokens=n), lambda: False, ""
        )
        request.sampler = _Recording(request.sampler, tokens)  # type: ignore[assignment]
        for _item in self.scheduler.submit(request):
            pass
        return tokens

    # ------------------------------------------------------------------ properties

    @property
    def model_digest(self) -> bytes:
        return self._manifest.model_digest

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def precision(self) -> str:
        return str(self._manifest.source.get("precision", "unknown"))

    def facts(self) -> dict:
        """What the engine reports about itself for the runtime event, JSON-able, no floats.

        Only what the engine found or derived (versions, the session options it built, the
        precision, the known answer): every setting it was given (provider, threads, batch
        sizes) is in the event's settings part, from the settings object
        (encloud.server.runtime_event)."""
        return {
            "engine": ENGINE_NAME,
            "versions": {
                "onnxruntime": ort.__version__,
                "tokenizers": _version("tokenizers"),
                "jinja2": _version("jinja2"),
            },
            "session_options": _session_options(self._threads, self._spinning),
            "graph": "shared KV buffer" if self._runner.shared_buffer else "concatenated KV",
            "precision": self.precision,
            "model_digest": self.model_digest.hex(),
            "context_length": self._context_length,
            "decoding": {
                "greedy_unless_temperature": True,
                "repetition_penalty": "off unless requested",
                "sampler": "encloud numpy (sampling.py), per request",
                "chat_template": "manifest",
            },
            "batching": describe(self._scheduler) if self._scheduler else None,
            "cpu": cpu_feature_class(),
            "known_answer": self._known_answer,
            "known_answer_prompts": list(KNOWN_ANSWER_PROMPTS),
            "known_answer_max_new_tokens": KNOWN_ANSWER_NEW_TOKENS,
        }

    @property
    def known_answer(self) -> str:
        return self._known_answer

    # ------------------------------------------------------------------ prompts

    def render_prompt(self, messages: Sequence[ChatTurn]) -> str:
        """The chat-template rendering of ``messages`` with the assistant turn opened."""
        if not messages:
            raise InvalidArgumentError("at least one message is required")
        if not all(isinstance(turn, ChatTurn) for turn in messages):
            raise InvalidArgumentError("messages must be ChatTurn values")
        return self._tokenizer.render(messages)

    def _encode_messages(self, messages: Sequence[ChatTurn]) -> np.ndarray:
        ids = self._tokenizer.encode(self.render_prompt(messages))
        return np.asarray(ids, dtype=np.int64)

    def count_prompt_tokens(self, messages: Sequence[ChatTurn]) -> int:
        return len(self._encode_messages(messages))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids)

    # ------------------------------------------------------------------ generation

    def stream(
        self, params: GenerationParams, should_stop: Callable[[], bool], peer: str = ""
    ) -> Iterator[str | GenerationResult]:
        """Validate ``params`` and tokenise the prompt now (raising ``InvalidArgumentError`` or
        ``PromptTooLongError`` at once), then return an iterator of text pieces (whole
        characters, never empty) ending with exactly one :class:`GenerationResult`.

        The request is queued when the iterator is first advanced. ``should_stop`` is called
        (on the scheduler thread) before each of this request's steps; when it returns true the
        request leaves with ``"cancelled"`` and no further step runs for it. Closing the
        iterator early cancels it the same way. ``peer`` names whose request it is: waiting
        requests are admitted with peers taking turns.
        """
        return self.scheduler.submit(self._request(params, should_stop, peer))

    def astream(
        self,
        params: GenerationParams,
        should_stop: Callable[[], bool],
        peer: str = "",
        on_end: Callable[[str], None] | None = None,
    ) -> AsyncStream:
        """:meth:`stream` for an event loop (call it on the loop). The request is queued at
        once; the engine thread hands every step's output for all of this loop's requests
        over in one wake-up, and no thread waits per request. ``aclose()`` cancels it.
        ``on_end(finish_reason)`` runs once on the engine thread when it ends, however it
        ends ("error" for a failure)."""
        request = self._request(params, should_stop, peer)
        request.delivery = Delivery(asyncio.get_running_loop())
        request.on_end = on_end
        return self.scheduler.asubmit(request)

    def _request(
        self, params: GenerationParams, should_stop: Callable[[], bool], peer: str
    ) -> _Request:
        _validate(params, self._vocab_size)
        ids = self._encode_messages(params.messages)
        n_prompt = len(ids)
        room = min(self._context_length, self.scheduler.kv_budget)
        if n_prompt + 1 > room:
            # Never the figures: the prompt's size is the caller's secret (docs/ERRORS.md).
            raise PromptTooLongError("the prompt is longer than the model's context")
        return _Request(
            ids=ids,
            max_new_tokens=min(params.max_new_tokens, room - n_prompt),
            stops=tuple(s for s in params.stop if s),
            stop_ids=frozenset(params.stop_token_ids),
            sampler=Sampler(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                repetition_penalty=params.repetition_penalty,
                seed=params.seed,
                prompt_ids=ids.tolist(),
            ),
            should_stop=should_stop,
            peer=peer,
        )

    @contextlib.contextmanager
    def hold_admission(self) -> Iterator[None]:
        """Tests and benchmarks: requests submitted while held are admitted in one step."""
        assert self._scheduler is not None
        with self._scheduler.hold_admission():
            yield

    @property
    def scheduler(self) -> BatchScheduler:
        if self._scheduler is None:
            raise RuntimeError("engine is not started")
        return self._scheduler

    @property
    def runner(self) -> ModelRunner:
        return self._runner


class _Recording:
    """A sampler that records every token it is shown (the known answer's ids)."""

    def __init__(self, inner: Sampler, into: list[int]) -> None:
        self._inner = inner
        self._into = into
        self.needs_logits = inner.needs_logits

    def observe(self, token: int) -> None:
        self._into.append(int(token))
        self._inner.observe(token)

    def choose(self, logits: np.ndarray) -> int:
        return self._inner.choose(logits)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _session_options(threads: int, spinning: bool) -> dict[str, object]:
    """The session options runner.session_options builds, as the runtime event shows them."""
    return {
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "allow_spinning": spinning,
    }


def _validate(params: GenerationParams, vocab_size: int) -> None:
    if not isinstance(params.messages, tuple) or not params.messages:
        raise InvalidArgumentError("messages must be a non-empty tuple of ChatTurn")
    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
        raise InvalidArgumentError("max_new_tokens must be a positive integer")
    if params.temperature is not None and not (0.0 <= params.temperature <= 5.0):
        raise InvalidArgumentError("temperature must be between 0 and 5")
    if params.top_p is not None and not (0.0 < params.top_p <= 1.0):
        raise InvalidArgumentError("top_p must be in (0, 1]")
    if params.top_k is not None and not (0 <= params.top_k <= 1_000_000):
        raise InvalidArgumentError("top_k must be a non-negative integer")
    if params.seed is not None and not (0 <= params.seed < 2**31):
        raise InvalidArgumentError("seed must be a non-negative 31-bit integer")
    if params.repetition_penalty is not None and not (0.0 < params.repetition_penalty <= 10.0):
        raise InvalidArgumentError("repetition_penalty must be in (0, 10]")
    # How many stops a request may have is a setting, checked where requests come in
    # (grpc_converters); here only what the engine itself needs.
    if not isinstance(params.stop_token_ids, tuple) or any(
        not isinstance(t, int) or not (0 <= t < vocab_size) for t in params.stop_token_ids
    ):
        raise InvalidArgumentError("stop token ids must be token ids of the model")
    if not isinstance(params.stop, tuple) or any(not isinstance(s, str) for s in params.stop):
        raise InvalidArgumentError("stop strings must be text")


__all__ = [
    "ChatTurn",
    "Engine",
    "GenerationParams",
    "GenerationResult",
    "_stop_holdback",
    "cpu_feature_class",
]
