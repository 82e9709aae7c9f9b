"""The ONNX Runtime GenAI engine: loads a verified model folder and streams chat completions.

Imports neither torch nor transformers (directly or indirectly): only the standard library,
numpy, onnxruntime_genai and this package's manifest, encoding and errors.

Prompts are rendered with onnxruntime-genai's ``Tokenizer.apply_chat_template`` given, as
``template_str``, the chat template recorded in the verified manifest (so the template that is
measured in the model digest is the one used). Message contents that contain one of the
tokenizer's special-token strings (``<|im_start|>``, ``<|im_end|>``, ...) are refused: the
tokenizer would turn them into control tokens and let a message forge role boundaries.

Text is detokenised incrementally with onnxruntime-genai's ``TokenizerStream``, which returns
only whole UTF-8 characters (it returns "" while a character's bytes are incomplete).

Concurrent ``stream`` calls are batched by a
:class:`~encloud.server.inference.scheduler.BatchScheduler` thread that owns every generator
(see that module for the cohort design and docs/MODEL_PIPELINE.md for the figures).

Known answer (in :meth:`Engine.facts`)::

    known_answer = SHA256(E("encloud/v1 known answer", T_1, T_2))
    T_i = u32_be(token_1) || ... || u32_be(token_k)

the token ids greedily decoded (at most ``KNOWN_ANSWER_NEW_TOKENS``, stopping early only at
eos, which is included) for the fixed chat prompts ``KNOWN_ANSWER_PROMPTS`` (each one user
turn, rendered with the model's chat template), computed once at load, batch 1, before the
scheduler starts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from encloud.protocol.encoding import encode, sha256, u32
from encloud.protocol.faults import InvalidArgumentError, PromptTooLongError
from encloud.server.inference.manifest import Manifest, verify_model_folder
from encloud.server.inference.sampling import Sampler
from encloud.server.inference.scheduler import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_COHORTS,
    BatchScheduler,
    GenerationResult,
    _Request,
    _stop_holdback,
    describe,
    pad_token_id,
)

ROLES = frozenset({"system", "user", "assistant"})
ENGINE_NAME = "onnxruntime-genai"
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


def _onnxruntime_version() -> str:
    """Version of the ONNX Runtime library actually mapped in (onnxruntime-genai dlopens the
    one of the ``onnxruntime`` wheel), else the installed wheel's metadata."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                name = line.rsplit("/", 1)[-1].strip()
                if name.startswith("libonnxruntime.so."):
                    return name.removeprefix("libonnxruntime.so.")
    except OSError:
        pass
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _special_tokens(folder: Path) -> dict[str, int]:
    """The tokenizer's special tokens, content -> id."""
    try:
        tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {
        t["content"]: int(t["id"])
        for t in tok.get("added_tokens", [])
        if t.get("special") and isinstance(t.get("content"), str) and t["content"]
    }


