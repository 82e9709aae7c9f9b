"""Confidential batch jobs: the domain logic behind JobService.RunJob (docs/SENTINEL.md, "Jobs").

A job is an owner-signed manifest and a sealed JSONL input. The server spools the sealed
input (never opened on disk), asks Sentinel for the job's key with a quote that binds the
manifest and the input's digest, opens the input one segment at a time, runs the records
through the engine (job_concurrency at once, batched with everyone else's requests), seals
each answer into a journal entry under the same key, and at the end seals the answers file
from the journal into the outbox. The key and the journal go when the job ends; a call cut
short (a restart, a cancel, an error) leaves the journal, and the next call of the same job
resumes from it: no record runs twice, no answers file is ever half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from encloud.protocol import generation, job, key_broker
from encloud.protocol.errors import ReleaseOrderFormatError
from encloud.protocol.faults import (
    InvalidArgumentError,
    JobInputError,
    JobInputTooLargeError,
    JobRunningError,
    JobsNotServedError,
    Kind,
    SentinelAnswerError,
    SentinelRefusal,
    SentinelUnavailableError,
    status_details,
)
from encloud.protocol.key_broker import ReleasedKeys
from encloud.protocol.sealed_file import (
    ChunkReader,
    OpenedStream,
    SealedFileError,
    seal_stream,
)
from encloud.protocol.sentinel.v1 import sentinel_pb2 as spb
from encloud.protocol.sentinel.v1 import sentinel_pb2_grpc as spb_grpc
from encloud.server import grpc_converters as converters
from encloud.server.inference.engine import GenerationParams
from encloud.server.inference.scheduler import GenerationResult
from encloud.server.limits import ServerBusyError
from encloud.server.settings import Settings

log = logging.getLogger("encloud.jobs")

OUTPUT_CHUNK = 1 << 20
JOURNAL_BUCKET = 4096
"""Journal entries' plaintext is padded to a multiple of this many bytes."""


@dataclass(frozen=True)
class Accepted:
    job_id: bytes
    records_resumed: int
    records_total: int


@dataclass(frozen=True)
class Progress:
    records_done: int
    records_total: int
    completion_tokens: int


@dataclass(frozen=True)
class OutputChunk:
    data: bytes


@dataclass(frozen=True)
class Done:
    records: int
    completion_tokens: int
    answers_sha256: bytes
    answers_size: int
    output: str


JobEvent = Accepted | Progress | OutputChunk | Done

Prepare = Callable[[bytes], Awaitable[key_broker.PendingRelease]]
"""Given Sentinel's nonce, the ReleaseJobKey request with its quote (made on the TPM's thread)."""
Generate = Callable[[GenerationParams], Awaitable[tuple[str, GenerationResult]]]


# --- Sentinel's workload API, from inside the server ------------------------------------------


