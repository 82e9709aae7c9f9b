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

Known answer (in :meth:`Engine.runtime_event`)::

    known_answer = SHA256(E("encloud/v1 known answer", T_1, T_2))
    T_i = u32_be(token_1) || ... || u32_be(token_k)

the token ids greedily decoded (at most ``KNOWN_ANSWER_NEW_TOKENS``, stopping early only at
eos, which is included) for the fixed chat prompts ``KNOWN_ANSWER_PROMPTS`` (each one user
turn, rendered with the model's chat template), computed once at load.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from encloud.client.encoding import encode, sha256, u32
from encloud.server.errors import InvalidArgumentError, PromptTooLongError
from encloud.server.inference.manifest import Manifest, verify_model_folder

ROLES = frozenset({"system", "user", "assistant"})
ENGINE_NAME = "onnxruntime-genai"
DEFAULT_MAX_NEW_TOKENS = 512
KNOWN_ANSWER_LABEL = "encloud/v1 known answer"
KNOWN_ANSWER_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
)
KNOWN_ANSWER_NEW_TOKENS = 16
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
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


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


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


def _special_token_strings(folder: Path) -> tuple[str, ...]:
    try:
        tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    return tuple(
        t["content"]
        for t in tok.get("added_tokens", [])
        if t.get("special") and isinstance(t.get("content"), str) and t["content"]
    )


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class Engine:
    """One loaded model. Create with :meth:`Engine.load`. ``stream`` may be called from several
    threads; generations are serialised by a lock (batching comes later)."""

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
        self._lock = threading.Lock()
        self._known_answer = ""

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, folder: Path, *, threads: int = 2, provider: str = "cpu") -> Engine:
        """Verify ``folder`` against its manifest, load it, and compute the known answer."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        folder = Path(folder)
        manifest = verify_model_folder(folder)
        genai_cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        context_length = int(genai_cfg["model"]["context_length"])
        cfg = og.Config(str(folder))
        cfg.overlay(
            json.dumps({"model": {"decoder": {"session_options": _session_options(threads)}}})
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
            special_tokens=_special_token_strings(folder),
        )
        engine._known_answer = engine._compute_known_answer()
        return engine

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
        with self._lock:
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

    def runtime_event(self) -> dict:
        """The answer-affecting runtime settings, JSON-able, with no floats."""
        return {
            "engine": ENGINE_NAME,
            "versions": {
                "onnxruntime-genai": og.__version__,
                "onnxruntime": _onnxruntime_version(),
            },
            "provider": self._provider,
            "threads": self._threads,
            "session_options": _session_options(self._threads),
            "precision": self.precision,
            "model_digest": self.model_digest.hex(),
            "context_length": self._context_length,
            "decoding": {
                "default_max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
                "default_greedy": True,
                "repetition_penalty": "1.0",
                "chat_template": "manifest",
            },
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
        self, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> Iterator[str | GenerationResult]:
        """Validate ``params`` and tokenise the prompt now (raising ``InvalidArgumentError`` or
        ``PromptTooLongError`` at once), then return an iterator of text pieces (whole
        characters, never empty) ending with exactly one :class:`GenerationResult`.

        ``should_stop`` is called before every decode step; when it returns true the generation
        ends with ``"cancelled"`` and no further step runs. Close or exhaust the iterator: it
        holds the engine lock while generating.
        """
        _validate(params)
        ids = self._encode_messages(params.messages)
        n_prompt = len(ids)
        if n_prompt + 1 > self._context_length:
            raise PromptTooLongError(
                f"prompt is {n_prompt} tokens; the model's context is {self._context_length}"
            )
        options: dict[str, object] = {
            "max_length": min(n_prompt + params.max_new_tokens, self._context_length)
        }
        if params.temperature:
            options.update(
                do_sample=True,
                temperature=float(params.temperature),
                top_p=float(params.top_p) if params.top_p is not None else 1.0,
                top_k=int(params.top_k) if params.top_k is not None else 0,
            )
        else:
            options["do_sample"] = False
        if params.seed is not None:
            options["random_seed"] = int(params.seed)
        return self._generate(ids, options, params, should_stop)

    def _generate(
        self,
        ids: np.ndarray,
        options: dict[str, object],
        params: GenerationParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[str | GenerationResult]:
        n_prompt = len(ids)
        stops = tuple(s for s in params.stop if s)
        completion = 0
        pending = ""
        finish = "length"
        with self._lock:
            gen_params = og.GeneratorParams(self._model)
            gen_params.set_search_options(**options)
            gen = og.Generator(self._model, gen_params)
            detok = self._tokenizer.create_stream()
            gen.append_tokens(ids)
            while True:
                if should_stop():
                    finish = "cancelled"
                    break
                if completion >= params.max_new_tokens or gen.is_done():
                    finish = "length"
                    break
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
                completion += 1
                if token in self._eos_ids:
                    finish = "stop"
                    break
                piece = detok.decode(token)
                if not piece:
                    continue
                if not stops:
                    yield piece
                    continue
                pending += piece
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    if cut:
                        yield pending[:cut]
                    pending = ""
                    finish = "stop"
                    break
                keep = _stop_holdback(pending, stops)
                if len(pending) > keep:
                    yield pending[: len(pending) - keep]
                    pending = pending[len(pending) - keep :]
            del gen
        if pending:
            yield pending
        yield GenerationResult(finish, n_prompt, completion)


def _session_options(threads: int) -> dict[str, object]:
    return {"intra_op_num_threads": threads, "inter_op_num_threads": 1}


def _validate(params: GenerationParams) -> None:
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
    if len(params.stop) > MAX_STOP_STRINGS or any(
        not isinstance(s, str) or len(s) > MAX_STOP_LENGTH for s in params.stop
    ):
        raise InvalidArgumentError(
            f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters"
        )


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "ChatTurn",
    "Engine",
    "GenerationParams",
    "GenerationResult",
    "cpu_feature_class",
]