class Engine:
    """One loaded model. Create with :meth:`Engine.load`. ``stream`` may be called from several
    threads at once; the scheduler thread batches them."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        model: og.Model,
        tokenizer: og.Tokenizer,
        *,
        threads: int,
        provider: str,
        context_length: int,
        eos_ids: frozenset[int],
        special_tokens: tuple[str, ...],
        pad_id: int,
    ) -> None:
        self._folder = folder
        self._manifest = manifest
        self._model = model
        self._tokenizer = tokenizer
        self._threads = threads
        self._provider = provider
        self._context_length = context_length
        self._eos_ids = eos_ids
        self._special_tokens = special_tokens
        self._pad_id = pad_id
        self._vocab_size = int(model_vocab_size(folder))
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
        max_cohorts: int = DEFAULT_MAX_COHORTS,
    ) -> Engine:
        """Verify ``folder`` against its manifest, load it, compute the known answer and start
        the scheduler (``max_batch`` requests per cohort, ``max_cohorts`` cohorts at once)."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        folder = Path(folder)
        manifest = verify_model_folder(folder)
        genai_cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        context_length = int(genai_cfg["model"]["context_length"])
        specials = _special_tokens(folder)
        cfg_eos = genai_cfg["model"].get("eos_token_id", [])
        cfg_eos = cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]
        not_pad = frozenset(int(t) for t in (*cfg_eos, genai_cfg["model"].get("bos_token_id", -1)))
        pad_id = pad_token_id(
            list(specials.values()), not_pad, int(genai_cfg["model"].get("pad_token_id", 0))
        )
        cfg = og.Config(str(folder))
        # The pad token matters only for right-padding batched prompts (see scheduler.py).
        cfg.overlay(
            json.dumps(
                {
                    "model": {
                        "pad_token_id": pad_id,
                        "decoder": {"session_options": _session_options(threads)},
                    }
                }
            )
        )
        if provider != "cpu":
            cfg.clear_providers()
            cfg.append_provider(provider)
        model = og.Model(cfg)
        tokenizer = og.Tokenizer(model)
        eos_ids = frozenset(int(t) for t in tokenizer.eos_token_ids)
        engine = cls(
            folder,
            manifest,
            model,
            tokenizer,
            threads=threads,
            provider=provider,
            context_length=context_length,
            eos_ids=eos_ids,
            special_tokens=tuple(specials),
            pad_id=pad_id,
        )
        engine._known_answer = engine._compute_known_answer()
        engine._scheduler = BatchScheduler(
            model,
            tokenizer,
            eos_ids=eos_ids,
            pad_id=pad_id,
            context_length=context_length,
            max_batch=max_batch,
            max_cohorts=max_cohorts,
        )
        return engine

    def close(self) -> None:
        """Stop the scheduler thread; running generations end with an error."""
        if self._scheduler is not None:
            self._scheduler.close()

    def _compute_known_answer(self) -> str:
        fields = []
        for prompt in KNOWN_ANSWER_PROMPTS:
            ids = self._encode_messages((ChatTurn("user", prompt),))
            tokens = list(self._greedy_ids(ids, KNOWN_ANSWER_NEW_TOKENS))
            fields.append(b"".join(u32(t) for t in tokens))
        return sha256(encode(KNOWN_ANSWER_LABEL, *fields)).hex()

    def _greedy_ids(self, ids: np.ndarray, n: int) -> Iterator[int]:
        params = og.GeneratorParams(self._model)
        params.set_search_options(
            do_sample=False, max_length=min(len(ids) + n, self._context_length)
        )
        gen = og.Generator(self._model, params)
        gen.append_tokens(ids)
        for _ in range(n):
            if gen.is_done():
                break
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            yield tok
            if tok in self._eos_ids:
                break

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
                "onnxruntime-genai": og.__version__,
                "onnxruntime": _onnxruntime_version(),
            },
            "session_options": _session_options(self._threads),
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
        payload = []
        for turn in messages:
            if not isinstance(turn, ChatTurn):
                raise InvalidArgumentError("messages must be ChatTurn values")
            for special in self._special_tokens:
                if special in turn.content:
                    raise InvalidArgumentError("message contains a reserved control token")
            payload.append({"role": turn.role, "content": turn.content})
        return self._tokenizer.apply_chat_template(
            json.dumps(payload, ensure_ascii=False),
            template_str=self._manifest.chat_template,
            add_generation_prompt=True,
        )

    def _encode_messages(self, messages: Sequence[ChatTurn]) -> np.ndarray:
        ids = self._tokenizer.encode(self.render_prompt(messages))
        return np.asarray(ids, dtype=np.int32)

    def count_prompt_tokens(self, messages: Sequence[ChatTurn]) -> int:
        return len(self._encode_messages(messages))

    # ------------------------------------------------------------------ generation

    def stream(
        self, params: GenerationParams, should_stop: Callable[[], bool], peer: str = ""
    ) -> Iterator[str | GenerationResult]:
        """Validate ``params`` and tokenise the prompt now (raising ``InvalidArgumentError`` or
        ``PromptTooLongError`` at once), then return an iterator of text pieces (whole
        characters, never empty) ending with exactly one :class:`GenerationResult`.

        The request joins a batch when the iterator is first advanced. ``should_stop`` is called
        (on the scheduler thread) before each of this request's decode steps; when it returns
        true the request leaves the batch with ``"cancelled"`` and no further step runs for it.
        Closing the iterator early cancels it the same way. ``peer`` names whose request it
        is: the scheduler shares cohort slots and places between peers.
        """
        _validate(params, self._vocab_size)
        ids = self._encode_messages(params.messages)
        n_prompt = len(ids)
        if n_prompt + 1 > self._context_length:
            # Never the figures: the prompt's size is the caller's secret (docs/ERRORS.md).
            raise PromptTooLongError("the prompt is longer than the model's context")
        if self._scheduler is None:
            raise RuntimeError("engine is not started")
        request = _Request(
            ids=ids,
            max_new_tokens=min(params.max_new_tokens, self._context_length - n_prompt),
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
        return self._scheduler.submit(request)

    @contextlib.contextmanager
    def hold_admission(self) -> Iterator[None]:
        """Tests and benchmarks: requests submitted while held start together as one batch."""
        assert self._scheduler is not None
        with self._scheduler.hold_admission():
            yield

    @property
    def scheduler(self) -> BatchScheduler:
        assert self._scheduler is not None
        return self._scheduler


def model_vocab_size(folder: Path) -> int:
    cfg = json.loads((Path(folder) / "genai_config.json").read_text(encoding="utf-8"))
    return int(cfg["model"]["vocab_size"])


def _session_options(threads: int) -> dict[str, object]:
    return {"intra_op_num_threads": threads, "inter_op_num_threads": 1}


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
