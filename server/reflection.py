"""gRPC server reflection under both names clients ask for: grpc.reflection.v1 (what grpcurl
and current tools try first) and grpc.reflection.v1alpha (what grpcio-reflection ships).

The v1 proto is v1alpha's with the package renamed (same messages, same field numbers), so it
is vendored here as v1alpha's own file descriptor with the file name and package changed,
added to the default descriptor pool, and the same servicer answers both methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    pool.Add(proto)


def enable(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve reflection for `service_names` (and both reflection services) on `server`."""
    _add_v1_descriptor()
    servicer = ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    handlers = {}
    for service in (V1_SERVICE, V1ALPHA_SERVICE):
        method = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        handlers[service] = grpc.method_handlers_generic_handler(
            service, {"ServerReflectionInfo": method}
        )
    server.add_generic_rpc_handlers(tuple(handlers.values()))
