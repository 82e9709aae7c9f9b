"""Sessions: wipe on end, expiry, fault and shutdown leaves no reference to key objects;
quotas, idle TTL and the client's own re-attestation through a real server."""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import Stack, running_stack
from waiting import sessions_expired, wait_for

from encloud.client import NO_AUDIT, Client, RetryPolicy
from encloud.protocol.envelope import MessageType, OpeningKey, Sealed
from encloud.protocol.errors import ServiceError
from encloud.protocol.faults import (
    DomainError,
    KeyReleaseError,
    ResourceExhaustedError,
    SessionNotFoundError,
)
from encloud.protocol.handshake import (
    SUITE_V1,
    client_commitment,
    new_dek,
    release_info,
    seal_key,
)
from encloud.server.limits import PeerRateLimiter, RateLimitedError
from encloud.server.sessions import SessionState, SessionStore
from encloud.server.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, **overrides: object) -> SessionStore:
    return SessionStore(Settings(**overrides), clock=clock)  # type: ignore[arg-type]


def _bound(store: SessionStore):  # type: ignore[no-untyped-def]
    secret = os.urandom(32)
    session = store.create(SUITE_V1, os.urandom(32), client_commitment(secret))
    session.attest_digest = os.urandom(32)  # H_ev: the TPM is not what this test is about
    info = release_info(SUITE_V1, session.session_id, session.attest_digest)
    sealed = seal_key(SUITE_V1, session.public_key, new_dek(), os.urandom(32), secret, info)
    store.admit_bound(session)
    session.bind(sealed)
    return session


def _references(holder: list[object], index: int) -> int:
    """References to holder[index] beyond the test's list (and getrefcount's argument).

    sys.getrefcount sees every reference, also from containers that the cyclic
    GC does not track (gc.get_referrers would miss those).
    """
    gc.collect()
    return sys.getrefcount(holder[index]) - 2


@pytest.mark.unit
@pytest.mark.parametrize("cause", ["end", "expiry", "idle", "fault", "shutdown"])
def test_no_reference_to_key_objects_survives(cause: str) -> None:
    clock = Clock()
    store = _store(clock, session_idle_ttl_seconds=60)
    session = _bound(store)
    c2s, s2c = session._c2s, session._s2c
    assert c2s is not None and s2c is not None
    c2s_ref, s2c_ref = weakref.ref(c2s), weakref.ref(s2c)
    key_bytes = [c2s._key, s2c._key]
    aeads = [c2s._aead, s2c._aead]
    assert all(any(k) for k in key_bytes)
    del c2s, s2c

    if cause == "end":
        store.drop(session)
    elif cause == "expiry":
        clock.now += session.ttl_seconds
        store.sweep()
    elif cause == "idle":
        clock.now += 61
        with pytest.raises(SessionNotFoundError):
            store.get(session.session_id)
    elif cause == "fault":
        store.drop(session, "fault")
    else:
        store.drop_all()

    assert session.state is SessionState.ENDED
    assert len(store) == 0
    gc.collect()
    assert c2s_ref() is None and s2c_ref() is None
    assert all(key == bytearray(len(key)) for key in key_bytes)  # overwritten
    for index in range(2):
        assert _references(key_bytes, index) == 0
        assert _references(aeads, index) == 0
    assert session._private_key is None
    # Positive control: the same count sees a reference kept on purpose.
    keeper = {"kept": key_bytes[0]}
    assert _references(key_bytes, 0) == 1
    del keeper


@pytest.mark.unit
def test_refused_releases_leave_a_pending_session_as_it_was() -> None:
    # Garbage and keys sealed with another client's secret: refused, the session still
    # pending with its private key, until its own client binds it.
    secret = os.urandom(32)
    session = _store(Clock()).create(SUITE_V1, os.urandom(32), client_commitment(secret))
    session.attest_digest = os.urandom(32)
    info = release_info(SUITE_V1, session.session_id, session.attest_digest)
    others = [
        os.urandom(128),
        seal_key(SUITE_V1, session.public_key, new_dek(), os.urandom(32), os.urandom(32), info),
    ]
    for sealed in others * 3:
        with pytest.raises(KeyReleaseError):
            session.bind(sealed)
        assert session.state is SessionState.PENDING and session._private_key is not None
    held: list[object] = [session._private_key]
    session.bind(seal_key(SUITE_V1, session.public_key, new_dek(), os.urandom(32), secret, info))
    assert session.state is SessionState.BOUND and session._private_key is None
    assert _references(held, 0) == 0


