"""Protobuf <-> domain types. Protobuf does not travel past this module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from encloud.protocol.faults import (
    InvalidArgumentError,
    InvalidRequestPayloadError,
    MalformedMessageError,
)
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.wire import (  # noqa: F401 - the servicer converts through here
    evidence_to_proto,
    sealed_from_proto,
    sealed_to_proto,
    suite_from_proto,
)
from encloud.server.inference.engine import ChatTurn, GenerationParams, GenerationResult
from encloud.server.settings import Settings

_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "key_exhausted": pb.FINISH_REASON_KEY_EXHAUSTED,
}


M = TypeVar("M", bound=Message)


def parse(message_type: type[M], data: bytes) -> M:
    """An RPC request from its bytes; INVALID_ARGUMENT (MALFORMED_MESSAGE) if it does not parse."""
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError:
        raise MalformedMessageError("the request is not a valid protobuf message") from None
    return message


def generation_params_from_payload(payload: bytes, settings: Settings) -> GenerationParams:
    """Parse and validate a decrypted GenerationRequest. Messages never echo content."""
    request = pb.GenerationRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError:
        # Also covers invalid UTF-8 in a string field.
        raise InvalidRequestPayloadError(
            "the request payload is not a valid GenerationRequest"
        ) from None
    if not request.messages:
        raise InvalidArgumentError("the request has no messages")
    turns = []
    for message in request.messages:
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidArgumentError("a message has no valid role")
        turns.append(ChatTurn(role=role, content=message.content))
    max_new = request.max_new_tokens or settings.default_max_new_tokens
    if max_new > settings.max_new_tokens_limit:
        raise InvalidArgumentError(
            "max_new_tokens is above the server's limit (max_new_tokens_limit in the attested "
            "runtime event)"
        )
    temperature = request.temperature if request.HasField("temperature") else None
    if temperature is not None and not 0.0 <= temperature <= 10.0:
        raise InvalidArgumentError("temperature must be in [0, 10]")
    top_p = request.top_p if request.HasField("top_p") else None
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidArgumentError("top_p must be in (0, 1]")
    top_k = request.top_k if request.HasField("top_k") and request.top_k else None
    if len(request.stop) > settings.max_stop_strings or any(
        not s or len(s) > settings.max_stop_string_chars for s in request.stop
    ):
        raise InvalidArgumentError(
            "too many or too long stop strings (max_stop_strings, max_stop_string_chars in "
            "the attested runtime event)"
        )
    penalty = request.repetition_penalty if request.HasField("repetition_penalty") else None
    if penalty is not None and not 0.0 < penalty <= 10.0:
        raise InvalidArgumentError("repetition_penalty must be in (0, 10]")
    if len(request.stop_token_ids) > settings.max_stop_token_ids:
        raise InvalidArgumentError(
            "too many stop token ids (max_stop_token_ids in the attested runtime event)"
        )
    return GenerationParams(
        messages=tuple(turns),
        max_new_tokens=max_new,
        temperature=temperature or None,
        top_p=top_p,
        top_k=top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        repetition_penalty=penalty,
        stop_token_ids=tuple(request.stop_token_ids),
    )


@dataclass(frozen=True)
class EmbedParams:
    """A decrypted EmbeddingRequest, its shape checked (limits that need tokens: core)."""

    texts: tuple[str, ...]
    dimensions: int | None
    normalize: bool
    truncate: bool


def embed_params_from_payload(payload: bytes, settings: Settings) -> EmbedParams:
    """Parse and validate a decrypted EmbeddingRequest. Messages never echo content."""
    request = pb.EmbeddingRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError:  # also invalid UTF-8 in a text
        raise InvalidRequestPayloadError(
            "the request payload is not a valid EmbeddingRequest"
        ) from None
    if not request.texts:
        raise InvalidArgumentError("the request has no texts")
    if len(request.texts) > settings.embed_max_texts:
        raise InvalidArgumentError(
            "more texts than the server's limit (embed_max_texts in the attested runtime event)"
        )
    return EmbedParams(
        texts=tuple(request.texts),
        dimensions=request.dimensions or None,
        normalize=not request.unnormalized,
        truncate=request.truncate,
    )


def chunk_payload(text: str) -> bytes:
    return pb.GenerationChunk(text=text).SerializeToString()


def final_message(
    finish_reason: str, result: GenerationResult | None, transcript: bytes
) -> pb.GenerationFinal:
    return pb.GenerationFinal(
        finish_reason=_FINISH_REASONS[finish_reason],
        usage=pb.Usage(
            prompt_tokens=result.prompt_tokens if result else 0,
            completion_tokens=result.completion_tokens if result else 0,
        ),
        transcript_hash=transcript,
    )


def final_payload(finish_reason: str, result: GenerationResult | None, transcript: bytes) -> bytes:
    return final_message(finish_reason, result, transcript).SerializeToString()


def response_payload(text: str, result: GenerationResult, transcript: bytes) -> bytes:
    return pb.GenerationResponse(
        text=text, final=final_message(result.finish_reason, result, transcript)
    ).SerializeToString()
