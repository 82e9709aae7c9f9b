"""The gRPC servicer: bytes in, protobuf parsed, a call into the core, protobuf out.

Requests arrive as raw bytes (the handlers are registered without a
deserializer), so a malformed protobuf is parsed in converters and answered
INVALID_ARGUMENT (`MALFORMED_MESSAGE`) like any other bad input, instead of
gRPC's own INTERNAL "Exception deserializing request".
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence

import grpc

from encloud.protocol.faults import (
    JobInputError,
    UnavailableError,
    UnsupportedProtocolVersionError,
)
from encloud.protocol.peers import caller_key, trusted_networks
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.wire import ROUTE_HEADER
from encloud.server import grpc_converters as converters
from encloud.server import jobs
from encloud.server.core import InferenceCore
from encloud.server.jobs import JobRunner
from encloud.server.metrics import Metrics
from encloud.server.status import abort_for, stream_errors, unary_errors

SERVICE_NAME = "encloud.v2.InferenceService"
JOB_SERVICE_NAME = "encloud.v2.JobService"


def route_token(replica: str) -> str:
    """The opaque routing token of a replica: stable across its restarts, one per replica,
    and not its name (which may say more about the deployment than a proxy log needs)."""
    return hashlib.sha256(b"encloud/v2 route\x00" + replica.encode()).hexdigest()[:32]


class InferenceServicer:
    """Registered before the server starts; calls are UNAVAILABLE until attach()."""

    def __init__(
        self,
        metrics: Metrics,
        service: InferenceCore | None = None,
        trusted_proxies: Sequence[str] = (),
        replica: str = "",
    ) -> None:
        self.metrics = metrics
        self.replica = replica
        self._route = ((ROUTE_HEADER, route_token(replica)),) if replica else ()
        self._ready: InferenceCore | None = service
        self._trusted = trusted_networks(trusted_proxies)

    def attach(self, service: InferenceCore) -> None:
        self._ready = service

    def _peer(self, context: grpc.aio.ServicerContext) -> str:
        """The caller for quotas and rate limits (protocol.peers.peer_key)."""
        return caller_key(context.peer(), context.invocation_metadata(), self._trusted)

    @property
    def _service(self) -> InferenceCore:
        if self._ready is None:
            raise UnavailableError("the server is starting: model and TPM not ready")
        return self._ready

    @unary_errors
    async def Attest(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.AttestResponse:
        request = converters.parse(pb.AttestRequest, data)
        result = await self._service.attest(
            request.nonce,
            converters.suite_from_proto(request.suite),
            request.client_commitment,
            self._peer(context),
        )
        if self._route:
            await context.send_initial_metadata(self._route)
        return pb.AttestResponse(
            session_id=result.session_id,
            session_public_key=result.session_public_key,
            ttl_seconds=result.ttl_seconds,
            evidence=converters.evidence_to_proto(result.evidence),
        )

    @unary_errors
    async def ReleaseKey(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseKeyResponse:
        request = converters.parse(pb.ReleaseKeyRequest, data)
        confirmation = await self._service.release_key(request.session_id, request.sealed_key)
        return pb.ReleaseKeyResponse(key_confirmation=converters.sealed_to_proto(confirmation))

    @unary_errors
    async def Infer(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        request = converters.parse(pb.InferRequest, data)
        response = await self._service.infer(
            request.session_id, converters.sealed_from_proto(request.request)
        )
        return pb.InferResponse(response=converters.sealed_to_proto(response))

    @stream_errors
    async def StreamInfer(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamInferResponse]:
        request = converters.parse(pb.StreamInferRequest, data)
        frames = self._service.stream(
            request.session_id, converters.sealed_from_proto(request.request)
        )
        async for frame in frames:
            yield pb.StreamInferResponse(frame=converters.sealed_to_proto(frame))

    @unary_errors
    async def Embed(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        request = converters.parse(pb.EmbedRequest, data)
        response = await self._service.embed(
            request.session_id, converters.sealed_from_proto(request.request)
        )
        return pb.EmbedResponse(response=converters.sealed_to_proto(response))

    @unary_errors
    async def EndSession(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        request = converters.parse(pb.EndSessionRequest, data)
        await self._service.end_session(
            request.session_id, converters.sealed_from_proto(request.end)
        )
        return pb.EndSessionResponse()


def _serialize(message: object) -> bytes:
    return message.SerializeToString()  # type: ignore[attr-defined,no-any-return]


class JobServicer:
    """JobService.RunJob: the manifest and the sealed input in, the job's events out."""

    def __init__(self, metrics: Metrics, replica: str = "") -> None:
        self.metrics = metrics
        self.replica = replica
        self._runner: JobRunner | None = None

    def attach(self, runner: JobRunner) -> None:
        self._runner = runner

    @stream_errors
    async def RunJob(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunJobResponse]:
        if self._runner is None:
            raise UnavailableError("the server is starting: model and TPM not ready")
        first = await anext(aiter(requests), None)
        opening = converters.parse(pb.RunJobRequest, first or b"")
        if opening.WhichOneof("item") != "manifest":
            raise JobInputError("a job call starts with the manifest")
        async for event in self._runner.run(opening.manifest, _input_chunks(requests)):
            yield _job_event(event)


