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

from encloud.protocol.faults import UnavailableError, UnsupportedProtocolVersionError
from encloud.protocol.peers import caller_key, trusted_networks
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.wire import ROUTE_HEADER
from encloud.server import grpc_converters as converters
from encloud.server.core import InferenceCore
from encloud.server.metrics import Metrics
from encloud.server.status import abort_for, stream_errors, unary_errors

SERVICE_NAME = "encloud.v2.InferenceService"


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


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
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
