"""The gRPC servicer: protobuf in, domain call, protobuf out. No logic lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from encloud.client.v1 import encloud_pb2 as pb
from encloud.client.v1 import encloud_pb2_grpc as pb_grpc
from encloud.server import converters
from encloud.server.errors import UnavailableError
from encloud.server.service import InferenceService
from encloud.server.status import stream_errors, unary_errors


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Registered before the server starts; calls are UNAVAILABLE until attach()."""

    def __init__(self, service: InferenceService | None = None) -> None:
        self._ready: InferenceService | None = service

    def attach(self, service: InferenceService) -> None:
        self._ready = service

    @property
    def _service(self) -> InferenceService:
        if self._ready is None:
            raise UnavailableError("the server is starting: model and TPM not ready")
        return self._ready

    @unary_errors
    async def Attest(
        self, request: pb.AttestRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttestResponse:
        result = await self._service.attest(
            request.nonce, converters.suite_from_proto(request.suite)
        )
        return pb.AttestResponse(
            session_id=result.session_id,
            session_public_key=result.session_public_key,
            ttl_seconds=result.ttl_seconds,
            evidence=converters.evidence_to_proto(result.evidence),
        )

    @unary_errors
    async def ReleaseKey(
        self, request: pb.ReleaseKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseKeyResponse:
        confirmation = await self._service.release_key(request.session_id, request.sealed_key)
        return pb.ReleaseKeyResponse(key_confirmation=converters.sealed_to_proto(confirmation))

    @unary_errors
    async def Infer(
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferResponse:
        response = await self._service.infer(
            request.session_id, converters.sealed_from_proto(request.request)
        )
        return pb.InferResponse(response=converters.sealed_to_proto(response))

    @stream_errors
    async def StreamInfer(
        self, request: pb.StreamInferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamInferResponse]:
        frames = self._service.stream(
            request.session_id, converters.sealed_from_proto(request.request)
        )
        async for frame in frames:
            yield pb.StreamInferResponse(frame=converters.sealed_to_proto(frame))

    @unary_errors
    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        await self._service.end_session(
            request.session_id, converters.sealed_from_proto(request.end)
        )
        return pb.EndSessionResponse()
