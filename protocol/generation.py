"""Chat requests and answers inside the envelope, without I/O (docs/PROTOCOL.md, step 5).

`generation_request` builds the sealed request's payload from messages and decoding
parameters; `open_answer` checks an Infer response; `StreamReader` checks a StreamInfer
answer frame by frame: contiguous seqs, each opened for this session, request and
position, a final frame whose transcript hash matches, nothing after it. Every client
(sync, asyncio, the load generator) reads answers through these, so the stream rules are
written once.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from encloud.protocol.envelope import MessageType, OpeningKey, Sealed, transcript_next
from encloud.protocol.errors import StreamOrderError, TranscriptMismatchError, TruncatedStreamError
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.wire import sealed_from_proto

ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_KEY_EXHAUSTED: "key_exhausted",
}
PARAMETERS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "repetition_penalty",
    "stop_token_ids",
)

Message = tuple[str, str] | Mapping[str, str]
"""("user", "Hello") or {"role": "user", "content": "Hello"}."""


@dataclass(frozen=True)
class Completion:
    """How an answer ended (the text itself is streamed or in Answer)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Answer:
    text: str
    completion: Completion


def generation_request(messages: Sequence[Message], params: Mapping[str, Any]) -> bytes:
    """The plaintext of a REQUEST: messages and decoding parameters, serialised.

    Raises ValueError for an unknown role, TypeError for an unknown parameter."""
    request = pb.GenerationRequest()
    for message in messages:
        role, content = (
            (message["role"], message["content"])
            if isinstance(message, Mapping)
            else (message[0], message[1])
        )
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        request.messages.add(role=ROLES[role], content=content)
    unknown = set(params) - set(PARAMETERS)
    if unknown:
        raise TypeError(f"unknown generation parameters: {sorted(unknown)}")
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty"):
        if params.get(name) is not None:
            setattr(request, name, params[name])
    request.stop.extend(params.get("stop", ()))
    request.stop_token_ids.extend(params.get("stop_token_ids", ()))
    return request.SerializeToString()


def check_final(final: pb.GenerationFinal, expected_transcript: bytes) -> Completion:
    """The final fields of an answer, once its transcript hash matched."""
    if not hmac.compare_digest(final.transcript_hash, expected_transcript):
        raise TranscriptMismatchError("the final frame does not match what was received")
    reason = FINISH_REASONS.get(final.finish_reason)
    if reason is None:
        raise StreamOrderError("the final frame has no valid finish reason")
    return Completion(reason, final.usage.prompt_tokens, final.usage.completion_tokens)


def open_answer(
    response: pb.SealedMessage, opener: OpeningKey, request_id: int, transcript: bytes
) -> Answer:
    """An Infer response: opened as RESPONSE for this request, bound to its transcript T_0."""
    payload = opener.open(sealed_from_proto(response), MessageType.RESPONSE, request_id, 0)
    answer = pb.GenerationResponse.FromString(payload)
    return Answer(answer.text, check_final(answer.final, transcript))


class StreamReader:
    """Checks one StreamInfer answer as its messages arrive.

    `feed` returns the text of a FRAME (None for the FINAL); `finish` raises
    TruncatedStreamError when the stream ended without its final frame."""

    def __init__(self, opener: OpeningKey, request_id: int, transcript: bytes) -> None:
        self._opener = opener
        self._request_id = request_id
        self._transcript = transcript
        self._seq = 0
        self.completion: Completion | None = None

    @property
    def frames(self) -> int:
        """Frames received so far (an answer has started once this is above 0)."""
        return self._seq

    def feed(self, message: pb.SealedMessage) -> str | None:
        if self.completion is not None:
            raise StreamOrderError("a frame arrived after the final frame")
        sealed: Sealed = sealed_from_proto(message)
        if sealed.type == MessageType.FRAME:
            payload = self._opener.open(sealed, MessageType.FRAME, self._request_id, self._seq)
            self._transcript = transcript_next(self._transcript, self._seq, payload)
            self._seq += 1
            return pb.GenerationChunk.FromString(payload).text
        if sealed.type == MessageType.FINAL:
            payload = self._opener.open(sealed, MessageType.FINAL, self._request_id, self._seq)
            self.completion = check_final(pb.GenerationFinal.FromString(payload), self._transcript)
            return None
        raise StreamOrderError("unexpected message type in a stream")

    def finish(self) -> Completion:
        if self.completion is None:
            raise TruncatedStreamError("the stream ended without its final frame")
        return self.completion