class SentinelLink:
    """The server's calls to Sentinel: a job's key (GetChallenge, ReleaseJobKey) and the end
    of its release (EndJobRelease). Sentinel's refusals come back as SentinelRefusal with its
    own reason; no answer as SentinelUnavailableError."""

    def __init__(self, address: str, ca_pem: bytes | None, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._ca_pem = ca_pem
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> spb_grpc.WorkloadServiceStub:
        if self._channel is None:  # made on the serving loop, on first use
            self._channel = (
                grpc.aio.insecure_channel(self.address)
                if self._ca_pem is None
                else grpc.aio.secure_channel(
                    self.address, grpc.ssl_channel_credentials(self._ca_pem)
                )
            )
        return spb_grpc.WorkloadServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def release(self, prepare: Prepare) -> tuple[ReleasedKeys, int]:
        """The job's key (every live version, newest first) and the release's number."""
        stub = self._stub()
        challenge = await self._call(
            stub.GetChallenge(spb.GetChallengeRequest(), timeout=self.timeout, wait_for_ready=True)
        )
        pending = await prepare(challenge.nonce)
        reply = await self._call(
            stub.ReleaseJobKey(pending.request, timeout=self.timeout, wait_for_ready=True)
        )
        try:
            released = pending.open(reply)
        except key_broker.ReleaseResponseError as err:
            raise SentinelAnswerError(f"Sentinel's answer does not fit: {err}") from None
        return released, reply.release_seq

    async def end(self, request: spb.EndJobReleaseRequest) -> None:
        await self._call(
            self._stub().EndJobRelease(request, timeout=self.timeout, wait_for_ready=True)
        )

    # wait_for_ready: a Sentinel that restarted is reached once it is back (within the
    # deadline), not refused while the channel is still in its reconnect backoff.
    async def _call(self, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            raise _relayed(err, self.address) from None


_T = TypeVar("_T")


def _relayed(error: grpc.aio.AioRpcError, address: str) -> Exception:
    """Sentinel's refusal with its own kind, reason and metadata; UNAVAILABLE and deadlines
    (Sentinel down or unreachable) as SentinelUnavailableError."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, DecodeError):  # a trailer that contradicts the status or is garbage
        status = None
    reason, metadata, _ = status_details(status)
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
        not reason or reason == "DATABASE_UNAVAILABLE"
    ):
        return SentinelUnavailableError(
            f"Sentinel at {address} did not answer ({error.code().name}); nothing of the job "
            "ran: call again once it is back"
        )
    kind = Kind[error.code().name] if error.code().name in Kind.__members__ else Kind.INTERNAL
    return SentinelRefusal(kind, reason or error.code().name, error.details() or "", metadata)


# --- the job runner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobConfig:
    """Plain values from the settings (app.py fills it)."""

    jobs_dir: Path
    outbox_dir: Path
    concurrency: int
    max_input_bytes: int
    max_running_jobs: int = 4


class JobRunner:
    def __init__(
        self,
        config: JobConfig,
        settings: Settings,
        sentinel: SentinelLink | None,
        prepare: Callable[[bytes, bytes, bytes], Awaitable[key_broker.PendingRelease]],
        generate: Generate,
    ) -> None:
        """`prepare(manifest, input_sha256, nonce)` makes the ReleaseJobKey request (the
        quote on the TPM's thread); `generate(params)` runs one record on the engine."""
        self._config = config
        self._settings = settings
        self._sentinel = sentinel
        self._prepare = prepare
        self._generate = generate
        self._running: set[bytes] = set()

    async def close(self) -> None:
        if self._sentinel is not None:
            await self._sentinel.close()

    async def run(
        self, signed_manifest: bytes, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[JobEvent]:
        """One call of a job: its events, or a DomainError (the job is then paused, its
        journal kept for the next call)."""
        sentinel = self._sentinel
        if sentinel is None:
            raise JobsNotServedError("this server runs no jobs: it has no sentinel_address")
        try:
            manifest, _ = job.parse_manifest(signed_manifest)
        except ReleaseOrderFormatError as err:
            raise JobInputError(f"the job manifest is malformed: {err}") from None
        if manifest.job_id in self._running:
            raise JobRunningError("this job is running in another call on this server")
        if len(self._running) >= self._config.max_running_jobs:
            raise ServerBusyError(
                "this server runs its most jobs at once (max_running_jobs); retry later"
            )
        self._running.add(manifest.job_id)
        try:
            async for event in self._run(sentinel, signed_manifest, manifest, chunks):
                yield event
        finally:
            self._running.discard(manifest.job_id)

    async def _run(
        self,
        sentinel: SentinelLink,
        signed_manifest: bytes,
        manifest: job.JobManifest,
        chunks: AsyncIterator[bytes],
    ) -> AsyncIterator[JobEvent]:
        work = _JobFiles(self._config, manifest)
        try:
            input_sha256 = await work.spool(chunks, self._config.max_input_bytes)
            release = asyncio.ensure_future(
                sentinel.release(lambda nonce: self._prepare(signed_manifest, input_sha256, nonce))
            )
            try:
                released, release_seq = await asyncio.shield(release)
            except asyncio.CancelledError:
                await self._end_abandoned(sentinel, manifest, work, release)
                raise
        except BaseException:
            work.drop_spool()
            raise
        run = _Run(manifest, work, released, release_seq, self._settings, self._generate)
        outcome = job.PAUSED
        try:
            async for event in run.events(self._config.concurrency):
                yield event
            outcome = job.DONE
        finally:
            await self._end(sentinel, run, outcome)
        for event in run.output_events():
            yield event

    async def _end_abandoned(
        self,
        sentinel: SentinelLink,
        manifest: job.JobManifest,
        work: _JobFiles,
        release: asyncio.Future[tuple[ReleasedKeys, int]],
    ) -> None:
        """The caller left while Sentinel was releasing the key: let the release land, then
        end it paused at once, so that the next call of the job (in this start-up) may have
        the key again instead of finding it held."""
        try:
            released, release_seq = await release
        except Exception:
            return  # refused or unreachable: there is nothing to end
        run = _Run(manifest, work, released, release_seq, self._settings, self._generate)
        await self._end(sentinel, run, job.PAUSED)

    async def _end(self, sentinel: SentinelLink, run: _Run, outcome: str) -> None:
        """Tell Sentinel the release ended (done, or paused for the next call), then wipe the
        key; on done the journal and spool go, on pause only the spool."""
        request = run.end_request(outcome)
        run.wipe()
        if outcome == job.DONE:
            run.work.drop_journal()
        run.work.drop_spool()
        try:
            # Shielded: a cancelled call still ends its release, so the next call may resume.
            await asyncio.shield(sentinel.end(request))
        except Exception as err:  # the job's outcome stands; Sentinel keeps it live until a restart
            log.warning(
                "could not end the job's release at Sentinel",
                extra={"outcome": outcome, "error_type": type(err).__name__},
            )


class _JobFiles:
    """A job's files on the server's disk, all sealed: the spooled input, the journal of
    sealed answers (one file per record), and the answers file in the outbox."""

    def __init__(self, config: JobConfig, manifest: job.JobManifest) -> None:
        self.root = config.jobs_dir / manifest.job_id.hex()
        self.spool_path = self.root / "input.sealed"
        self.journal = self.root / "journal"
        # The owner's own folder: Sentinel checked that the key's owner signed the manifest,
        # so one owner's job never writes over another owner's answers.
        self.outbox = config.outbox_dir / (key_broker.owner_of(manifest.key_id) or "_")
        self.output = self.outbox / manifest.output

    async def spool(self, chunks: AsyncIterator[bytes], limit: int) -> bytes:
        """Write the sealed input to disk as it arrives; its SHA-256."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        digest = hashlib.sha256()
        size = 0
        with open(self.spool_path, "wb") as sink:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise JobInputTooLargeError(
                        f"the sealed input is above the server's limit of {limit} bytes "
                        "(max_job_input_bytes)"
                    )
                digest.update(chunk)
                await asyncio.to_thread(sink.write, chunk)
        if size == 0:
            raise JobInputError("the call sent a manifest but no sealed input")
        return digest.digest()

    def answered(self) -> set[int]:
        if not self.journal.is_dir():
            return set()
        return {int(p.stem) for p in self.journal.glob("*.sealed") if p.stem.isdigit()}

    def entry(self, index: int) -> Path:
        return self.journal / f"{index:08d}.sealed"

    def write_entry(self, index: int, sealed: bytes) -> None:
        """An answer's journal entry, whole or not at all (written aside, then renamed)."""
        self.journal.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomically(self.entry(index), lambda f: f.write(sealed))

    def drop_spool(self) -> None:
        self.spool_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only when no journal is left in it

    def drop_journal(self) -> None:
        shutil.rmtree(self.journal, ignore_errors=True)


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as sink:
        write(sink)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(part, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class _Run:
    """One call's work once the key is released: records in, journal entries, answers out."""

    def __init__(
        self,
        manifest: job.JobManifest,
        work: _JobFiles,
        released: ReleasedKeys,
        release_seq: int,
        settings: Settings,
        generate: Generate,
    ) -> None:
        self.manifest = manifest
        self.digest = manifest.digest()
        self.work = work
        self.released = released
        self.release_seq = release_seq
        self._settings = settings
        self._generate = generate
        self.key: bytearray = released.versions[0][1]
        self.done = work.answered()
        self.tokens = 0
        self.answers_sha256 = b""
        self.answers_size = 0

    def wipe(self) -> None:
        self.released.wipe()

    def end_request(self, outcome: str) -> spb.EndJobReleaseRequest:
        records = self.manifest.records if outcome == job.DONE else len(self.done)
        answers = self.answers_sha256 if outcome == job.DONE else b""
        proof = job.end_proof(
            self.released.versions[0][1],
            self.manifest.job_id,
            self.release_seq,
            outcome,
            answers,
            records,
        )
        return spb.EndJobReleaseRequest(
            job_id=self.manifest.job_id,
            release_seq=self.release_seq,
            outcome=outcome,
            answers_sha256=answers,
            records_done=records,
            proof=proof,
        )

    async def events(self, concurrency: int) -> AsyncIterator[JobEvent]:
        total = self.manifest.records
        self.key = self._input_key()
        await asyncio.to_thread(self._drop_foreign_entries)
        yield Accepted(self.manifest.job_id, len(self.done), total)
        running: set[asyncio.Task[int]] = set()
        seen = 0
        try:
            for index, line in self._records():
                seen = index + 1
                if index >= total:
                    raise JobInputError(f"the input holds more records than the manifest's {total}")
                if index in self.done:
                    continue
                params = self._params(line, index)
                running.add(asyncio.create_task(self._answer(index, params)))
                while len(running) >= concurrency:
                    async for event in self._finished(running):
                        yield event
            if seen != total:
                raise JobInputError(f"the input holds {seen} records, the manifest {total}")
            while running:
                async for event in self._finished(running):
                    yield event
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        await asyncio.to_thread(self._write_answers)

    async def _finished(self, running: set[asyncio.Task[int]]) -> AsyncIterator[JobEvent]:
        finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            running.discard(task)
            self.done.add(task.result())  # a failed record fails the call (re-raised here)
            yield Progress(len(self.done), self.manifest.records, self.tokens)

    def _drop_foreign_entries(self) -> None:
        """A journal entry that does not open under the key, or is not this job's answer to
        its index (tampered, or copied from another job), is removed: its record runs again."""
        for index in sorted(self.done):
            try:
                entry = json.loads(self._entry_line(index))
                if set(entry) != {"answer", "index", "job"} or (entry["index"], entry["job"]) != (
                    index,
                    self.digest.hex(),
                ):
                    raise ValueError("another job's or index's answer")
            except (OSError, SealedFileError, ValueError):
                log.warning("a journal entry was not this job's; its record runs again")
                self.work.entry(index).unlink(missing_ok=True)
                self.done.discard(index)

    def _entry_line(self, index: int) -> bytes:
        """A journal entry's answer line, without its padding."""
        sink = io.BytesIO()
        with open(self.work.entry(index), "rb") as source:
            for plaintext in OpenedStream(source, self.key, expected_key_id=self.manifest.key_id):
                sink.write(plaintext)
        return sink.getvalue().rstrip(b" \n") + b"\n"

    def _input_key(self) -> bytearray:
        """The key version the input was sealed under (the answers are sealed under it too):
        the first that opens the input's first segment, newest first."""
        for _, key in self.released.versions:
            try:
                with open(self.work.spool_path, "rb") as source:
                    opened = OpenedStream(source, key, expected_key_id=self.manifest.key_id)
                    next(iter(opened))
            except SealedFileError:
                continue
            return key
        raise JobInputError(f"the sealed input does not open under the key {self.manifest.key_id}")

    def _records(self) -> Iterator[tuple[int, bytes]]:
        """The input's lines, one at a time (bounded memory: a segment and a line)."""
        index = 0
        partial = bytearray()
        try:
            with open(self.work.spool_path, "rb") as source:
                for plaintext in OpenedStream(
                    source, self.key, expected_key_id=self.manifest.key_id
                ):
                    partial += plaintext
                    while (end := partial.find(b"\n")) >= 0:
                        line = bytes(partial[:end])
                        partial[: end + 1] = b""
                        if line.strip():
                            yield index, line
                            index += 1
            if partial.strip():
                yield index, bytes(partial)
        except SealedFileError as err:
            raise JobInputError(f"the sealed input does not open: {err}") from None
        finally:
            partial[:] = bytes(len(partial))

    def _params(self, line: bytes, index: int) -> GenerationParams:
        try:
            record = job.parse_record(line, index)
        except job.JobRecordError as err:
            raise JobInputError(str(err)) from None
        params = dict(self.manifest.params)
        if record.seed is not None:
            params["seed"] = record.seed
        payload = generation.generation_request(list(record.messages), params)
        try:
            return converters.generation_params_from_payload(payload, self._settings)
        except Exception as err:  # a DomainError naming the parameter, never the content
            raise JobInputError(f"record {index}: {err}") from None

    async def _answer(self, index: int, params: GenerationParams) -> int:
        try:
            text, result = await self._generate(params)
        except InvalidArgumentError as err:  # the prompt too long for the server, say
            raise JobInputError(f"record {index}: {err.message}") from None
        self.tokens += result.completion_tokens
        line = job.answer_line(
            self.digest,
            index,
            text,
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
        )
        await asyncio.to_thread(self._journal, index, line)
        return index

    def _journal(self, index: int, line: bytes) -> None:
        """The answer sealed into its journal entry, padded with spaces to a multiple of
        JOURNAL_BUCKET: the host sees the journal's files, and their sizes must not tell it
        how long each answer is (the interactive protocol pads its frames for the same
        reason). The padding goes again when the answers file is made."""
        padded = line[:-1] + b" " * (-len(line) % JOURNAL_BUCKET) + b"\n"
        sealed = io.BytesIO()
        seal_stream(io.BytesIO(padded), sealed, self.key, self.manifest.key_id)
        self.work.write_entry(index, sealed.getvalue())

    def _answer_lines(self) -> Iterator[bytes]:
        """The journal's answers in record order, each checked to be this job's and index's,
        then the end line."""
        checker = job.AnswersChecker(self.digest)
        for index in range(self.manifest.records):
            try:
                line = self._entry_line(index)
                checker.feed(line)
            except (OSError, SealedFileError, job.AnswersFileError) as err:
                raise JobInputError(
                    f"the journal entry of record {index} is missing or not this job's "
                    f"({type(err).__name__}); call the job again to run that record anew"
                ) from None
            yield line
        end = job.end_line(self.digest, self.manifest.records)
        checker.feed(end)
        checker.finish()
        yield end

    def _write_answers(self) -> None:
        """The answers file, sealed under the input's key into the outbox, whole or not at all."""
        self.work.outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        digest = hashlib.sha256()

        class _Hashing:
            def __init__(self, sink: BinaryIO) -> None:
                self.sink = sink
                self.size = 0

            def write(self, data: bytes) -> int:
                digest.update(data)
                self.size += len(data)
                return self.sink.write(data)

        size = 0

        def write(sink: BinaryIO) -> None:
            nonlocal size
            hashing = _Hashing(sink)
            seal_stream(ChunkReader(self._answer_lines()), hashing, self.key, self.manifest.key_id)  # type: ignore[arg-type]
            size = hashing.size

        _write_atomically(self.work.output, write)
        self.answers_sha256 = digest.digest()
        self.answers_size = size

    def output_events(self) -> Iterator[JobEvent]:
        with open(self.work.output, "rb") as source:
            while chunk := source.read(OUTPUT_CHUNK):
                yield OutputChunk(chunk)
        yield Done(
            self.manifest.records,
            self.tokens,
            self.answers_sha256,
            self.answers_size,
            self.manifest.output,
        )
