"""One caller cannot deny service to the others: per-peer quotas, peer identity, a fair share
of the engine, and an idle timer that only authenticated messages move.

The two-peer tests run a real server on a dual-stack listener: peer A dials [::1], peer B
dials 127.0.0.1 (gRPC Python cannot choose a client's source address).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from stack import Stack, running_stack
from waiting import metric, wait_for

from encloud.client import NO_AUDIT, Client, RetryPolicy, ServiceError
from encloud.client._status import service_error
from encloud.protocol.faults import ResourceExhaustedError
from encloud.protocol.handshake import SUITE_V1
from encloud.protocol.peers import peer_key, trusted_networks
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc
from encloud.server.inference.scheduler import _Request, admissible
from encloud.server.limits import MAX_TRACKED_PEERS, PeerRateLimiter
from encloud.server.sessions import SessionStore
from encloud.server.settings import Settings

NO_RETRY = RetryPolicy(max_retries=0, max_reattests=0)


# --- unit: who a peer is --------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:127.0.0.1:5555", "ipv4:127.0.0.1"),
        ("ipv6:[::1]:5555", "ipv6:::/64"),
        ("ipv6:%5B2001:db8:1:2:3:4:5:6%5D:443", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff::9]:443", "ipv6:2001:db8:1:2::/64"),  # one /64: one peer
        ("ipv6:[::ffff:10.1.2.3]:9", "ipv4:10.1.2.3"),
    ],
)
def test_a_peer_is_its_address_and_an_ipv6_peer_its_64(peer: str, key: str) -> None:
    assert peer_key(peer) == key


@pytest.mark.unit
def test_x_forwarded_for_counts_only_from_a_trusted_proxy() -> None:
    proxies = trusted_networks(["10.0.0.0/8"])
    forwarded = "192.0.2.1, 198.51.100.7"  # the proxy appended the last one
    assert peer_key("ipv4:10.1.1.1:80", forwarded, proxies) == "ipv4:198.51.100.7"
    assert peer_key("ipv4:203.0.113.5:80", forwarded, proxies) == "ipv4:203.0.113.5"
    assert peer_key("ipv4:10.1.1.1:80", "not an address", proxies) == "ipv4:10.1.1.1"


@pytest.mark.unit
def test_the_rate_limiter_forgets_the_oldest_peer_in_constant_time() -> None:
    now = [0.0]
    limiter = PeerRateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    for i in range(MAX_TRACKED_PEERS + 50):
        limiter.take(f"ipv4:10.0.{i // 256}.{i % 256}")
    assert len(limiter) == MAX_TRACKED_PEERS
    now[0] += 10.0  # every bucket refilled: a sweep forgets them all
    limiter.sweep()
    assert len(limiter) == 0


@pytest.mark.unit
def test_per_peer_quotas_leave_room_for_the_others() -> None:
    settings = Settings(max_pending_sessions_per_peer=2, max_sessions_per_peer=1)  # type: ignore[call-arg]
    store = SessionStore(settings)
    for _ in range(2):
        store.create(SUITE_V1, os.urandom(32), os.urandom(32), "ipv4:192.0.2.1")
    with pytest.raises(ResourceExhaustedError) as refused:
        store.create(SUITE_V1, os.urandom(32), os.urandom(32), "ipv4:192.0.2.1")
    assert refused.value.retry_after_seconds is not None
    store.create(SUITE_V1, os.urandom(32), os.urandom(32), "ipv4:192.0.2.2")  # another peer


def _waiting_request(peer: str, reserved: int = 2) -> _Request:
    return _Request(
        ids=np.zeros(reserved - 1, dtype=np.int64),
        max_new_tokens=1,
        stops=(),
        stop_ids=frozenset(),
        sampler=None,  # type: ignore[arg-type]
        should_stop=lambda: False,
        peer=peer,
    )


@pytest.mark.unit
def test_the_next_free_row_goes_to_the_peer_with_fewest_rows_running() -> None:
    waiting = [_waiting_request(p) for p in ("A", "A", "B", "A", "C")]
    # A holds three rows: the one free row goes to B (arrived after two of A's), then C.
    one_free = admissible(waiting, running_peers=["A"] * 3, free_rows=1, budget_left=10**6)
    assert [r.peer for r in one_free] == ["B"]
    two_free = admissible(waiting, running_peers=["A"] * 3, free_rows=2, budget_left=10**6)
    assert [r.peer for r in two_free] == ["B", "C"]
    # Nobody running: peers take turns, each in arrival order; nothing is held back.
    idle = admissible(waiting, running_peers=[], free_rows=8, budget_left=10**6)
    assert [r.peer for r in idle] == ["A", "B", "C", "A", "A"]
    # One caller alone may fill every row.
    alone = admissible(waiting[:2], running_peers=["A"] * 14, free_rows=2, budget_left=10**6)
    assert len(alone) == 2


@pytest.mark.unit
def test_a_request_over_the_kv_budget_waits_and_a_smaller_one_goes_first() -> None:
    big, small = _waiting_request("A", reserved=600), _waiting_request("B", reserved=100)
    chosen = admissible([big, small], running_peers=[], free_rows=8, budget_left=500)
    assert chosen == [small]
    assert admissible([big, small], running_peers=[], free_rows=8, budget_left=700) == [big, small]


# --- two real peers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server(model_dir: Path) -> Iterator[tuple[Stack, int]]:
    with (
        tempfile.TemporaryDirectory(prefix="encloud-fair-") as tmp,
        running_stack(
            Path(tmp),
            model_dir,
            host="::",
            max_pending_sessions_per_peer=8,
            max_sessions_per_peer=6,
            max_queued_requests_per_peer=4,
            max_streams_per_session=4,
            attest_rate_per_second=20.0,
            attest_burst=64,
        ) as stack,
    ):
        yield stack, int(stack.address.rsplit(":", 1)[1])


def _raw_attest(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.AttestRequest(
            nonce=os.urandom(32),
            suite=pb.HpkeSuite(kem_id=0x20, kdf_id=1, aead_id=2),
            client_commitment=os.urandom(32),
        )
        try:
            stub.Attest(request, timeout=30)
        except grpc.RpcError as error:
            refused = service_error(error)
            if refused.code == "RESOURCE_EXHAUSTED" and (refused.retry_after_seconds is None):
                return "NO_RETRY_INFO"  # every RESOURCE_EXHAUSTED must carry RetryInfo
            return refused.reason
    return "ok"


def _b_gets_through(stack: Stack, port: int) -> float:
    """Peer B: attest, release, stream; returns its time to first token (seconds)."""
    with Client(
        f"127.0.0.1:{port}", stack.policy, audit_log=NO_AUDIT, retry=NO_RETRY, timeout=20
    ) as b:
        b.attest()
        b.release_key()
        started = time.monotonic()
        stream = iter(b.stream([("user", "Say hi.")], max_new_tokens=4))
        next(stream)
        ttft = time.monotonic() - started
        list(stream)
    return ttft


@pytest.mark.faults
def test_one_peer_holds_its_quotas_and_the_other_still_gets_through(shared_server) -> None:
    stack, port = shared_server
    a_target = f"[::1]:{port}"
    held: list[Client] = []
    outcomes: Counter[str] = Counter()
    try:
        for _ in range(10):  # A binds as many sessions as it can
            client = Client(a_target, stack.policy, audit_log=NO_AUDIT, retry=NO_RETRY)
            try:
                client.attest()
                client.release_key()
                held.append(client)
            except ServiceError as error:
                outcomes[error.reason] += 1
                assert error.retry_after_seconds is not None  # every RESOURCE_EXHAUSTED: RetryInfo
                client.close()
        assert len(held) == 6  # exactly its bound-session quota
        assert outcomes == Counter({"RESOURCE_EXHAUSTED": 4})

        burst: list[str] = []
        threads = [
            threading.Thread(target=lambda: burst.append(_raw_attest(a_target))) for _ in range(200)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tally = Counter(burst)
        # The binds refused above left their sessions pending: with the burst's, exactly the
        # pending quota; every other Attest refused.
        assert tally["ok"] + outcomes["RESOURCE_EXHAUSTED"] == 8, (tally, outcomes)
        assert set(tally) <= {"ok", "RESOURCE_EXHAUSTED", "RATE_LIMITED"}, tally

        for _ in range(3):  # B, meanwhile, every time
            _b_gets_through(stack, port)
    finally:
        for client in held:
            client.close()


@pytest.mark.faults
def test_a_flooding_peer_leaves_the_other_a_share_of_the_engine(shared_server) -> None:
    """A keeps its generation quota full of long answers and attests at half the allowed rate
    (for 45 s once its quota is full); B still attests, binds and gets its first token every
    time, sooner than one of A's answers. Figures are printed, not asserted beyond that."""
    stack, port = shared_server
    a_target = f"[::1]:{port}"
    # A runs until this moment: first until its share is full, then 45 s more.
    until = {"at": time.monotonic() + 120.0}
    a_streams: list[float] = []
    a_errors: Counter[str] = Counter()

    def a_generates() -> None:
        with Client(a_target, stack.policy, audit_log=NO_AUDIT, retry=NO_RETRY) as a:
            while time.monotonic() < until["at"]:
                try:
                    started = time.monotonic()
                    list(a.stream([("user", "Count from one to two hundred.")], max_new_tokens=320))
                    a_streams.append(time.monotonic() - started)
                except ServiceError as error:
                    a_errors[error.reason] += 1
                    if error.retry_after_seconds is None:
                        a_errors["no RetryInfo"] += 1
                    time.sleep(0.05)

    def a_attests() -> None:
        while time.monotonic() < until["at"]:
            _raw_attest(a_target)
            time.sleep(0.1)  # 10/s: half the allowed 20/s

    def a_share_full() -> bool:
        # A's generation quota (max_queued_requests_per_peer=4) running or waiting. The
        # pending sessions the test before left may hold A's new sessions back for a while.
        metrics = stack.server.metrics_address
        busy = metric(metrics, "encloud_running_generations") + metric(
            metrics, "encloud_queue_depth"
        )
        return busy >= 4

    workers = [threading.Thread(target=a_generates) for _ in range(6)]
    workers.append(threading.Thread(target=a_attests))
    for worker in workers:
        worker.start()
    b_ttfts: list[float] = []
    try:
        wait_for(a_share_full, "A filling its share", seconds=90)
        until["at"] = time.monotonic() + 45.0
        while time.monotonic() < until["at"] - 5:
            b_ttfts.append(_b_gets_through(stack, port))
            time.sleep(2.0)
    finally:
        until["at"] = 0.0
        for worker in workers:
            worker.join()
    assert a_streams and b_ttfts
    assert a_errors["SERVER_BUSY"] > 0  # A asked for more than its share and was refused
    assert a_errors["no RetryInfo"] == 0
    a_median = statistics.median(a_streams)
    print(
        f"\nflood: A {len(a_streams)} answers of up to 320 tokens, median {a_median:.2f} s, "
        f"refusals {dict(a_errors)}; B first token "
        f"median {statistics.median(b_ttfts) * 1000:.0f} ms, max {max(b_ttfts) * 1000:.0f} ms "
        f"over {len(b_ttfts)} tries"
    )
    # B got through every time, typically faster than one of A's answers takes, and never as
    # long as A's longest (with cohorts, B could wait a whole answer). Which row B's request
    # takes is decided by the scheduler: tested without timing in
    # test_the_next_free_row_goes_to_the_peer_with_fewest_rows_running.
    assert statistics.median(b_ttfts) < a_median
    assert max(b_ttfts) < max(a_streams)


@pytest.mark.faults
def test_a_forged_message_does_not_keep_a_session_alive(model_dir: Path, tmp_path: Path) -> None:
    with (
        running_stack(tmp_path, model_dir, session_idle_ttl_seconds=2.0) as stack,
        Client(
            stack.address, stack.policy, audit_log=NO_AUDIT, auto_reattest=False, retry=NO_RETRY
        ) as client,
    ):
        client.attest()
        client.release_key()
        client.infer([("user", "Hi")], max_new_tokens=2)
        session_id = client.session_id
        assert session_id is not None
        forged = pb.InferRequest(
            session_id=session_id,
            request=pb.SealedMessage(
                type=pb.MESSAGE_TYPE_REQUEST, request_id=999, sealed=os.urandom(64)
            ),
        )
        with grpc.insecure_channel(stack.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:  # someone who saw the id keeps poking
                with pytest.raises(grpc.RpcError):
                    stub.Infer(forged, timeout=5)
                time.sleep(0.4)
        with pytest.raises(ServiceError) as expired:
            client.infer([("user", "Hi")], max_new_tokens=2)
        assert expired.value.reason == "SESSION_EXPIRED"
