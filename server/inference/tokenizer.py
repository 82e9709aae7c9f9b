"""Chat prompts to token ids and token ids back to text, without onnxruntime-genai.

The engine drives the exported graph with plain ONNX Runtime (engine.py), so the tokenizer is
Hugging Face ``tokenizers`` (Rust, the library that wrote the model's ``tokenizer.json``) and the
chat template is rendered with Jinja2 in the environment Hugging Face renders chat templates in
(sandboxed, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``), the template being the one
recorded in the verified manifest. Both read only files of the verified model folder: nothing
is fetched.

Message contents that contain one of the tokenizer's special-token strings (``<|im_start|>``,
``<|im_end|>``, ...) are refused: the tokenizer would turn them into control tokens and let a
message forge role boundaries.

Text is detokenised incrementally with ``tokenizers.decoders.DecodeStream``, which returns
``None`` while a character's bytes are incomplete and whole characters otherwise; special
tokens are not shown (an end token never reaches it: the scheduler ends the answer first).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from encloud.protocol.faults import InvalidArgumentError


class Turn(Protocol):
    role: str
    content: str


def _raise(message: str) -> None:
    raise InvalidArgumentError(f"the chat template refused the messages: {message}")


class ChatTokenizer:
    """The model's tokenizer and chat template. Thread-safe for encode/render (``tokenizers``
    releases no shared state); each :meth:`decoder` belongs to one request."""

    def __init__(self, folder: Path, chat_template: str) -> None:
        folder = Path(folder)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # content -> id of the special tokens, from the tokenizer already loaded
        self.special_tokens: dict[str, int] = {
            added.content: int(token_id)
            for token_id, added in self._tokenizer.get_added_tokens_decoder().items()
            if added.special and added.content
        }
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(chat_template)
        self._template_vars = _template_tokens(folder)

    def render(self, messages: Sequence[Turn]) -> str:
        """The chat-template rendering of ``messages`` with the assistant turn opened."""
        payload = []
        for turn in messages:
            for special in self.special_tokens:
                if special in turn.content:
                    raise InvalidArgumentError("message contains a reserved control token")
            payload.append({"role": turn.role, "content": turn.content})
        return self._template.render(
            messages=payload, add_generation_prompt=True, **self._template_vars
        )

    def encode(self, text: str) -> list[int]:
        # The template wrote every control token as text: nothing is added around it.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def decoder(self) -> TextStream:
        return TextStream(self._tokenizer)


class TextStream:
    """One request's incremental detokeniser: whole UTF-8 characters only."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self._stream.step(self._tokenizer, token) or ""


def _template_tokens(folder: Path) -> dict[str, Any]:
    """``bos_token`` / ``eos_token`` / ... as Hugging Face passes them to a chat template."""
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


__all__ = ["ChatTokenizer", "TextStream"]
