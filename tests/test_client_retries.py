"""The client's retry rules, against a relay in front of the real server that injects statuses.

A call is sent again only when its status proves nothing was processed (encloud.client._retry):
RESOURCE_EXHAUSTED with RetryInfo, UNAVAILABLE sent by the server, a lost or expired session
before the first frame. Each retry is sealed under a fresh request id; at most 3 retries and
1 re-attestation per call, all within its deadline; a stream is never retried after its
first frame.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from relay import Fault, Relay

from encloud.client import NO_AUDIT, AsyncClient, Client, ServiceError
from encloud.protocol.errors import MalformedAttestResponseError, MalformedEvidenceError
from encloud.protocol.v2 import encloud_pb2 as pb

pytestmark = pytest.mark.e2e

ASK = [("user", "Say hello.")]
BUSY = Fault(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "SERVER_BUSY", retry_after=0.05)
DRAINING = Fault(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", "UNAVAILABLE")
EXPIRED = Fault(grpc.StatusCode.NOT_FOUND, "the session expired", "SESSION_EXPIRED")


@pytest.fixture
def relay(stack) -> Iterator[Relay]:
    relay = Relay(stack.address).start()
    yield relay
    relay.stop()


def _client(relay: Relay, stack, **kwargs) -> Client:
    return Client(relay.address, stack.policy, audit_log=NO_AUDIT, **kwargs)


def _infer_ids(relay: Relay) -> list[int]:
    return [pb.InferRequest.FromString(r).request.request_id for r in relay.of("Infer")]


def _stream_ids(relay: Relay) -> list[int]:
    return [pb.StreamInferRequest.FromString(r).request.request_id for r in relay.of("StreamInfer")]


def test_resource_exhausted_with_retry_info_is_retried_under_fresh_request_ids(
    relay, stack
) -> None:
    relay.plan["Infer"] = [BUSY, BUSY]
    with _client(relay, stack) as client:
        answer = client.infer(ASK, max_new_tokens=4)
        assert answer.completion.finish_reason in {"stop", "length"}
        assert client.retry_count == 2
    ids = _infer_ids(relay)
    assert len(ids) == 3 and len(set(ids)) == 3  # three attempts, three request ids


def test_unavailable_from_the_server_is_retried_for_attest(relay, stack) -> None:
    relay.plan["Attest"] = [DRAINING]
    with _client(relay, stack) as client:
        client.infer(ASK, max_new_tokens=2)
        assert client.retry_count == 1
    assert len(relay.of("Attest")) == 2


def test_an_expired_session_is_ended_attested_again_and_the_request_resent(relay, stack) -> None:
    relay.plan["Infer"] = [EXPIRED]
    with _client(relay, stack) as client:
        client.attest()
        client.release_key()
        first = client.session_id
        client.infer(ASK, max_new_tokens=2)
        assert client.reattest_count == 1 and client.session_id != first
    assert len(relay.of("Attest")) == 2
    # The old session was ended with a sealed END before the new one was attested.
    ends = [pb.EndSessionRequest.FromString(r).session_id for r in relay.of("EndSession")]
    assert first in ends


def test_at_most_three_retries_then_the_error(relay, stack) -> None:
    relay.plan["Infer"] = [BUSY] * 5
    with _client(relay, stack) as client, pytest.raises(ServiceError) as refused:
        client.infer(ASK, max_new_tokens=2)
    assert refused.value.reason == "SERVER_BUSY"
    assert len(relay.of("Infer")) == 4  # the call and 3 retries


def test_at_most_one_reattestation_per_call(relay, stack) -> None:
    relay.plan["Infer"] = [EXPIRED, EXPIRED]
    with _client(relay, stack) as client, pytest.raises(ServiceError) as refused:
        client.infer(ASK, max_new_tokens=2)
    assert refused.value.reason == "SESSION_EXPIRED"
    assert client.reattest_count == 1


def test_a_retry_delay_past_the_deadline_is_not_waited_for(relay, stack) -> None:
    slow = Fault(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "SERVER_BUSY", retry_after=30.0)
    with _client(relay, stack) as client:
        client.attest()
        client.release_key()
        relay.plan["Infer"] = [slow]
        started = time.monotonic()
        with pytest.raises(ServiceError) as refused:
            client.infer(ASK, max_new_tokens=2, timeout=2.0)
        assert time.monotonic() - started < 2.0
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert len(relay.of("Infer")) == 1


def test_the_deadline_bounds_every_retry(relay, stack) -> None:
    relay.plan["Infer"] = [
        Fault(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "SERVER_BUSY", retry_after=0.4)
    ] * 3
    with _client(relay, stack) as client:
        client.attest()
        client.release_key()
        started = time.monotonic()
        with pytest.raises(ServiceError):
            client.infer(ASK, max_new_tokens=2, timeout=1.0)
        assert time.monotonic() - started < 1.5
    assert len(relay.of("Infer")) <= 3


def test_a_stream_is_retried_before_its_first_frame(relay, stack) -> None:
    relay.plan["StreamInfer"] = [DRAINING]
    with _client(relay, stack) as client:
        stream = client.stream(ASK, max_new_tokens=4)
        text = "".join(stream)
        assert text and stream.completion is not None
    ids = _stream_ids(relay)
    assert len(ids) == 2 and ids[0] != ids[1]


def test_a_stream_is_never_retried_after_its_first_frame(relay, stack) -> None:
    broken = Fault(grpc.StatusCode.UNAVAILABLE, "gone", "UNAVAILABLE", after_frames=1)
    relay.plan["StreamInfer"] = [broken]
    with _client(relay, stack) as client:
        pieces = []
        with pytest.raises(ServiceError) as failed:
            for piece in client.stream(ASK, max_new_tokens=16):
                pieces.append(piece)
        assert len(pieces) == 1  # the frame that came through, nothing more
        assert client.retry_count == 0
    assert failed.value.code == "UNAVAILABLE"
    assert len(relay.of("StreamInfer")) == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault(grpc.StatusCode.INVALID_ARGUMENT, "bad", "INVALID_ARGUMENT"),
        Fault(grpc.StatusCode.RESOURCE_EXHAUSTED, "no RetryInfo", "RESOURCE_EXHAUSTED"),
        # UNAVAILABLE without the server's ErrorInfo and after connecting: it may have run.
        Fault(grpc.StatusCode.UNAVAILABLE, "connection reset"),
        Fault(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL"),
    ],
    ids=["invalid-argument", "exhausted-without-delay", "unavailable-unproven", "internal"],
)
def test_a_status_that_does_not_prove_nothing_ran_is_not_retried(relay, stack, fault) -> None:
    relay.plan["Infer"] = [fault]
    with _client(relay, stack) as client, pytest.raises(ServiceError):
        client.infer(ASK, max_new_tokens=2)
    assert len(relay.of("Infer")) == 1


def test_a_server_that_cannot_be_reached_is_retried_then_reported(stack) -> None:
    # Nothing listens there: the connection fails before any request is sent.
    client = Client("127.0.0.1:1", stack.policy, audit_log=NO_AUDIT, timeout=10.0)
    with client, pytest.raises(ServiceError) as refused:
        client.attest()
    assert refused.value.code == "UNAVAILABLE"
    assert client.retry_count == 3


def test_the_async_client_retries_its_stream_by_the_same_rules(relay, stack) -> None:
    relay.plan["StreamInfer"] = [BUSY]

    async def run() -> tuple[str, int]:
        async with AsyncClient(relay.address, stack.policy, audit_log=NO_AUDIT) as client:
            pieces = [piece async for piece in client.stream(ASK, max_new_tokens=4)]
            return "".join(pieces), client.retry_count

    text, retries = asyncio.run(run())
    assert text and retries == 1
    ids = _stream_ids(relay)
    assert len(ids) == 2 and ids[0] != ids[1]


# --- one client, many concurrent calls ------------------------------------------------------


def test_threads_share_one_client_and_one_session(stack) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:

        def ask(i: int) -> str:
            if i % 2:
                return "".join(client.stream([("user", f"Count to {i}.")], max_new_tokens=4))
            return client.infer([("user", f"Count to {i}.")], max_new_tokens=4).text

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(ask, range(8)))
        assert all(answers)
        assert client.last_attempt is not None and client.reattest_count == 0
    # One handshake for all of them: the first call attested, the others waited for it.


def test_tasks_share_one_async_client_and_one_session(relay, stack) -> None:
    async def run() -> tuple[list[str], int]:
        async with AsyncClient(relay.address, stack.policy, audit_log=NO_AUDIT) as client:

            async def ask(i: int) -> str:
                if i % 2:
                    pieces = [
                        p async for p in client.stream([("user", f"Hi {i}")], max_new_tokens=3)
                    ]
                    return "".join(pieces)
                return (await client.infer([("user", f"Hi {i}")], max_new_tokens=3)).text

            answers = await asyncio.gather(*(ask(i) for i in range(4)))
            return list(answers), client.reattest_count

    answers, reattests = asyncio.run(run())
    assert all(answers) and reattests == 0
    assert len(relay.of("Attest")) == 1  # the tasks waited for the one handshake


def test_a_session_replaced_under_a_running_stream_keeps_its_keys_until_the_stream_ends(
    relay, stack
) -> None:
    # Another call's re-attestation replaces the session while a stream still reads frames
    # under the old keys: the old keys are wiped only after that stream ended.
    with _client(relay, stack) as client:
        stream = iter(client.stream(ASK, max_new_tokens=12))
        first = next(stream)
        old = client._session
        relay.plan["Infer"] = [EXPIRED]
        client.infer(ASK, max_new_tokens=2)  # re-attests: a new session
        assert client._session is not old and old is not None and old.retired
        rest = "".join(stream)  # still opens under the old session's keys
        assert first and rest is not None
        assert old.users == 0 and old.keys.c2s == bytearray(len(old.keys.c2s))  # wiped now


# --- the key-release suite -------------------------------------------------------------------

NO_SUITE = Fault(grpc.StatusCode.INVALID_ARGUMENT, "unsupported HPKE suite", "UNSUPPORTED_SUITE")


def _suite_of(request: bytes) -> int:
    return pb.AttestRequest.FromString(request).suite.kem_id


def test_the_hybrid_suite_is_the_default(relay, stack) -> None:
    from encloud.protocol.handshake import SUITE_XWING

    with _client(relay, stack) as client:
        client.infer(ASK, max_new_tokens=2)
        assert client.last_attempt is not None and client.last_attempt.suite == SUITE_XWING
        assert len(client.last_attempt.session_public_key) == 1216
    assert [_suite_of(r) for r in relay.of("Attest")] == [0x647A]


def test_a_server_without_the_hybrid_gets_the_next_suite_the_policy_lists(relay, stack) -> None:
    relay.plan["Attest"] = [NO_SUITE]
    with _client(relay, stack) as client:
        client.infer(ASK, max_new_tokens=2)
    assert [_suite_of(r) for r in relay.of("Attest")] == [0x647A, 0x0020]


def test_a_policy_that_requires_the_hybrid_never_falls_back(relay, stack) -> None:
    import dataclasses

    relay.plan["Attest"] = [NO_SUITE]
    hybrid_only = dataclasses.replace(stack.policy, hpke_suites=("mlkem768-x25519",))
    client = Client(relay.address, hybrid_only, audit_log=NO_AUDIT)
    with client, pytest.raises(ServiceError) as refused:
        client.attest()
    assert refused.value.reason == "UNSUPPORTED_SUITE"
    assert [_suite_of(r) for r in relay.of("Attest")] == [0x647A]


def _downgrade(request: bytes) -> bytes:
    message = pb.AttestRequest.FromString(request)
    message.suite.kem_id = 0x0020  # an on-path party asks for X25519 instead
    return message.SerializeToString()


@pytest.mark.attack
def test_attack_suite_downgrade_on_the_wire_is_refused(relay, stack) -> None:
    """The downgraded server answers with an X25519 key: its length gives it away first."""
    relay.rewrite["Attest"] = _downgrade
    with _client(relay, stack) as client, pytest.raises(MalformedAttestResponseError):
        client.attest()
    assert not relay.of("ReleaseKey")


@pytest.mark.attack
def test_attack_suite_downgrade_with_a_padded_key_is_refused_by_the_quote(relay, stack) -> None:
    """Padding the X25519 key to X-Wing's length passes the shape check; the quote's Q names
    the suite the server used, not the client's, so Q does not match."""
    from encloud.protocol.errors import NonceMismatchError

    relay.rewrite["Attest"] = _downgrade
    relay.rewrite_reply["Attest"] = lambda reply: _attest_reply_with(
        session_public_key=pb.AttestResponse.FromString(reply).session_public_key.ljust(1216, b"\0")
    )(reply)
    with _client(relay, stack) as client, pytest.raises(NonceMismatchError):
        client.attest()
    assert not relay.of("ReleaseKey")


