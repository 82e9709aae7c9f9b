"""The whole path on loopback: real swtpm, real model, real server process."""

from __future__ import annotations

import base64
import os

import grpc
import pytest

from encloud.client import NO_AUDIT, Client
from encloud.protocol.envelope import MessageType, Sealed
from encloud.protocol.errors import KeyConfirmationError, ServiceError
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

PROMPT = "Name three colours of the rainbow. canary-7f3a9c2e-prompt"
GREEDY = {"max_new_tokens": 24}


def forms(secret: bytes) -> list[bytes]:
    """The ways a secret could show up in captured bytes."""
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
    ]


def test_attest_release_chat_end(connect, wire, stack) -> None:
    dek = os.urandom(32)
    client = connect()

    attestation = client.attest()
    assert attestation.model_digest in stack.policy.allowed_model_digests
    assert attestation.workload_pcr == stack.policy.workload_pcr
    client.release_key(dek=dek)

    answer = client.infer([("user", PROMPT)], **GREEDY)
    assert answer.text.strip()
    assert answer.completion.finish_reason in {"stop", "length"}
    assert 0 < answer.completion.completion_tokens <= GREEDY["max_new_tokens"]

    stream = client.stream([("user", PROMPT)], **GREEDY)
    pieces = list(stream)
    assert stream.completion is not None
    # Greedy decoding of the same prompt: the stream says what Infer said.
    assert "".join(pieces) == answer.text
    assert stream.completion == answer.completion

    # Positive control: the capture holds the real frames; the session key opens one.
    first_frame = wire.received_of("StreamInfer")[0].frame
    session = client._session
    assert session is not None and session.s2c is not None
    payload = session.s2c.open(
        Sealed(first_frame.type, first_frame.request_id, first_frame.seq, first_frame.sealed),
        MessageType.FRAME,
        first_frame.request_id,
        0,
    )
    assert pb.GenerationChunk.FromString(payload).text == pieces[0]

    # Nothing secret on the wire, in any form.
    captured = wire.all_bytes()
    assert len(wire.sent) >= 4 and len(captured) > 1000
    for secret in (PROMPT.encode(), b"canary-7f3a9c2e-prompt", dek, answer.text.encode()):
        for form in forms(secret):
            assert form not in captured

    # A request sealed under the session's keys is refused once the session ended.
    _, late, _ = client._seal(client._session, [("user", "too late")], GREEDY)
    session_id = session.session_id
    client.end_session()
    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(stack.address))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Infer(
            pb.InferRequest(
                session_id=session_id,
                request=pb.SealedMessage(
                    type=late.type, request_id=late.request_id, seq=late.seq, sealed=late.data
                ),
            ),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_restart_against_same_tpm_still_verifies(fresh_stack) -> None:
    policy = fresh_stack.policy
    with Client(fresh_stack.address, policy, audit_log=NO_AUDIT) as client:
        first = client.attest()
    assert len(first.events) == 2

    fresh_stack.restart_server()

    with Client(fresh_stack.address, policy, audit_log=NO_AUDIT) as client:
        again = client.attest()
        client.release_key()
        answer = client.infer([("user", "Say hello.")], max_new_tokens=8)
    assert answer.text
    # The restart appended a second start-up to the same log and PCR.
    assert len(again.events) == 4
    assert again.ak_fingerprint == first.ak_fingerprint
    assert again.model_digest == first.model_digest
    assert again.workload_pcr_value != first.workload_pcr_value


def test_a_client_outlives_a_server_restart_by_attesting_again(fresh_stack) -> None:
    """The restarted server (same address) has none of the old sessions: the next call is
    answered SESSION_NOT_FOUND before anything runs, and the client attests again on its own
    and sends the request again (it failed every later call before the retry rules)."""
    port = fresh_stack.address.rsplit(":", 1)[1]
    told: list[object] = []
    with Client(
        fresh_stack.address, fresh_stack.policy, audit_log=NO_AUDIT, on_reattest=told.append
    ) as client:
        assert client.infer([("user", "Say hello.")], max_new_tokens=4).text
        fresh_stack.restart_server(port=port)
        assert fresh_stack.address.endswith(f":{port}")
        for _ in range(3):
            assert client.infer([("user", "Say hello.")], max_new_tokens=4).text
        assert client.reattest_count == 1 and len(told) == 1


def test_unknown_session_is_not_found(connect) -> None:
    client = connect()
    client.auto_reattest = False
    client.attest()
    client.release_key()
    client._session.attempt.session_id = os.urandom(16)  # type: ignore[union-attr]
    with pytest.raises(ServiceError) as refused:
        client.infer([("user", "hello")], max_new_tokens=4)
    assert refused.value.code == "NOT_FOUND"
    assert refused.value.reason == "SESSION_NOT_FOUND"


def test_a_lost_session_is_attested_again_and_the_request_sent_once_more(connect) -> None:
    # SESSION_NOT_FOUND is answered before anything is opened: nothing ran, so the client
    # attests again (verifying the new evidence) and resends under the new session.
    client = connect()
    client.attest()
    client.release_key()
    lost = os.urandom(16)
    client._session.attempt.session_id = lost  # type: ignore[union-attr]
    answer = client.infer([("user", "hello")], max_new_tokens=4)
    assert answer.completion.finish_reason in {"stop", "length"}
    assert client.reattest_count == 1 and client.session_id != lost


@pytest.mark.attack
def test_key_confirmation_with_another_header_is_refused(connect, wire) -> None:
    """A confirmation relabelled as request 1 must fail as a key confirmation,
    and the derived keys must not be kept."""
    client = connect()
    client.attest()

    def relabel(method, msg, _):
        if method.endswith("ReleaseKey"):
            forged = pb.ReleaseKeyResponse()
            forged.CopyFrom(msg)
            forged.key_confirmation.request_id = 1
            return forged
        return msg

    wire.tamper = relabel
    with pytest.raises(KeyConfirmationError):
        client.release_key()
    assert client.session_id is None  # the derived keys were not kept


def test_repetition_penalty_and_stop_token_ids_reach_the_engine(connect) -> None:
    client = connect()
    client.attest()
    client.release_key()
    plain = client.infer([("user", PROMPT)], **GREEDY)
    penalised = client.infer([("user", PROMPT)], repetition_penalty=1.8, **GREEDY)
    assert penalised.text and penalised.text != plain.text
    with pytest.raises(ServiceError) as refused:
        client.infer([("user", PROMPT)], repetition_penalty=50.0, **GREEDY)
    assert refused.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("method", ["Attest", "ReleaseKey", "Infer", "StreamInfer", "EndSession"])
def test_a_protocol_v1_client_is_refused_by_name(stack, method: str) -> None:
    from encloud.client._status import service_error

    with grpc.insecure_channel(stack.address) as channel:
        path = f"/encloud.v1.InferenceService/{method}"
        call = channel.unary_stream(path) if method == "StreamInfer" else channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as refused:
            result = call(b"", timeout=10)
            if method == "StreamInfer":
                list(result)
    error = service_error(refused.value)
    assert (error.code, error.reason) == ("FAILED_PRECONDITION", "UNSUPPORTED_PROTOCOL_VERSION")
    assert "protocol v2" in str(error)
