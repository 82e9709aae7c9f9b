"""Token coalescing on a fixed clock (`stream_frame_interval_ms`), on a real server.

With the clock on, a FRAME goes out on every tick whether or not text arrived (empty FRAMEs
are valid in protocol v2), so the frames' number follows elapsed time, not the token count.
What is asserted is structure, never speed: the same answer as without the clock; empty frames
on the wire while a long prompt is prefilled (the relay sees every FRAME); no empty piece
reaches the application.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from relay import Relay
from stack import Stack, running_stack

from encloud.client import NO_AUDIT, Client
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.server.inference.engine import ChatTurn, Engine, GenerationParams, GenerationResult

pytestmark = pytest.mark.e2e

FRAME, FINAL = 3, 4
LONG_PROMPT = "Read this list, then say which item is last. " + " ".join(
    f"Item {i} is a small red box." for i in range(120)
)


@pytest.fixture(scope="module")
def stack(model_dir: Path) -> Iterator[Stack]:
    with (
        tempfile.TemporaryDirectory(prefix="encloud-clock-") as tmp,
        running_stack(Path(tmp), model_dir, stream_frame_interval_ms=10) as running,
    ):
        yield running


def _answer(target: str, stack: Stack, prompt: str) -> tuple[list[str], str]:
    with Client(target, stack.policy, audit_log=NO_AUDIT, timeout=120) as client:
        client.attest()
        client.release_key()
        stream = client.stream([("user", prompt)], max_new_tokens=24)
        pieces = list(stream)
        assert stream.completion is not None
        return pieces, stream.completion.finish_reason


def _plain_answer(model_dir: Path) -> tuple[str, str]:
    """The same request without any clock: the engine in process (greedy, the server's threads)."""
    engine = Engine.load(model_dir, threads=2)
    try:
        items = list(engine.stream(GenerationParams((ChatTurn("user", LONG_PROMPT),), 24), bool))
    finally:
        engine.close()
    result = items[-1]
    assert isinstance(result, GenerationResult)
    return "".join(str(i) for i in items[:-1]), result.finish_reason


def test_a_frame_every_tick_empty_ones_included_and_the_same_answer(
    stack: Stack, model_dir: Path
) -> None:
    plain, plain_finish = _plain_answer(model_dir)
    seen: list[pb.SealedMessage] = []

    def record(_index: int, message: bytes) -> bytes:
        seen.append(pb.StreamInferResponse.FromString(message).frame)
        return message

    relay = Relay(stack.address).start()
    relay.rewrite_stream["StreamInfer"] = record
    try:
        clocked, clocked_finish = _answer(relay.address, stack, LONG_PROMPT)
    finally:
        relay.stop()
    assert "".join(clocked) == plain and clocked_finish == plain_finish
    assert all(piece for piece in clocked)  # the client shows no empty frame
    frames = [m for m in seen if m.type == FRAME]
    assert [m.type for m in seen] == [FRAME] * len(frames) + [FINAL]
    # More frames than text pieces: the ticks during the prefill of ~1,000 prompt tokens
    # carried no text (padded like any other frame, docs/PROTOCOL.md).
    assert len(frames) > len(clocked)
