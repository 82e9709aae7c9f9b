"""Sentinel's gRPC servicers: protobuf in, domain calls, protobuf out. Nothing else.

The handlers are registered without a request deserializer (`generic_handler`): a request
that is not valid protobuf is answered INVALID_ARGUMENT (`MALFORMED_MESSAGE`) like any other
bad input, instead of gRPC's own INTERNAL "Exception deserializing request"."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from encloud.broker.service import JobEnd, KeyView, Sentinel
from encloud.broker.status import refuse, unary_errors
from encloud.broker.store import ACTIVE, Owner
from encloud.protocol.faults import MalformedMessageError
from encloud.protocol.peers import caller_key, trusted_networks
from encloud.protocol.sentinel.v1 import sentinel_pb2 as pb
from encloud.protocol.sentinel.v1 import sentinel_pb2_grpc as pb_grpc
from encloud.protocol.wire import evidence_from_proto, suite_from_proto, suite_to_proto


def certificate_spki_sha256(cert_pem: bytes) -> str:
    """Hex SHA-256 of a PEM certificate's SubjectPublicKeyInfo: how Sentinel pins an owner."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def peer_certificate_sha256(context: grpc.ServicerContext) -> str | None:
    """certificate_spki_sha256 of the client certificate the TLS handshake verified; None on
    a connection without one (the workload port)."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return certificate_spki_sha256(pems[0]) if pems else None


def _key_info(view: KeyView) -> pb.KeyInfo:
    return pb.KeyInfo(
        key_id=view.key_id,
        state=pb.KEY_STATE_ACTIVE if view.state == ACTIVE else pb.KEY_STATE_REVOKED,
        versions=list(view.versions),
        policy_sha256=view.policy_sha256,
        created_at=view.created_at,
    )


class OwnerServicer(pb_grpc.OwnerServiceServicer):
    def __init__(self, sentinel: Sentinel) -> None:
        self.sentinel = sentinel

    def _owner(self, context: grpc.ServicerContext, method: str) -> Owner:
        return self.sentinel.owner_for(peer_certificate_sha256(context), method)

    @unary_errors
    def GetImportKey(
        self, request: pb.GetImportKeyRequest, context: grpc.ServicerContext
    ) -> pb.GetImportKeyResponse:
        self._owner(context, "GetImportKey")
        key = self.sentinel.import_key
        return pb.GetImportKeyResponse(
            suite=suite_to_proto(key.suite),
            public_key=key.public_key,
        )

    @unary_errors
    def AddSigningKey(
        self, request: pb.AddSigningKeyRequest, context: grpc.ServicerContext
    ) -> pb.AddSigningKeyResponse:
        owner = self._owner(context, "AddSigningKey")
        fingerprint = self.sentinel.add_signing_key(owner, request.public_key)
        return pb.AddSigningKeyResponse(fingerprint=fingerprint)

    @unary_errors
    def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.ServicerContext
    ) -> pb.CreateKeyResponse:
        owner = self._owner(context, "CreateKey")
        view = self.sentinel.create_key(owner, request.key_id, request.policy, request.sealed_key)
        return pb.CreateKeyResponse(key=_key_info(view))

    @unary_errors
    def RotateKey(
        self, request: pb.RotateKeyRequest, context: grpc.ServicerContext
    ) -> pb.RotateKeyResponse:
        owner = self._owner(context, "RotateKey")
        view = self.sentinel.rotate_key(owner, request.key_id, request.sealed_key)
        return pb.RotateKeyResponse(key=_key_info(view))

    @unary_errors
    def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: grpc.ServicerContext
    ) -> pb.RevokeKeyResponse:
        owner = self._owner(context, "RevokeKey")
        return pb.RevokeKeyResponse(key=_key_info(self.sentinel.revoke_key(owner, request.key_id)))

    @unary_errors
    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        owner = self._owner(context, "ListKeys")
        return pb.ListKeysResponse(keys=[_key_info(v) for v in self.sentinel.list_keys(owner)])

    @unary_errors
    def ReadAudit(
        self, request: pb.ReadAuditRequest, context: grpc.ServicerContext
    ) -> pb.ReadAuditResponse:
        owner = self._owner(context, "ReadAudit")
        return pb.ReadAuditResponse(entries=self.sentinel.read_audit(owner, request.after_seq))


class WorkloadServicer(pb_grpc.WorkloadServiceServicer):
    def __init__(self, sentinel: Sentinel, trusted_proxies: Sequence[str] = ()) -> None:
        self.sentinel = sentinel
        self._trusted = trusted_networks(trusted_proxies)

    def _peer(self, context: grpc.ServicerContext) -> str:
        """The caller, for its share of the challenges (protocol.peers.peer_key)."""
        return caller_key(context.peer(), context.invocation_metadata(), self._trusted)

    @unary_errors
    def GetChallenge(
        self, request: pb.GetChallengeRequest, context: grpc.ServicerContext
    ) -> pb.GetChallengeResponse:
        nonce, ttl = self.sentinel.challenge(self._peer(context))
        return pb.GetChallengeResponse(nonce=nonce, ttl_seconds=ttl)

    @unary_errors
    def ReleaseKey(
        self, request: pb.ReleaseKeyRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseKeyResponse:
        released = self.sentinel.release(
            request.release_order,
            request.nonce,
            suite_from_proto(request.suite),
            request.public_key,
            evidence_from_proto(request.evidence),
        )
        return pb.ReleaseKeyResponse(
            key_id=released.key_id,
            keys=[pb.ReleasedKey(version=v, sealed_key=s) for v, s in released.sealed],
        )

    @unary_errors
    def ReleaseJobKey(
        self, request: pb.ReleaseJobKeyRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseJobKeyResponse:
        released, release_seq = self.sentinel.release_job(
            request.manifest,
            request.nonce,
            suite_from_proto(request.suite),
            request.public_key,
            request.input_sha256,
            evidence_from_proto(request.evidence),
        )
        return pb.ReleaseJobKeyResponse(
            key_id=released.key_id,
            keys=[pb.ReleasedKey(version=v, sealed_key=s) for v, s in released.sealed],
            release_seq=release_seq,
        )

    @unary_errors
    def EndJobRelease(
        self, request: pb.EndJobReleaseRequest, context: grpc.ServicerContext
    ) -> pb.EndJobReleaseResponse:
        self.sentinel.end_job_release(
            JobEnd(
                job_id=request.job_id,
                release_seq=request.release_seq,
                outcome=request.outcome,
                answers_sha256=request.answers_sha256,
                records_done=request.records_done,
                proof=request.proof,
            )
        )
        return pb.EndJobReleaseResponse()


def generic_handler(
    servicer: OwnerServicer | WorkloadServicer, service_name: str
) -> grpc.GenericRpcHandler:
    """The service's handlers over raw request bytes, each parsed into its request type."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _parsing(
                servicer.sentinel,
                getattr(servicer, method.name),
                message_factory.GetMessageClass(method.input_type),
                method.name,
            ),
            response_serializer=_serialize,
        )
        for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _parsing(
    sentinel: Sentinel,
    handler: Callable[[Any, grpc.ServicerContext], Message],
    request_type: type[Message],
    name: str,
) -> Callable[[bytes, grpc.ServicerContext], Message]:
    def handle(data: bytes, context: grpc.ServicerContext) -> Message:
        request = request_type()
        try:
            request.ParseFromString(data)
        except DecodeError:
            sentinel.malformed(name)
            refuse(
                context, name, MalformedMessageError("the request is not a valid protobuf message")
            )
        return handler(request, context)

    return handle