def _attest_reply_with(**fields: object) -> Callable[[bytes], bytes]:
    def change(reply: bytes) -> bytes:
        message = pb.AttestResponse.FromString(reply)
        for name, value in fields.items():
            setattr(message, name, value)
        return message.SerializeToString()

    return change


@pytest.mark.parametrize(
    "fields",
    [
        {"session_id": b"\x01" * 70_000},  # too long to encode into Q
        {"session_id": b"\x01" * 15},
        {"session_public_key": b"\x02" * 7},
        {"ttl_seconds": 0},
    ],
    ids=["oversized-session-id", "short-session-id", "short-session-key", "zero-ttl"],
)
def test_attack_a_malformed_attest_response_is_a_typed_audited_failure(
    relay, stack, tmp_path, fields
) -> None:
    relay.rewrite_reply["Attest"] = _attest_reply_with(**fields)
    audit_path = tmp_path / "audit.jsonl"
    with (
        Client(relay.address, stack.policy, audit_log=audit_path) as client,
        pytest.raises(MalformedEvidenceError) as refused,
    ):
        client.attest()
    assert refused.value.check == "attest_response"
    entries = [json.loads(line) for line in audit_path.read_text().splitlines()]
    (entry,) = [e for e in entries if e.get("event") == "attestation"]
    assert entry["outcome"] == "fail" and entry["failed_check"] == "attest_response"
    assert not relay.of("ReleaseKey")


