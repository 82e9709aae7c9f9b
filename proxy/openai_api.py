"""The OpenAI chat-completions and embeddings APIs, translated to encloud's requests and back.

Pure functions, no I/O: request JSON -> (messages, generation parameters), answers ->
OpenAI response and chunk objects, and failures -> an OpenAI error object with its HTTP
status. A parameter the server cannot honour is accepted only at its neutral value and
refused otherwise, naming it: never silently ignored (docs/PROXY.md).
"""

from __future__ import annotations

import base64
import secrets
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from encloud.protocol.errors import (
    EncloudError,
    EnvelopeError,
    KeyConfirmationError,
    RoleNotAttestedError,
    ServiceError,
    SessionError,
    VerificationError,
)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted, and only at these values: the server has no such feature.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": (None,),
    "tools": (None,),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None,),
}
HANDLED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",  # an end-user id for the caller's own records: it changes no answer
}
MAX_STOPS = 4  # as OpenAI


@dataclass
class OpenAIError(Exception):
    """An error as OpenAI's API reports it: an HTTP status and {"error": {...}}."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ChatRequest:
    messages: list[tuple[str, str]]
    params: dict[str, Any]
    stream: bool
    include_usage: bool


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad("only text content parts are supported", where, "unsupported_value")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad("a text part needs a string 'text'", where)
            parts.append(text)
        return "".join(parts)
    raise _bad("content must be a string or a list of text parts", where)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(f"{name} must be a number in [{low}, {high}]", name)
    return float(value)


def _neutral(name: str, value: object, allowed: tuple[Any, ...]) -> bool:
    if value in ({}, []):
        return True
    if name == "response_format" and value == {"type": "text"}:
        return True
    return any(value == a and type(value) is type(a) for a in allowed if a is not None) or (
        value is None and None in allowed
    )


def parse_chat_request(body: object, model_ids: frozenset[str]) -> ChatRequest:
    """Validate an OpenAI chat-completions body; OpenAIError (400, 404) naming the field."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(body) - HANDLED - set(NEUTRAL))
    if unknown:
        raise _bad(
            f"unsupported parameter(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter"
        )
    for name, allowed in NEUTRAL.items():
        if name in body and not _neutral(name, body[name], allowed):
            raise _bad(
                f"{name} is not supported by this server except at its neutral value",
                name,
                "unsupported_parameter",
            )
    model = body.get("model")
    if not isinstance(model, str) or model not in model_ids:
        raise OpenAIError(
            404,
            f"the model {model!r} does not exist here; GET /v1/models lists the attested one",
            param="model",
            code="model_not_found",
        )
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages must be a non-empty list", "messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _bad(f"{where}.role must be one of {sorted(ROLES)}", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise _bad(f"{where}: unsupported field(s) {sorted(extra)}", where, "unsupported_value")
        messages.append((ROLES[message["role"]], _text(message.get("content"), where)))
    params: dict[str, Any] = {}
    limits = {k: body.get(k) for k in ("max_tokens", "max_completion_tokens") if body.get(k)}
    if len(set(limits.values())) > 1:
        raise _bad("max_tokens and max_completion_tokens differ", "max_completion_tokens")
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(f"{name} must be a positive integer", name)
        params["max_new_tokens"] = value
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature:
        params["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0:
            raise _bad("top_p must be above 0", "top_p")
        params["top_p"] = top_p
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise _bad("seed must be an integer in [0, 2^31)", "seed")
        params["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOPS:
            raise _bad(f"at most {MAX_STOPS} stop sequences", "stop")
        if stops:
            params["stop"] = stops
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options supports include_usage only", "stream_options")
    if options and not stream:
        raise _bad("stream_options needs stream: true", "stream_options")
    return ChatRequest(messages, params, stream, bool(options.get("include_usage")))


@dataclass(frozen=True)
class EmbeddingsRequest:
    texts: list[str]
    dimensions: int | None
    base64: bool
    single: bool


EMBEDDINGS_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


def parse_embeddings_request(body: object, model_ids: frozenset[str]) -> EmbeddingsRequest:
    """Validate an OpenAI embeddings body; OpenAIError (400, 404) naming the field. Token-id
    input is refused: the server tokenises (it knows the model's tokenizer, the caller may
    not)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(body) - EMBEDDINGS_FIELDS)
    if unknown:
        raise _bad(
            f"unsupported parameter(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter"
        )
    model = body.get("model")
    if not isinstance(model, str) or model not in model_ids:
        raise OpenAIError(
            404,
            f"the model {model!r} does not exist here; GET /v1/models lists the attested ones",
            param="model",
            code="model_not_found",
        )
    raw = body.get("input")
    single = isinstance(raw, str)
    texts = [raw] if single else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad("input must be a string or a non-empty list of strings", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise _bad("dimensions must be a positive integer", "dimensions")
    return EmbeddingsRequest(texts, dimensions, fmt == "base64", single)


def embeddings_response(
    model: str, vectors: list[list[float]], prompt_tokens: int, as_base64: bool
) -> dict[str, Any]:
    """OpenAI's embeddings list; base64 is little-endian float32, as OpenAI sends it."""

    def encode(vector: list[float]) -> list[float] | str:
        if not as_base64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


FINISH_REASONS = {"stop": "stop", "length": "length"}


def finish_reason(reason: str) -> str:
    """OpenAI's finish reason; a cancelled or key-exhausted generation is an error, never a
    'stop' (the answer is incomplete)."""
    mapped = FINISH_REASONS.get(reason)
    if mapped is None:
        raise OpenAIError(
            502,
            f"the generation ended without completing ({reason}); send the request again",
            type="api_error",
            code=f"generation_{reason}",
        )
    return mapped


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    cid: str, model: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason(reason),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    reason: str | None = None,
    *,
    include_usage: bool = False,
    totals: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One streamed chunk; `delta` None makes the usage-only chunk (no choices)."""
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }
    if include_usage:
        out["usage"] = totals
    return out


# One table: how an encloud failure reaches an OpenAI client (docs/ERRORS.md, "proxy").
STATUS_TABLE: dict[str, tuple[int, str, str]] = {
    # gRPC code: (HTTP status, OpenAI type, code)
    "INVALID_ARGUMENT": (400, "invalid_request_error", "invalid_request"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limited"),
    "UNAVAILABLE": (503, "api_error", "upstream_unavailable"),
    "DEADLINE_EXCEEDED": (504, "api_error", "upstream_timeout"),
    "CANCELLED": (499, "api_error", "cancelled"),
    "NOT_FOUND": (502, "api_error", "session_lost"),
    "PERMISSION_DENIED": (502, "api_error", "upstream_refused"),
    "FAILED_PRECONDITION": (502, "api_error", "upstream_refused"),
    "UNIMPLEMENTED": (404, "invalid_request_error", "model_not_found"),
    "ALREADY_EXISTS": (502, "api_error", "upstream_refused"),
    "INTERNAL": (502, "api_error", "upstream_error"),
    "UNKNOWN": (502, "api_error", "upstream_error"),
}


def error_from(failure: BaseException) -> OpenAIError:
    """The OpenAI error for a failed call. The message names what failed, never content."""
    if isinstance(failure, OpenAIError):
        return failure
    if isinstance(failure, VerificationError):
        return OpenAIError(
            502,
            f"the server's attestation did not verify under the policy ({failure.check}); "
            "nothing was sent to it",
            type="api_error",
            code="attestation_failed",
        )
    if isinstance(failure, KeyConfirmationError | EnvelopeError):
        return OpenAIError(
            502,
            f"an answer did not verify ({type(failure).__name__}); it was not passed on",
            type="api_error",
            code="verification_failed",
        )
    if isinstance(failure, RoleNotAttestedError):
        return OpenAIError(
            404,
            "the attested server serves no model of this kind (nothing was sent to it)",
            param="model",
            code="model_not_found",
        )
    if isinstance(failure, ServiceError):
        status, kind, code = STATUS_TABLE.get(failure.code, (502, "api_error", "upstream_error"))
        headers = {}
        if failure.retry_after_seconds is not None:
            headers["Retry-After"] = str(max(1, round(failure.retry_after_seconds + 0.499)))
        reason = f" ({failure.reason})" if failure.reason else ""
        return OpenAIError(
            status, f"the server answered {failure.code}{reason}", kind, None, code, headers
        )
    if isinstance(failure, SessionError | EncloudError):
        return OpenAIError(502, f"{type(failure).__name__}", "api_error", None, "upstream_error")
    return OpenAIError(500, "internal error in the proxy", "api_error", None, "internal_error")
