"""Bad input through a real server: each gets its own status code, others keep being served."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from encloud.client import Client
from encloud.protocol.envelope import MessageType
from encloud.protocol.v2 import encloud_pb2 as pb

pytestmark = pytest.mark.attack

SERVICE = "/encloud.v2.InferenceService/"


def raw_call(address: str, method: str, data: bytes) -> grpc.RpcError:
    channel = grpc.insecure_channel(address)
    try:
        call = channel.unary_unary(SERVICE + method)
        with pytest.raises(grpc.RpcError) as refused:
            call(data, timeout=30)
        return refused.value
    finally:
        channel.close()


def reason_of(error: grpc.RpcError) -> str:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def attest_request(nonce: bytes, commitment: bytes = bytes(32)) -> bytes:
    return pb.AttestRequest(
        nonce=nonce,
        suite=pb.HpkeSuite(kem_id=0x20, kdf_id=1, aead_id=2),
        client_commitment=commitment,
    ).SerializeToString()


def _invalid_utf8_request() -> bytes:
    # GenerationRequest{messages: [ChatMessage{role: USER, content: b"\xff\xfe"}]}
    message = b"\x08\x02" + b"\x12\x02\xff\xfe"
    return b"\x0a" + bytes([len(message)]) + message


def test_each_bad_input_gets_its_code_and_others_keep_working(
    stack, connect: Callable[..., Client]
) -> None:
    bystander = connect()
    bystander.attest()
    bystander.release_key()
    outcome: list[str] = []
    stream = bystander.stream([("user", "Count slowly from one to forty.")], max_new_tokens=96)
    reader = threading.Thread(target=lambda: outcome.append("".join(stream)))
    reader.start()

    address = stack.address
    cases: list[tuple[str, grpc.RpcError, grpc.StatusCode, str]] = []

    def case(name: str, error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
        cases.append((name, error, code, reason))

    ok = "INVALID_ARGUMENT"
    case(
        "malformed protobuf",
        raw_call(address, "Attest", b"\xff\xff\xff\xff"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_MESSAGE",
    )
    case(
        "malformed stream request",
        raw_call(address, "Infer", b"\x0a\x05ab"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_MESSAGE",
    )
    case(
        "oversized message",
        raw_call(address, "Attest", attest_request(os.urandom(2 << 20))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    )
    case(
        "short nonce",
        raw_call(address, "Attest", attest_request(b"n" * 8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ok,
    )
    case(
        "long nonce",
        raw_call(address, "Attest", attest_request(b"n" * 65)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ok,
    )
    for commitment in (b"", bytes(31), bytes(33)):
        case(
            f"client commitment of {len(commitment)} bytes",
            raw_call(address, "Attest", attest_request(b"n" * 32, commitment)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ok,
        )
    unknown = pb.InferRequest(
        session_id=os.urandom(16),
        request=pb.SealedMessage(type=pb.MESSAGE_TYPE_REQUEST, request_id=1, sealed=os.urandom(64)),
    )
    case(
        "unknown session id",
        raw_call(address, "Infer", unknown.SerializeToString()),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    short_id = pb.InferRequest(session_id=b"abc", request=unknown.request)
    case(
        "wrong-length session id",
        raw_call(address, "Infer", short_id.SerializeToString()),
        grpc.StatusCode.INVALID_ARGUMENT,
        ok,
    )

    victim = connect()
    victim.attest()
    session = victim.last_attempt  # attested, key not released: a pending session
    assert session is not None
    for length in (0, 31, 32, 95, 4096):
        release = pb.ReleaseKeyRequest(session_id=session.session_id, sealed_key=os.urandom(length))
        # Every size is checked: a refused release leaves the pending session as it was.
        case(
            f"wrong-length sealed key ({length})",
            raw_call(address, "ReleaseKey", release.SerializeToString()),
            grpc.StatusCode.PERMISSION_DENIED,
            "KEY_RELEASE_FAILED",
        )
    victim.release_key()  # and the client that attested can still release its key
    assert victim.session_id == session.session_id

    holder = connect()
    holder.attest()
    holder.release_key()
    bound = holder._session
    assert bound is not None and bound.c2s is not None
    for sealed in (b"", os.urandom(5), os.urandom(27), os.urandom(300)):
        request = pb.InferRequest(
            session_id=bound.session_id,
            request=pb.SealedMessage(type=pb.MESSAGE_TYPE_REQUEST, request_id=50, sealed=sealed),
        )
        case(
            f"bad sealed request ({len(sealed)} bytes)",
            raw_call(address, "Infer", request.SerializeToString()),
            grpc.StatusCode.PERMISSION_DENIED,
            "ENVELOPE_REJECTED",
        )
    bad_utf8 = bound.c2s.seal(MessageType.REQUEST, 60, 0, _invalid_utf8_request())
    request = pb.InferRequest(
        session_id=bound.session_id,
        request=pb.SealedMessage(
            type=bad_utf8.type, request_id=bad_utf8.request_id, seq=0, sealed=bad_utf8.data
        ),
    )
    case(
        "invalid UTF-8 inside the sealed request",
        raw_call(address, "Infer", request.SerializeToString()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST_PAYLOAD",
    )
    not_a_request = bound.c2s.seal(MessageType.REQUEST, 61, 0, b"\xff\xff\xff")
    request = pb.InferRequest(
        session_id=bound.session_id,
        request=pb.SealedMessage(
            type=not_a_request.type, request_id=61, seq=0, sealed=not_a_request.data
        ),
    )
    case(
        "garbage inside the sealed request",
        raw_call(address, "Infer", request.SerializeToString()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST_PAYLOAD",
    )

    for name, error, code, reason in cases:
        assert error.code() == code, (name, error.code())
        if reason:
            assert reason_of(error) == reason, (name, reason_of(error))
        assert "Traceback" not in (error.details() or ""), name

    # The holder's session survived its bad requests; the bystander got its whole answer.
    assert holder.infer([("user", "Say ok.")], max_new_tokens=4).text
    reader.join(timeout=120)
    assert outcome and outcome[0]
    assert stream.completion is not None


@pytest.mark.embeddings
def test_embed_on_a_chat_only_server_is_unimplemented_by_name(stack) -> None:
    """This module's server measured no embedding model: the client refuses to send texts
    there (its attestation shows no embeddings model), the server answers a raw Embed by
    name, and the session keeps serving chat."""
    from conftest import sealed_by_client

    from encloud.client import NO_AUDIT, RoleNotAttestedError

    with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
        assert set(client.attest().models) == {"chat"}
        with pytest.raises(RoleNotAttestedError, match="no embeddings model"):
            client.embed(["hello"])
        session = client._session
        request = pb.EmbedRequest(
            session_id=session.session_id,
            request=sealed_by_client(session, MessageType.EMBED_REQUEST),
        )
        refused = raw_call(stack.address, "Embed", request.SerializeToString())
        assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
        assert reason_of(refused) == "MODEL_NOT_SERVED"
        assert client.infer([("user", "Say hi.")], max_new_tokens=2).text
