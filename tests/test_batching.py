"""The continuous-batching scheduler on the real SmolLM2 export (the precision the server
ships): batched answers, per-request decoding parameters and cancellation inside a batch
(counted in engine steps, never in seconds).

Throughput is not asserted here; docs/MODEL_PIPELINE.md has the measured figures.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from encloud.server.inference.engine import ChatTurn, Engine, GenerationParams, GenerationResult
from encloud.server.inference.quality import greedy_with_gaps
from encloud.server.inference.runner import ModelRunner

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea, with rhymes and a long title.",
    "Explain gravity.",
    "Name three colours.",
)
NEW_TOKENS = 24
# A step whose reference top-two logits are closer than this may be broken differently by the
# batched kernels (int4 MatMulNBits accumulates in another order); the comparison stops there.
NEAR_TIE = 0.05

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    eng = Engine.load(model_dir, threads=2)
    yield eng
    eng.close()


def _never() -> bool:
    return False


def _collect(engine: Engine, params: GenerationParams, out: dict, key, should_stop=_never):
    items = list(engine.stream(params, should_stop))
    assert isinstance(items[-1], GenerationResult)
    assert all(isinstance(p, str) and p for p in items[:-1])
    out[key] = ("".join(items[:-1]), items[-1])


def _run_batched(engine: Engine, jobs: list[tuple[GenerationParams, object]]) -> dict:
    """Start every job while admission is held, so they are all admitted in one step."""
    out: dict = {}
    threads = [
        threading.Thread(target=_collect, args=(engine, p, out, i, stop))
        for i, (p, stop) in enumerate(jobs)
    ]
    admitted = engine.scheduler.stats.admitted
    with engine.hold_admission():
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.scheduler.waiting() < len(jobs):
            assert time.monotonic() < deadline, "requests never reached the scheduler"
            time.sleep(0.005)
    for t in threads:
        t.join(timeout=300)
    assert engine.scheduler.stats.admitted == admitted + len(jobs)
    return out


def _reference(engine: Engine, prompt: str) -> tuple[list[int], list[float]]:
    return greedy_reference(engine, prompt, NEW_TOKENS)


def greedy_reference(
    engine: Engine, prompt: str, n: int, runner: ModelRunner | None = None
) -> tuple[list[int], list[float]]:
    """Batch-1 greedy tokens and, per step, the gap between the top two logits: the prompt in
    one piece on a runner of its own (no scheduler, no other row; ``runner`` reuses one)."""
    ids = engine._encode_messages((ChatTurn("user", prompt),))
    if runner is None:
        runner = ModelRunner(
            engine._folder, threads=2, spinning=False, provider="cpu", max_rows=1, max_len=512
        )
    return greedy_with_gaps(runner, ids, n, engine._eos_ids)


@pytest.mark.parametrize("prompts", [PROMPTS, (PROMPTS[1],) * 4], ids=["uneven", "same-length"])
def test_batched_greedy_matches_single_stream_until_a_near_tie(
    engine: Engine, prompts: tuple[str, ...]
) -> None:
    """Prompts of different lengths (prefilled one call each), and prompts of one length
    (prefilled together in one batched call), against batch-1 references."""
    jobs = [(GenerationParams((ChatTurn("user", p),), NEW_TOKENS), _never) for p in prompts]
    chunks_before = engine.scheduler.stats.prefill_calls
    got = _run_batched(engine, jobs)
    assert engine.scheduler.stats.largest_batch >= len(prompts)
    if len(set(prompts)) == 1:  # one batched prefill call for all of them
        assert engine.scheduler.stats.prefill_calls == chunks_before + 1
    compared = 0
    for i, prompt in enumerate(prompts):
        tokens, gaps = _reference(engine, prompt)
        safe = next((k for k, g in enumerate(gaps) if g < NEAR_TIE), len(tokens))
        # Text of the reference's tokens before the first near-tie (eos is not text).
        prefix_ids = [t for t in tokens[:safe] if t not in engine._eos_ids]
        stream = engine._tokenizer.decoder()
        prefix = "".join(stream.step(t) for t in prefix_ids)
        text, result = got[i]
        assert text.startswith(prefix), (i, safe, prefix, text)
        compared += safe
        if safe == len(tokens):
            assert result.completion_tokens == len(tokens)
    assert compared >= len(prompts) * 4  # the comparison covered real text, not only ties


def test_cancel_leaves_the_batch_at_the_next_step(engine: Engine) -> None:
    """One row of a batch of three is cancelled after 3 decode steps; it gets no token after
    that, while the others run on to their length."""
    calls = 0

    def stop_after_three_steps() -> bool:
        # Called once at admission, then before each step of this request (its prefill, which
        # gives the first token, then one decode step per token).
        nonlocal calls
        calls += 1
        return calls > 4

    long_params = GenerationParams((ChatTurn("user", "Tell me a long story."),), 20)
    got = _run_batched(
        engine,
        [(long_params, _never), (long_params, stop_after_three_steps), (long_params, _never)],
    )
    assert got[1][1].finish_reason == "cancelled"
    assert got[1][1].completion_tokens == 3
    assert calls == 5  # no step of this request ran after should_stop said so
    for i in (0, 2):
        assert got[i][1].finish_reason in ("length", "stop")
        assert got[i][1].completion_tokens > 3


def test_each_request_keeps_its_own_sampling_parameters(engine: Engine) -> None:
    greedy = GenerationParams((ChatTurn("user", PROMPTS[0]),), 16)
    sampled = GenerationParams(
        (ChatTurn("user", "Tell me a story."),), 16, temperature=0.9, top_p=0.95, top_k=40, seed=7
    )
    alone = {}
    _collect(engine, greedy, alone, "greedy")
    first = _run_batched(engine, [(greedy, _never), (sampled, _never)])
    second = _run_batched(engine, [(greedy, _never), (sampled, _never)])
    # The greedy row is not sampled because its neighbour samples: equal to the batch-1
    # reference up to its first near-tie (where batch-2 kernels may break the tie otherwise).
    tokens, gaps = _reference(engine, PROMPTS[0])
    agreed = next((i for i, gap in enumerate(gaps) if gap < NEAR_TIE), len(tokens))
    assert agreed >= 4, "the prompt should give a few clear greedy steps"
    # The reference runs NEW_TOKENS steps, the request only its own max_new_tokens: compare
    # no further than the request could go (a CPU without a near tie in between reaches it).
    agreed = min(agreed, greedy.max_new_tokens)
    expected = engine.decode(tokens[:agreed]).rstrip("\ufffd")
    assert alone["greedy"][0].startswith(expected)
    assert first[0][0].startswith(expected)
    # A fixed seed gives the same text in the same batch composition.
    assert first[1][0] == second[1][0]
    texts = {
        _run_batched(engine, [(greedy, _never), (replace(sampled, seed=s), _never)])[1][0]
        for s in (8, 9, 10)
    }
    assert texts - {first[1][0]}


def test_stop_token_ids_and_repetition_penalty(engine: Engine) -> None:
    msgs = (ChatTurn("user", "Count from 1 to 20, separated by commas."),)
    plain: dict = {}
    _collect(engine, GenerationParams(msgs, 30), plain, 0)
    text = plain[0][0]
    # Stop at a token the answer really produces (its first occurrence, from step 3 on).
    tokens, _gaps = _reference(engine, msgs[0].content)
    k = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    stream = engine._tokenizer.decoder()
    expected = "".join(stream.step(t) for t in tokens[:k])
    stopped: dict = {}
    _collect(engine, GenerationParams(msgs, 30, stop_token_ids=(tokens[k],)), stopped, 0)
    assert stopped[0][1].finish_reason == "stop"
    assert stopped[0][1].completion_tokens == k + 1
    assert stopped[0][0] == expected
    assert text.startswith(expected) and len(text) > len(expected)
    # A strong repetition penalty makes the answer repeat its tokens less.
    penalised: dict = {}
    _collect(engine, GenerationParams(msgs, 30, repetition_penalty=2.0), penalised, 0)

    def most_repeated(t: str) -> int:
        return int(np.bincount(np.asarray(engine._tokenizer.encode(t))).max())

    assert penalised[0][0] != text
    assert most_repeated(penalised[0][0]) < most_repeated(text)


def test_peers_take_turns_in_a_batch_of_uneven_prompts(engine: Engine) -> None:
    """Peer A's two requests arrive before B's: B's joins the batch second (round robin), and
    prompts of different lengths in a reordered batch all get their answers."""
    jobs = [
        ("A", "Write a short poem about the sea, with rhymes and a long title."),
        ("A", "Name three colours."),
        ("B", "What is the capital of France?"),
    ]
    out: dict = {}
    admitted = engine.scheduler.stats.admitted

    def collect(key: int, peer: str, prompt: str) -> None:
        params = GenerationParams(messages=(ChatTurn("user", prompt),), max_new_tokens=4)
        out[key] = list(engine.stream(params, _never, peer))

    threads = []
    with engine.hold_admission():
        for key, (peer, prompt) in enumerate(jobs):  # one at a time: a known arrival order
            threads.append(threading.Thread(target=collect, args=(key, peer, prompt)))
            threads[-1].start()
            deadline = time.monotonic() + 60
            while engine.scheduler.waiting() < key + 1:
                assert time.monotonic() < deadline, "request never reached the scheduler"
                time.sleep(0.005)
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a request was lost by the scheduler"
    assert engine.scheduler.stats.admitted == admitted + len(jobs)
    for key in range(len(jobs)):
        assert isinstance(out[key][-1], GenerationResult), out.get(key)
        assert out[key][-1].completion_tokens > 0