def test_attack_forged_session_expired_makes_one_reattestation_per_call(relay, stack) -> None:
    """A relay that answers every Infer with SESSION_EXPIRED gets one re-attestation per
    call, and the replaced session is ended, so no bound session piles up on the server."""
    relay.plan["Infer"] = [EXPIRED] * 40
    with _client(relay, stack) as client:
        for _ in range(3):
            with pytest.raises(ServiceError) as refused:
                client.infer(ASK, max_new_tokens=2)
            assert refused.value.reason == "SESSION_EXPIRED"
    assert len(relay.of("Infer")) == 6  # each call: the first try and one resend
    assert len(relay.of("Attest")) == 4  # the first session and one per call
    ends = {pb.EndSessionRequest.FromString(r).session_id for r in relay.of("EndSession")}
    assert len(ends) == 4  # every session was ended: three replaced, one at close


def test_end_session_under_the_callers_own_open_stream(stack) -> None:
    """The stream keeps its keys until it ends: it ends with a sealed `cancelled` final
    frame (the server's EndSession stops it), never an AttributeError; five rounds."""
    for _ in range(5):
        with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
            stream = client.stream(
                [("user", "Count from one to five hundred.")], max_new_tokens=400
            )
            pieces = iter(stream)
            assert next(pieces)
            ender = threading.Thread(target=client.end_session)
            ender.start()
            rest = []
            for piece in pieces:  # a slow reader
                rest.append(piece)
                time.sleep(0.01)
            ender.join(timeout=60)
            assert not ender.is_alive()
            assert stream.completion is not None
            assert stream.completion.finish_reason == "cancelled"
            assert client.session_id is None


def test_every_call_of_a_session_carries_its_replicas_routing_token(relay, stack) -> None:
    """The Attest reply's initial metadata names the replica (not the session); the client
    sends that token with ReleaseKey, Infer, StreamInfer and EndSession."""
    with _client(relay, stack) as client:
        client.attest()
        client.release_key()
        client.infer(ASK, max_new_tokens=2)
        "".join(client.stream(ASK, max_new_tokens=2))
        first = client.session_id
        client.end_session()
        client.infer(ASK, max_new_tokens=2)  # a second session, same replica
        assert client.session_id != first
    sent = [(method, md.get("encloud-route", "")) for method, md in relay.metadata]
    tokens = {token for method, token in sent if method != "Attest"}
    assert len(tokens) == 1 and len(tokens.pop()) == 32, sent
    assert [m for m, token in sent if not token] == ["Attest", "Attest"]
    assert first is not None and first.hex() not in str(sent)
