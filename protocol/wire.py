"""The wire types as protobuf and as domain values: one converter for both ends.

The client, the server, the evidence bundle, the load generator and the
benchmark all go through these functions, so a field added to the proto is
carried everywhere or nowhere.
"""

from __future__ import annotations

from encloud.protocol.envelope import Sealed
from encloud.protocol.evidence import Evidence
from encloud.protocol.handshake import HpkeSuiteId
from encloud.protocol.v2 import encloud_pb2 as pb

ROUTE_HEADER = "encloud-route"
"""gRPC metadata key of the routing token: the server sends it in the Attest response's initial
metadata (a header, which load balancers read); the client sends it back on every later call
of that session. Opaque to the client; it names the replica, never the session."""


def suite_to_proto(suite: HpkeSuiteId) -> pb.HpkeSuite:
    return pb.HpkeSuite(kem_id=suite.kem_id, kdf_id=suite.kdf_id, aead_id=suite.aead_id)


def suite_from_proto(suite: pb.HpkeSuite) -> HpkeSuiteId:
    return HpkeSuiteId(suite.kem_id, suite.kdf_id, suite.aead_id)


def sealed_from_proto(message: pb.SealedMessage) -> Sealed:
    return Sealed(message.type, message.request_id, message.seq, message.sealed)


def sealed_to_proto(sealed: Sealed) -> pb.SealedMessage:
    return pb.SealedMessage(
        type=sealed.type,  # type: ignore[arg-type]
        request_id=sealed.request_id,
        seq=sealed.seq,
        sealed=sealed.data,
    )


def evidence_from_proto(evidence: pb.Evidence) -> Evidence:
    return Evidence(
        quote_attest=evidence.quote_attest,
        quote_signature=evidence.quote_signature,
        ak_public=evidence.ak_public,
        pcr_values=dict(evidence.pcr_values),
        workload_event_log=evidence.workload_event_log,
        pcr_hash_algorithm=evidence.pcr_hash_algorithm,
        ak_certificate_chain=tuple(evidence.ak_certificate_chain),
        hardware_kind=evidence.hardware_kind,
        hardware_report=evidence.hardware_report,
        hardware_certificate_chain=tuple(evidence.hardware_certificate_chain),
    )


def evidence_to_proto(evidence: Evidence) -> pb.Evidence:
    return pb.Evidence(
        quote_attest=evidence.quote_attest,
        quote_signature=evidence.quote_signature,
        ak_public=evidence.ak_public,
        ak_certificate_chain=list(evidence.ak_certificate_chain),
        pcr_hash_algorithm=evidence.pcr_hash_algorithm,
        pcr_values=dict(evidence.pcr_values),
        workload_event_log=evidence.workload_event_log,
        hardware_kind=evidence.hardware_kind,
        hardware_report=evidence.hardware_report,
        hardware_certificate_chain=list(evidence.hardware_certificate_chain),
    )
