"""The caller's side of JobService.RunJob (docs/SENTINEL.md, "Jobs"): send the owner-signed
manifest and the sealed input, follow the progress, receive the sealed answers file.

The caller never holds the job's key: the server gets it from Sentinel. Whoever calls only
moves sealed bytes; the owner opens the answers with `encloud open`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import grpc

from encloud.client._channel import open_channel
from encloud.client._status import sentinel_error
from encloud.protocol.errors import EncloudError
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc

INPUT_CHUNK = 1 << 20


class JobAnswerError(EncloudError):
    """The server's answers file does not match the digest or size it reported."""


@dataclass(frozen=True)
class JobProgress:
    records_done: int
    records_total: int
    completion_tokens: int
    records_resumed: int = 0


@dataclass(frozen=True)
class JobResult:
    records: int
    completion_tokens: int
    records_resumed: int
    answers_sha256: bytes
    answers_size: int
    output: str


class JobClient:
    """Calls JobService on one server. `credentials` as for Client (TLS from PEM files)."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        timeout: float | None = None,
    ) -> None:
        self._own_channel = channel is None
        if channel is None:
            channel = open_channel(target, credentials)
        self._channel = channel
        self._stub = pb_grpc.JobServiceStub(channel)
        self.timeout = timeout

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def run(
        self,
        manifest: bytes,
        source: BinaryIO,
        sink: BinaryIO,
        on_progress: Callable[[JobProgress], None] | None = None,
    ) -> JobResult:
        """Run (or resume) the job: `source` is the sealed input, the sealed answers go to
        `sink` (write it to a temporary file and keep it only when this returns). A refusal
        is the server's ServiceError, or Sentinel's typed SentinelError (JobFinishedError,
        OrderSignatureError, InputMismatchError, ...) when Sentinel refused the key."""
        requests = _requests(manifest, source)
        digest = hashlib.sha256()
        size = 0
        resumed = 0
        try:
            for reply in self._stub.RunJob(requests, timeout=self.timeout):
                item = reply.WhichOneof("item")
                if item == "accepted":
                    resumed = reply.accepted.records_resumed
                    _report(on_progress, resumed, reply.accepted.records_total, 0, resumed)
                elif item == "progress":
                    p = reply.progress
                    _report(
                        on_progress, p.records_done, p.records_total, p.completion_tokens, resumed
                    )
                elif item == "output_chunk":
                    digest.update(reply.output_chunk)
                    size += len(reply.output_chunk)
                    sink.write(reply.output_chunk)
                elif item == "done":
                    return _result(reply.done, digest.digest(), size, resumed)
        except grpc.RpcError as err:
            raise sentinel_error(err) from None  # Sentinel's refusal, relayed: its type
        raise JobAnswerError("the job's stream ended without its summary")


def _requests(manifest: bytes, source: BinaryIO) -> Iterator[pb.RunJobRequest]:
    yield pb.RunJobRequest(manifest=manifest)
    while chunk := source.read(INPUT_CHUNK):
        yield pb.RunJobRequest(input_chunk=chunk)


def _report(
    on_progress: Callable[[JobProgress], None] | None,
    done: int,
    total: int,
    tokens: int,
    resumed: int,
) -> None:
    if on_progress is not None:
        on_progress(JobProgress(done, total, tokens, resumed))


def _result(done: pb.JobDone, digest: bytes, size: int, resumed: int) -> JobResult:
    if digest != done.answers_sha256 or size != done.answers_size:
        raise JobAnswerError(
            "the answers received do not match the digest and size the server reported"
        )
    return JobResult(done.records, done.completion_tokens, resumed, digest, size, done.output)
