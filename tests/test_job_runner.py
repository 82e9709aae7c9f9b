"""The job runner's own paths that a real stack cannot time (server/jobs.py): a caller who
leaves while Sentinel is releasing the key, a record that fails on the engine. Sentinel and
the engine are stand-ins here (what these tests are not about); the sealed files, the
manifest and the journal are real. tests/test_jobs.py runs the whole thing for real."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from encloud.protocol import job
from encloud.protocol.key_broker import ReleasedKeys
from encloud.server.inference.scheduler import GenerationResult
from encloud.server.jobs import JobConfig, JobRunner
from encloud.server.settings import Settings

pytestmark = pytest.mark.unit

KEY_ID = "alice/runner"


class StandInSentinel:
    """Releases `key` once `gate` opens; records each end of a release."""

    def __init__(self, key: bytearray) -> None:
        self.key = key
        self.gate = asyncio.Event()
        self.asked = asyncio.Event()
        self.ends: list[tuple[str, int, int]] = []

    async def release(self, prepare: Callable[[bytes], Awaitable[Any]]) -> tuple[Any, int]:
        self.asked.set()
        await self.gate.wait()
        return ReleasedKeys(KEY_ID, [(1, self.key)]), 1

    async def end(self, request: Any) -> None:
        self.ends.append((request.outcome, request.release_seq, request.records_done))

    async def close(self) -> None:
        pass


def _prepared(records: int, key: bytearray) -> job.PreparedJob:
    return job.prepare_job(
        [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(records)],
        bytes(key),
        KEY_ID,
        model_digest=bytes(32),
        params={"max_new_tokens": 4},
        output="out.sealed",
        ttl_seconds=60,
        signing_key=Ed25519PrivateKey.generate(),
    )


def _runner(
    tmp_path: Path, sentinel: StandInSentinel, generate: Callable[..., Awaitable[Any]]
) -> JobRunner:
    return JobRunner(_config(tmp_path), Settings(), sentinel, _unused_prepare, generate)  # type: ignore[arg-type]


def _config(tmp_path: Path, max_input_bytes: int = 1 << 30) -> JobConfig:
    return JobConfig(
        tmp_path / "jobs", tmp_path / "outbox", concurrency=2, max_input_bytes=max_input_bytes
    )


async def _unused_prepare(*_: Any) -> Any:
    raise AssertionError("the stand-in Sentinel never asks for a quote")


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _answer(params: Any) -> tuple[str, GenerationResult]:
    return "an answer", GenerationResult("stop", 3, 2)


def test_a_caller_who_leaves_during_the_release_leaves_the_job_paused_and_the_key_wiped(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        key = bytearray(os.urandom(32))
        prepared = _prepared(2, key)
        sentinel = StandInSentinel(key)
        runner = _runner(tmp_path, sentinel, _answer)

        async def consume() -> None:
            async for _ in runner.run(prepared.signed_manifest, _chunks(prepared.sealed_input)):
                pass

        task = asyncio.create_task(consume())
        await sentinel.asked.wait()
        task.cancel()
        await asyncio.sleep(0)
        sentinel.gate.set()  # the release lands after the caller left
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sentinel.ends == [("paused", 1, 0)]
        assert key == bytearray(32)
        assert not (tmp_path / "jobs" / prepared.manifest.job_id.hex()).exists()

    asyncio.run(scenario())


def test_a_record_that_fails_on_the_engine_pauses_the_job_and_wipes_the_key(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        key = bytearray(os.urandom(32))
        prepared = _prepared(4, key)
        sentinel = StandInSentinel(key)
        sentinel.gate.set()
        calls = 0

        async def fails_on_the_third(params: Any) -> tuple[str, GenerationResult]:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("the engine broke")
            return await _answer(params)

        runner = _runner(tmp_path, sentinel, fails_on_the_third)
        with pytest.raises(RuntimeError):
            async for _ in runner.run(prepared.signed_manifest, _chunks(prepared.sealed_input)):
                pass
        assert [(o, s) for o, s, _ in sentinel.ends] == [("paused", 1)]
        assert key == bytearray(32)
        journal = tmp_path / "jobs" / prepared.manifest.job_id.hex() / "journal"
        assert 1 <= len(list(journal.glob("*.sealed"))) <= 3  # kept for the next call
        assert not (tmp_path / "outbox").exists()

    asyncio.run(scenario())


def test_an_input_above_the_limit_is_refused_before_sentinel_is_asked(tmp_path: Path) -> None:
    from encloud.protocol.faults import JobInputTooLargeError

    async def scenario() -> None:
        key = bytearray(os.urandom(32))
        prepared = _prepared(40, key)
        sentinel = StandInSentinel(key)
        config = JobConfig(
            tmp_path / "jobs", tmp_path / "outbox", concurrency=2, max_input_bytes=512
        )
        runner = JobRunner(config, Settings(), sentinel, _unused_prepare, _answer)  # type: ignore[arg-type]
        with pytest.raises(JobInputTooLargeError):
            async for _ in runner.run(prepared.signed_manifest, _chunks(prepared.sealed_input)):
                pass
        assert not sentinel.asked.is_set()
        assert not (tmp_path / "jobs" / prepared.manifest.job_id.hex()).exists()

    asyncio.run(scenario())


def test_the_input_is_opened_a_record_at_a_time_in_bounded_memory(tmp_path: Path) -> None:
    """24 MiB of sealed records read through the runner's reader: memory stays about a
    segment (1 MiB) and a line, whatever the input's size."""
    import tracemalloc

    from encloud.server.jobs import _JobFiles, _Run

    key = bytearray(os.urandom(32))
    line = job.record_line([{"role": "user", "content": "x" * 200}])
    count = (24 << 20) // len(line)
    sealed_path = tmp_path / "input.sealed"
    from encloud.protocol.sealed_file import ChunkReader, seal_stream

    with open(sealed_path, "wb") as sink:
        seal_stream(ChunkReader(iter([line] * count)), sink, key, KEY_ID)  # type: ignore[arg-type]
    manifest = job.new_manifest(
        key_id=KEY_ID,
        model_digest=bytes(32),
        input_sha256=bytes(32),
        records=count,
        output="o.sealed",
        params={},
        ttl_seconds=60,
    )
    config = JobConfig(
        tmp_path / "jobs", tmp_path / "outbox", concurrency=2, max_input_bytes=1 << 30
    )
    work = _JobFiles(config, manifest)
    work.spool_path = sealed_path
    run = _Run(manifest, work, ReleasedKeys(KEY_ID, [(1, key)]), 1, Settings(), _answer)
    tracemalloc.start()
    try:
        seen = sum(1 for _ in run._records())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < 6 << 20, f"reading held {peak} bytes at once"
