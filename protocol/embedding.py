"""Embedding requests and answers inside the envelope, without I/O (docs/PROTOCOL.md, "Embed").

`embedding_request` builds the sealed request's payload; `embedding_response` builds the
server's; `open_embeddings` checks an Embed response: opened as EMBED_RESPONSE for this
request, bound to the sealed request by its transcript hash T_0 (the Infer rule), one vector
per text sent, the dimension asked for, and padding rows that are zeros.

Vectors travel as little-endian IEEE-754 float32, row-major, padded with zero rows to the
request's bucket (1, 8, 32, then the server's `embed_max_texts`), so the sealed size shows
the bucket and the dimension, not the number of texts (docs/THREAT_MODEL.md).
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from encloud.protocol.envelope import MessageType, OpeningKey
from encloud.protocol.errors import EmbeddingFormatError, TranscriptMismatchError
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.wire import sealed_from_proto

ROW_BUCKETS = (1, 8, 32)
FLOAT32 = 4


@dataclass(frozen=True)
class Embeddings:
    """The vectors of one Embed request, row i for text i."""

    vectors: list[list[float]]
    dimensions: int
    prompt_tokens: int


def padded_rows(count: int, max_texts: int) -> int:
    """The bucket a response of `count` vectors is padded to: 1, 8, 32, then max_texts."""
    if not 1 <= count <= max(max_texts, 1):
        raise ValueError(f"{count} texts is outside 1..{max_texts}")
    for bucket in ROW_BUCKETS:
        if count <= bucket <= max_texts:
            return bucket
    return max_texts


def embedding_request(
    texts: Sequence[str],
    *,
    dimensions: int | None = None,
    normalize: bool = True,
    truncate: bool = False,
) -> bytes:
    """The plaintext of an EMBED_REQUEST. Raises ValueError on an empty batch or a bad
    dimension, TypeError on a text that is not a str."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("at least one text is needed")
    if any(not isinstance(text, str) for text in texts):
        raise TypeError("every text must be a str")
    if dimensions is not None and dimensions < 1:
        raise ValueError("dimensions must be positive")
    request = pb.EmbeddingRequest(
        texts=texts, dimensions=dimensions or 0, unnormalized=not normalize, truncate=truncate
    )
    return request.SerializeToString()


def embedding_response(
    vectors: bytes, count: int, dimensions: int, rows: int, prompt_tokens: int, transcript: bytes
) -> bytes:
    """The plaintext of an EMBED_RESPONSE: `vectors` holds count x dimensions float32 LE; the
    zero rows up to `rows` are added here."""
    if len(vectors) != count * dimensions * FLOAT32 or not count <= rows:
        raise ValueError("the vectors do not have count x dimensions components")
    padding = bytes((rows - count) * dimensions * FLOAT32)
    response = pb.EmbeddingResponse(
        count=count,
        dimensions=dimensions,
        rows=rows,
        vectors=vectors + padding,
        prompt_tokens=prompt_tokens,
        transcript_hash=transcript,
    )
    return response.SerializeToString()


def open_embeddings(
    response: pb.SealedMessage,
    opener: OpeningKey,
    request_id: int,
    transcript: bytes,
    count: int,
    dimensions: int | None,
) -> Embeddings:
    """An Embed response for `count` texts (and `dimensions`, when the request named one)."""
    payload = opener.open(sealed_from_proto(response), MessageType.EMBED_RESPONSE, request_id, 0)
    try:
        answer = pb.EmbeddingResponse.FromString(payload)
    except DecodeError:
        raise EmbeddingFormatError("the response is not an EmbeddingResponse") from None
    if not hmac.compare_digest(answer.transcript_hash, transcript):
        raise TranscriptMismatchError("the response does not answer the request that was sent")
    if answer.count != count:
        raise EmbeddingFormatError(f"{answer.count} vectors for {count} texts")
    if dimensions is not None and answer.dimensions != dimensions:
        raise EmbeddingFormatError(f"{answer.dimensions} dimensions, {dimensions} asked for")
    if answer.dimensions < 1 or answer.rows < count:
        raise EmbeddingFormatError("the response has no vectors")
    if len(answer.vectors) != answer.rows * answer.dimensions * FLOAT32:
        raise EmbeddingFormatError("the vector block is not rows x dimensions float32")
    used = count * answer.dimensions * FLOAT32
    if any(answer.vectors[used:]):
        raise EmbeddingFormatError("a padding row is not zeros")
    flat = struct.unpack(f"<{count * answer.dimensions}f", answer.vectors[:used])
    width = answer.dimensions
    vectors = [list(flat[i * width : (i + 1) * width]) for i in range(count)]
    return Embeddings(vectors, width, answer.prompt_tokens)