@pytest.mark.unit
def test_quotas_and_rate_limit() -> None:
    clock = Clock()
    store = _store(clock, max_pending_sessions=2, max_sessions=1, pending_session_ttl_seconds=5)
    store.create(SUITE_V1, os.urandom(32), os.urandom(32))
    store.create(SUITE_V1, os.urandom(32), os.urandom(32))
    with pytest.raises(ResourceExhaustedError):
        store.create(SUITE_V1, os.urandom(32), os.urandom(32))
    clock.now += 5  # pending sessions have their own short TTL
    _bound(store)
    with pytest.raises(ResourceExhaustedError):
        _bound(store)

    limiter = PeerRateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.take("ipv4:10.0.0.1")
    with pytest.raises(RateLimitedError) as limited:
        limiter.take("ipv4:10.0.0.1")
    assert limited.value.retry_after_seconds is not None
    limiter.take("ipv4:10.0.0.2")  # another peer has its own bucket
    clock.now += 0.5
    limiter.take("ipv4:10.0.0.1")


@pytest.fixture(scope="module")
def idle_server(model_dir: Path) -> Iterator[Stack]:
    with (
        tempfile.TemporaryDirectory(prefix="encloud-idle-") as tmp,
        running_stack(
            Path(tmp), model_dir, session_idle_ttl_seconds=1.5, session_sweep_interval_seconds=0.2
        ) as stack,
    ):
        yield stack


@pytest.fixture(scope="module")
def quota_server(model_dir: Path) -> Iterator[Stack]:
    with (
        tempfile.TemporaryDirectory(prefix="encloud-quota-") as tmp,
        running_stack(
            Path(tmp), model_dir, max_sessions=2, attest_burst=3, attest_rate_per_second=0.5
        ) as stack,
    ):
        yield stack


@pytest.mark.e2e
def test_idle_session_is_dropped_and_the_client_reattests(idle_server: Stack) -> None:
    metrics = idle_server.server.metrics_address
    told: list[object] = []
    with Client(
        idle_server.address, idle_server.policy, on_reattest=told.append, audit_log=NO_AUDIT
    ) as client:
        client.attest()
        client.release_key()
        first = client._session.session_id  # type: ignore[union-attr]
        assert client.infer([("user", "Say hi.")], max_new_tokens=4).text
        for round_ in (1, 2):
            # Past the idle TTL the server's sweep wipes the session (its metrics say so).
            expired = sessions_expired(metrics)
            wait_for(lambda e=expired: sessions_expired(metrics) > e, "the idle session's wipe")
            if round_ == 1:
                assert client.infer([("user", "Say hi.")], max_new_tokens=4).text
                assert client.reattest_count == 1 and len(told) == 1
                assert client._session.session_id != first  # type: ignore[union-attr]
            else:
                assert "".join(client.stream([("user", "Say hi.")], max_new_tokens=4))
                assert client.reattest_count == 2


@pytest.mark.e2e
def test_max_sessions_and_attest_rate_are_resource_exhausted(quota_server: Stack) -> None:
    # No retries: this test looks at the server's own refusals.
    clients = [
        Client(
            quota_server.address,
            quota_server.policy,
            audit_log=NO_AUDIT,
            auto_reattest=False,
            retry=RetryPolicy(max_retries=0, max_reattests=0),
        )
        for _ in range(3)
    ]
    try:
        clients[0].attest()
        clients[0].release_key()
        clients[1].attest()
        clients[1].release_key()
        with pytest.raises(ServiceError) as full:
            clients[2].attest()
            clients[2].release_key()
        assert full.value.code == "RESOURCE_EXHAUSTED"
        refused = None
        for _ in range(10):  # the per-peer bucket (burst 3, 0.5/s) runs dry
            try:
                clients[2].attest()
            except ServiceError as error:
                refused = error
                break
        assert refused is not None
        assert refused.code == "RESOURCE_EXHAUSTED" and refused.reason == "RATE_LIMITED"
    finally:
        for client in clients:
            client.close()


@pytest.mark.unit
@pytest.mark.parametrize(
    "case",
    json.loads((Path(__file__).parent / "vectors" / "envelope.json").read_text())["server_receive"],
    ids=lambda c: c["name"],
)
def test_server_receive_rules(case: dict) -> None:
    vectors = json.loads((Path(__file__).parent / "vectors" / "envelope.json").read_text())
    session_id = bytes.fromhex(vectors["session_id"])
    session = _bound(_store(Clock()))
    session.session_id = session_id
    session._c2s = OpeningKey(bytearray.fromhex(vectors["keys"]["c2s"]), session_id)
    for step in case["steps"]:
        m = step["message"]
        sealed = Sealed(m["type"], int(m["request_id"]), m["seq"], bytes.fromhex(m["sealed"]))
        try:
            if sealed.type == MessageType.END:
                session.open_end(sealed)
                outcome = "ended"
            else:
                session.open_from_client(sealed, MessageType.REQUEST)
                outcome = "accepted"
        except DomainError as error:
            outcome = error.reason
        assert outcome == step["expect"], step
