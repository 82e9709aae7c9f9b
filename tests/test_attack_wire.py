"""Attacks through a real server on loopback: evidence, key release and envelope.

Each test is one attack and expects its typed error, and the gRPC status where
the attack reaches the server. The on-path attacker is the `wire.tamper` hook
(it sees and may replace every reply) or raw stub calls with recorded bytes.
A few tests stand in for a malicious server component by sealing with a key
copy taken from the client: they check what the client refuses even from a
peer that holds the keys.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from encloud.client._status import service_error
from encloud.protocol.envelope import MessageType, SealingKey, transcript_start
from encloud.protocol.errors import (
    AkUntrustedError,
    DecryptError,
    EventDigestError,
    EventLogReplayError,
    HeaderMismatchError,
    KeyConfirmationError,
    ModelNotAllowedError,
    NonceMismatchError,
    PcrDigestError,
    ServiceError,
    SignatureError,
    StreamOrderError,
    TranscriptMismatchError,
)
from encloud.protocol.generation import StreamReader
from encloud.protocol.handshake import release_info, seal_key
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.attack]

ASK = [("user", "Count from one to five.")]


def _stub(address: str) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(grpc.insecure_channel(address))


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    return error.code(), service_error(error).reason


def _replace_attest(field_fn):
    def tamper(method, msg, _):
        if method.endswith("Attest"):
            forged = pb.AttestResponse()
            forged.CopyFrom(msg)
            field_fn(forged)
            return forged
        return msg

    return tamper


def _bound(connect):
    client = connect()
    client.attest()
    client.release_key()
    return client


# --- evidence, through the server -------------------------------------------------------


def test_quote_bound_to_another_session_key_is_refused(connect, wire) -> None:
    def swap_key(reply):  # another key of the same suite: only Q can tell
        reply.session_public_key = os.urandom(len(reply.session_public_key))

    wire.tamper = _replace_attest(swap_key)
    with pytest.raises(NonceMismatchError):
        connect().attest()


def test_quote_bound_to_another_session_id_is_refused(connect, wire) -> None:
    def swap_id(reply):
        reply.session_id = os.urandom(16)

    wire.tamper = _replace_attest(swap_id)
    with pytest.raises(NonceMismatchError):
        connect().attest()


def test_quote_bound_to_another_ttl_is_refused(connect, wire) -> None:
    def longer(reply):
        reply.ttl_seconds = reply.ttl_seconds - 1

    wire.tamper = _replace_attest(longer)
    with pytest.raises(NonceMismatchError):
        connect().attest()


def test_foreign_ak_on_the_wire_is_refused(connect, wire) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from tpm_builders import ecc_public

    def swap_ak(reply):
        reply.evidence.ak_public = ecc_public(ec.generate_private_key(ec.SECP256R1()))

    wire.tamper = _replace_attest(swap_ak)
    with pytest.raises(AkUntrustedError):
        connect().attest()


def test_quote_bytes_changed_on_the_wire_are_refused(connect, wire) -> None:
    def flip(reply):
        attest = bytearray(reply.evidence.quote_attest)
        attest[-1] ^= 1
        reply.evidence.quote_attest = bytes(attest)

    wire.tamper = _replace_attest(flip)
    with pytest.raises(SignatureError):
        connect().attest()


def test_pcr_value_changed_on_the_wire_is_refused(connect, wire) -> None:
    def change(reply):
        reply.evidence.pcr_values[0] = bytes(31) + b"\x01"

    wire.tamper = _replace_attest(change)
    with pytest.raises(PcrDigestError):
        connect().attest()


def test_event_log_edited_on_the_wire_is_refused(connect, wire) -> None:
    def edit(reply):
        log = reply.evidence.workload_event_log
        # Change one hex digit of the first event's data (the model digest).
        i = log.index(b'"data":"') + len(b'"data":"')
        digit = b"1" if log[i : i + 1] != b"1" else b"2"
        reply.evidence.workload_event_log = log[:i] + digit + log[i + 1 :]

    wire.tamper = _replace_attest(edit)
    with pytest.raises(EventDigestError):
        connect().attest()


def test_event_log_truncated_on_the_wire_is_refused(connect, wire) -> None:
    def truncate(reply):
        lines = reply.evidence.workload_event_log.splitlines(keepends=True)
        reply.evidence.workload_event_log = b"".join(lines[:-2])

    wire.tamper = _replace_attest(truncate)
    with pytest.raises(EventLogReplayError):
        connect().attest()


def test_server_running_a_model_not_in_the_policy_is_refused(connect, stack) -> None:
    from dataclasses import replace

    policy = replace(stack.policy, allowed_model_digests=(bytes(32),))
    with pytest.raises(ModelNotAllowedError):
        connect(policy).attest()


# --- key release ------------------------------------------------------------------------


def test_release_key_for_a_session_never_attested_is_not_found(stack) -> None:
    stub = _stub(stack.address)
    request = pb.ReleaseKeyRequest(session_id=os.urandom(16), sealed_key=os.urandom(112))
    assert _status(lambda: stub.ReleaseKey(request)) == (
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


def test_second_release_key_after_a_valid_one_is_refused(connect, wire, stack) -> None:
    _bound(connect)
    sent = next(data for method, data in wire.sent if method.endswith("ReleaseKey"))
    stub = _stub(stack.address)
    request = pb.ReleaseKeyRequest.FromString(sent)
    assert _status(lambda: stub.ReleaseKey(request)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SESSION_STATE",
    )


def test_release_key_replayed_into_another_session_is_refused(connect, wire, stack) -> None:
    _bound(connect)
    sent = pb.ReleaseKeyRequest.FromString(
        next(data for method, data in wire.sent if method.endswith("ReleaseKey"))
    )
    victim = connect()
    victim.attest()
    session_id = wire.received_of("Attest")[-1].session_id
    replayed = pb.ReleaseKeyRequest(session_id=session_id, sealed_key=sent.sealed_key)
    stub = _stub(stack.address)
    assert _status(lambda: stub.ReleaseKey(replayed)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "KEY_RELEASE_FAILED",
    )


def test_dek_sealed_with_info_naming_another_quote_is_refused(connect, wire, stack) -> None:
    client = connect()
    client.attest()
    reply = wire.received_of("Attest")[-1]
    other_quote_digest = os.urandom(32)
    suite = client.last_attempt.suite  # the session's own suite: only the info is wrong
    info = release_info(suite, reply.session_id, other_quote_digest)
    secret = client.last_attempt.client_secret  # the client's own: only the info is wrong
    sealed = seal_key(
        suite, reply.session_public_key, bytearray(32), bytearray(os.urandom(32)), secret, info
    )
    stub = _stub(stack.address)
    request = pb.ReleaseKeyRequest(session_id=reply.session_id, sealed_key=sealed)
    assert _status(lambda: stub.ReleaseKey(request)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "KEY_RELEASE_FAILED",
    )


def test_forged_key_confirmation_is_refused(connect, wire) -> None:
    def forge(method, msg, _):
        if method.endswith("ReleaseKey"):
            forged = pb.ReleaseKeyResponse()
            forged.CopyFrom(msg)
            data = bytearray(forged.key_confirmation.sealed)
            data[20] ^= 1
            forged.key_confirmation.sealed = bytes(data)
            return forged
        return msg

    client = connect()
    client.attest()
    wire.tamper = forge
    with pytest.raises(KeyConfirmationError):
        client.release_key()


def test_key_confirmation_from_another_session_is_refused(connect, wire) -> None:
    _bound(connect)
    old = wire.received_of("ReleaseKey")[0].key_confirmation

    def replay(method, msg, _):
        if method.endswith("ReleaseKey"):
            return pb.ReleaseKeyResponse(key_confirmation=old)
        return msg

    client = connect()
    client.attest()
    wire.tamper = replay
    with pytest.raises(KeyConfirmationError):
        client.release_key()


# --- envelope: server to client ---------------------------------------------------------


def _stream_frames(client, wire) -> list[pb.SealedMessage]:
    before = len(wire.received_of("StreamInfer"))
    list(client.stream(ASK, max_new_tokens=8))
    return [m.frame for m in wire.received_of("StreamInfer")[before:]]


def _frame_tamper(fn):
    state: dict[str, list] = {"seen": []}

    def tamper(method, msg, index):
        if method.endswith("StreamInfer"):
            return fn(msg, index, state)
        return msg

    return tamper


def test_frame_replayed_into_another_session_is_refused(connect, wire) -> None:
    frames = _stream_frames(_bound(connect), wire)
    client = _bound(connect)

    def swap(msg, index, _):
        if index == 0:
            forged = pb.SealedMessage()
            forged.CopyFrom(frames[0])
            forged.request_id = msg.frame.request_id
            return pb.StreamInferResponse(frame=forged)
        return msg

    wire.tamper = _frame_tamper(swap)
    with pytest.raises(DecryptError):
        list(client.stream(ASK, max_new_tokens=8))


def test_client_request_reflected_back_as_a_frame_is_refused(connect, wire) -> None:
    client = _bound(connect)
    sent: list[pb.SealedMessage] = []

    def reflect(msg, index, _):
        if index == 0:
            request = pb.StreamInferRequest.FromString(
                [d for m, d in wire.sent if m.endswith("StreamInfer")][-1]
            ).request
            forged = pb.SealedMessage(
                type=pb.MESSAGE_TYPE_FRAME, request_id=request.request_id, seq=0
            )
            forged.sealed = request.sealed
            sent.append(forged)
            return pb.StreamInferResponse(frame=forged)
        return msg

    wire.tamper = _frame_tamper(reflect)
    with pytest.raises(DecryptError):
        list(client.stream(ASK, max_new_tokens=8))
    assert sent


def _replay_stream(client, wire, arrange) -> Iterator[str]:
    """Run a real stream, then hand the client its own recorded frames rearranged."""
    frames = _stream_frames(client, wire)
    request = pb.StreamInferRequest.FromString(
        [d for m, d in wire.sent if m.endswith("StreamInfer")][-1]
    ).request
    session = client._session
    reader = StreamReader(
        session.s2c,
        request.request_id,
        transcript_start(session.session_id, request.request_id, request.sealed),
    )

    def pieces() -> Iterator[str]:
        for frame in arrange(frames):
            text = reader.feed(frame)
            if text is not None:
                yield text
        reader.finish()

    return pieces()


def test_frames_reordered_are_refused(connect, wire) -> None:
    client = _bound(connect)
    stream = _replay_stream(client, wire, lambda f: [f[1], f[0], *f[2:]])
    with pytest.raises(HeaderMismatchError):
        list(stream)


def test_frame_dropped_is_refused(connect, wire) -> None:
    client = _bound(connect)
    wire.tamper = _frame_tamper(lambda msg, index, _: None if index == 1 else msg)
    with pytest.raises(HeaderMismatchError):
        list(client.stream(ASK, max_new_tokens=8))


def test_frame_duplicated_is_refused(connect, wire) -> None:
    client = _bound(connect)

    def duplicate(msg, index, state):
        if index == 0:
            state["seen"].append(msg)
        if index == 1:
            return state["seen"][0]  # frame 0 again instead of frame 1
        return msg

    wire.tamper = _frame_tamper(duplicate)
    with pytest.raises(HeaderMismatchError):
        list(client.stream(ASK, max_new_tokens=8))


def test_frame_after_the_final_frame_is_refused(connect, wire) -> None:
    client = _bound(connect)
    stream = _replay_stream(client, wire, lambda f: [*f, f[0]])
    with pytest.raises(StreamOrderError):
        list(stream)


def test_final_frame_with_a_wrong_transcript_hash_is_refused(connect, wire) -> None:
    client = _bound(connect)
    s2c = SealingKey(bytearray(client._session.keys.s2c), client._session.session_id)

    def wrong_hash(msg, index, _):
        if msg.frame.type == pb.MESSAGE_TYPE_FINAL:
            final = pb.GenerationFinal(
                finish_reason=pb.FINISH_REASON_STOP, transcript_hash=os.urandom(32)
            )
            sealed = s2c.seal(
                MessageType.FINAL, msg.frame.request_id, msg.frame.seq, final.SerializeToString()
            )
            return pb.StreamInferResponse(
                frame=pb.SealedMessage(
                    type=sealed.type,
                    request_id=sealed.request_id,
                    seq=sealed.seq,
                    sealed=sealed.data,
                )
            )
        return msg

    wire.tamper = _frame_tamper(wrong_hash)
    with pytest.raises(TranscriptMismatchError):
        list(client.stream(ASK, max_new_tokens=8))


def test_response_presented_as_a_final_frame_is_refused(connect, wire) -> None:
    client = _bound(connect)
    client.infer(ASK, max_new_tokens=4)
    response = wire.received_of("Infer")[-1].response

    def as_final(msg, index, _):
        if msg.frame.type == pb.MESSAGE_TYPE_FINAL:
            forged = pb.SealedMessage()
            forged.CopyFrom(response)
            forged.type = pb.MESSAGE_TYPE_FINAL
            forged.request_id = msg.frame.request_id
            forged.seq = msg.frame.seq
            return pb.StreamInferResponse(frame=forged)
        return msg

    wire.tamper = _frame_tamper(as_final)
    with pytest.raises(DecryptError):
        list(client.stream(ASK, max_new_tokens=8))


def test_key_confirmation_presented_as_a_response_is_refused(connect, wire) -> None:
    client = _bound(connect)
    confirmation = wire.received_of("ReleaseKey")[-1].key_confirmation

    def as_response(method, msg, _):
        if method.endswith("/Infer"):
            forged = pb.SealedMessage()
            forged.CopyFrom(confirmation)
            forged.type = pb.MESSAGE_TYPE_RESPONSE
            forged.request_id = msg.response.request_id
            return pb.InferResponse(response=forged)
        return msg

    wire.tamper = as_response
    with pytest.raises(DecryptError):
        client.infer(ASK, max_new_tokens=4)


# --- envelope: client to server ---------------------------------------------------------


def _last_sent(wire, method: str) -> bytes:
    return [d for m, d in wire.sent if m.endswith(method)][-1]


def test_sealed_request_replayed_with_the_same_id_is_refused(connect, wire, stack) -> None:
    client = _bound(connect)
    client.infer(ASK, max_new_tokens=4)
    request = pb.InferRequest.FromString(_last_sent(wire, "/Infer"))
    stub = _stub(stack.address)
    assert _status(lambda: stub.Infer(request)) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )


def test_sealed_request_with_a_too_old_id_is_refused(connect, wire, stack) -> None:
    client = _bound(connect)
    client._session.next_request_id = 2000
    client.infer(ASK, max_new_tokens=4)  # the server has now seen id 2000
    session = client._session
    payload = pb.GenerationRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")])
    old = session.c2s.seal(MessageType.REQUEST, 1, 0, payload.SerializeToString())
    request = pb.InferRequest(
        session_id=session.session_id,
        request=pb.SealedMessage(type=old.type, request_id=1, seq=0, sealed=old.data),
    )
    stub = _stub(stack.address)
    assert _status(lambda: stub.Infer(request)) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )


def test_request_replayed_into_another_session_is_refused(connect, wire, stack) -> None:
    _bound(connect).infer(ASK, max_new_tokens=4)
    request = pb.InferRequest.FromString(_last_sent(wire, "/Infer"))
    other = _bound(connect)
    request.session_id = other._session.session_id
    stub = _stub(stack.address)
    assert _status(lambda: stub.Infer(request)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ENVELOPE_REJECTED",
    )


def test_server_response_sent_back_as_a_request_is_refused(connect, wire, stack) -> None:
    client = _bound(connect)
    client.infer(ASK, max_new_tokens=4)
    response = wire.received_of("/Infer")[-1].response
    forged = pb.SealedMessage()
    forged.CopyFrom(response)
    forged.type = pb.MESSAGE_TYPE_REQUEST
    forged.request_id = 50
    request = pb.InferRequest(session_id=client._session.session_id, request=forged)
    stub = _stub(stack.address)
    assert _status(lambda: stub.Infer(request)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ENVELOPE_REJECTED",
    )


def test_key_confirmation_presented_as_a_request_is_refused(connect, wire, stack) -> None:
    client = _bound(connect)
    forged = pb.SealedMessage()
    forged.CopyFrom(wire.received_of("ReleaseKey")[-1].key_confirmation)
    forged.type = pb.MESSAGE_TYPE_REQUEST
    forged.request_id = 60
    request = pb.InferRequest(session_id=client._session.session_id, request=forged)
    stub = _stub(stack.address)
    assert _status(lambda: stub.Infer(request)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ENVELOPE_REJECTED",
    )


def test_unsealed_end_session_is_refused_and_the_session_lives(connect, stack) -> None:
    client = _bound(connect)
    session_id = client._session.session_id
    unsealed = pb.SealedMessage(type=pb.MESSAGE_TYPE_END, request_id=70, seq=0, sealed=b"")
    stub = _stub(stack.address)
    request = pb.EndSessionRequest(session_id=session_id, end=unsealed)
    assert _status(lambda: stub.EndSession(request)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ENVELOPE_REJECTED",
    )
    assert client.infer(ASK, max_new_tokens=2).completion.finish_reason in ("stop", "length")


def test_forged_end_session_is_refused_and_the_session_lives(connect, stack) -> None:
    client = _bound(connect)
    forged = pb.SealedMessage(
        type=pb.MESSAGE_TYPE_END, request_id=71, seq=0, sealed=os.urandom(12 + 1024 + 16)
    )
    stub = _stub(stack.address)
    request = pb.EndSessionRequest(session_id=client._session.session_id, end=forged)
    assert _status(lambda: stub.EndSession(request)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ENVELOPE_REJECTED",
    )
    assert client.infer(ASK, max_new_tokens=2).completion.finish_reason in ("stop", "length")


def test_request_after_end_session_is_not_found(connect, wire, stack) -> None:
    client = _bound(connect)
    client.infer(ASK, max_new_tokens=2)
    request = pb.InferRequest.FromString(_last_sent(wire, "/Infer"))
    client.end_session()
    stub = _stub(stack.address)
    assert _status(lambda: stub.Infer(request)) == (
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


# --- expiry -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_ttl_server(model_dir: Path, tmp_path_factory):
    from stack import running_stack

    from encloud.protocol.policy import load_policy

    # No periodic sweep: an expired session is found by the next call that names it, so
    # what that call is answered does not depend on when a sweep ran.
    with running_stack(
        tmp_path_factory.mktemp("short-ttl"),
        model_dir,
        session_ttl_seconds=10,
        pending_session_ttl_seconds=1,
        session_sweep_interval_seconds=3600,
    ) as stack:
        yield stack.address, load_policy(stack.server.policy_path)


def _client(address, policy, tmp_path):
    from encloud.client import Client

    return Client(address, policy, audit_log=tmp_path / "audit.jsonl")


def _answered_until(probe, wanted: tuple[grpc.StatusCode, str], seconds: float) -> None:
    """Send `probe` (a call the server refuses without changing the session) until it is
    answered `wanted`, the TTL having run out; every other answer must be the refusal."""
    deadline = time.monotonic() + seconds
    while True:
        answer = _status(probe)
        if answer == wanted:
            return
        assert answer[0] == grpc.StatusCode.PERMISSION_DENIED, answer
        assert time.monotonic() < deadline, "the session never expired"
        time.sleep(0.05)


def test_release_key_to_an_expired_pending_session_is_not_found(short_ttl_server, tmp_path):
    address, policy = short_ttl_server
    with _client(address, policy, tmp_path) as client:
        client.attest()
        attempt = client.last_attempt
        garbage = pb.ReleaseKeyRequest(session_id=attempt.session_id, sealed_key=os.urandom(64))
        stub = _stub(address)
        # Refused (KEY_RELEASE_FAILED, the session unchanged) until the pending TTL ran out.
        _answered_until(
            lambda: stub.ReleaseKey(garbage, timeout=10),
            (grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED"),
            seconds=30,
        )
        with pytest.raises(ServiceError) as info:
            client.release_key()
    # The expired pending session was dropped by the call that found it expired.
    assert (info.value.code, info.value.reason) == ("NOT_FOUND", "SESSION_NOT_FOUND")


def test_request_in_an_expired_session_is_not_found(short_ttl_server, tmp_path):
    address, policy = short_ttl_server
    with _client(address, policy, tmp_path) as client:
        client.attest()
        client.release_key()
        session = client._session
        payload = pb.GenerationRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")])
        sealed = session.c2s.seal(MessageType.REQUEST, 1, 0, payload.SerializeToString())
        request = pb.InferRequest(
            session_id=session.session_id,
            request=pb.SealedMessage(type=sealed.type, request_id=1, seq=0, sealed=sealed.data),
        )
        forged = pb.InferRequest(
            session_id=session.session_id,
            request=pb.SealedMessage(
                type=pb.MESSAGE_TYPE_REQUEST, request_id=2, sealed=os.urandom(64)
            ),
        )
        stub = _stub(address)
        # A forgery is refused (ENVELOPE_REJECTED, the session unchanged) until the TTL ran out.
        _answered_until(
            lambda: stub.Infer(forged, timeout=10),
            (grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED"),
            seconds=40,
        )
        assert _status(lambda: stub.Infer(request)) == (
            grpc.StatusCode.NOT_FOUND,
            "SESSION_EXPIRED",
        )


def test_an_end_with_a_payload_is_refused_and_the_session_kept(connect, stack) -> None:
    client = _bound(connect)
    session = client._session
    forged_end = session.c2s.seal(MessageType.END, session.take_request_id(), 0, b"not empty")
    request = pb.EndSessionRequest(
        session_id=session.session_id,
        end=pb.SealedMessage(
            type=forged_end.type, request_id=forged_end.request_id, sealed=forged_end.data
        ),
    )
    stub = _stub(stack.address)
    assert _status(lambda: stub.EndSession(request)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST_PAYLOAD",
    )
    assert client.infer(ASK, max_new_tokens=2).text is not None  # the session lives on