async def _input_chunks(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for data in requests:
        request = converters.parse(pb.RunJobRequest, data)
        if request.WhichOneof("item") != "input_chunk":
            raise JobInputError("after the manifest, a job call sends only input chunks")
        yield request.input_chunk


def _job_event(event: jobs.JobEvent) -> pb.RunJobResponse:
    """A job's event as its RunJobResponse: counts and sealed bytes only."""
    if isinstance(event, jobs.Accepted):
        return pb.RunJobResponse(
            accepted=pb.JobAccepted(
                job_id=event.job_id,
                records_resumed=event.records_resumed,
                records_total=event.records_total,
            )
        )
    if isinstance(event, jobs.Progress):
        return pb.RunJobResponse(
            progress=pb.JobProgress(
                records_done=event.records_done,
                records_total=event.records_total,
                completion_tokens=event.completion_tokens,
            )
        )
    if isinstance(event, jobs.OutputChunk):
        return pb.RunJobResponse(output_chunk=event.data)
    return pb.RunJobResponse(
        done=pb.JobDone(
            records=event.records,
            completion_tokens=event.completion_tokens,
            answers_sha256=event.answers_sha256,
            answers_size=event.answers_size,
            output=event.output,
        )
    )


def add_to_server(
    servicer: InferenceServicer, server: grpc.aio.Server, jobs: JobServicer | None = None
) -> None:
    """Register the service with raw-bytes requests (see the module docstring)."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Attest": unary(servicer.Attest, response_serializer=_serialize),
        "ReleaseKey": unary(servicer.ReleaseKey, response_serializer=_serialize),
        "Infer": unary(servicer.Infer, response_serializer=_serialize),
        "StreamInfer": grpc.unary_stream_rpc_method_handler(
            servicer.StreamInfer, response_serializer=_serialize
        ),
        "Embed": unary(servicer.Embed, response_serializer=_serialize),
        "EndSession": unary(servicer.EndSession, response_serializer=_serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if jobs is not None:
        job_handlers = {
            "RunJob": grpc.stream_stream_rpc_method_handler(
                jobs.RunJob, response_serializer=_serialize
            )
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(JOB_SERVICE_NAME, job_handlers),)
        )
    server.add_generic_rpc_handlers((_v1_refusal(),))


V1_SERVICE_NAME = "encloud.v1.InferenceService"


def _v1_refusal() -> grpc.GenericRpcHandler:
    """Every method of protocol v1 answers FAILED_PRECONDITION with reason
    UNSUPPORTED_PROTOCOL_VERSION, so an old client learns why by name."""

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await abort_for(context, UnsupportedProtocolVersionError(_V1_MESSAGE))
        raise AssertionError("abort_for raises")

    async def refuse_stream(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await abort_for(context, UnsupportedProtocolVersionError(_V1_MESSAGE))
        yield b""  # never reached: makes this an async generator, as a stream handler is

    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Attest": unary(refuse),
        "ReleaseKey": unary(refuse),
        "Infer": unary(refuse),
        "StreamInfer": grpc.unary_stream_rpc_method_handler(refuse_stream),
        "EndSession": unary(refuse),
    }
    return grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers)


_V1_MESSAGE = "this server speaks encloud protocol v2; update the client (docs/PROTOCOL.md)"
