"""Three replicas behind a real HAProxy on loopback, configured by the file we ship
(deploy/haproxy/encloud.cfg): sessions stay on the replica that attested them, a replica
killed mid-run costs its in-flight streams a typed error and its clients one re-attestation,
a restarted replica serves again from its persisted event log, and two client addresses get
two quotas through the proxy.

Each replica has its own swtpm; the test policy pins all three AKs (the boot PCRs of three
fresh simulators are equal, and the replica name is not measured).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack import ONE_PEER_IS_EVERYONE, free_port
from waiting import wait_for

from encloud.client import NO_AUDIT, Client, RetryPolicy
from encloud.protocol.encoding import sha256
from encloud.protocol.errors import EncloudError, ServiceError
from encloud.protocol.policy import Policy, parse_policy
from encloud.server.devstack import ServerProcess, start_swtpm

pytestmark = pytest.mark.cluster

CONFIG = Path(__file__).parent.parent / "deploy" / "haproxy" / "encloud.cfg"
LONG = [("user", "Write a long story about a lighthouse keeper and a storm.")]
SHORT = [("user", "Say hello.")]
REPLICA_SETTINGS = {
    **ONE_PEER_IS_EVERYONE,
    "trusted_proxies": '["127.0.0.1"]',
    # Per-peer Attest rate, low enough for the quota test to run a peer dry.
    "attest_burst": 40,
    "attest_rate_per_second": 0.2,
}


@dataclass
class Replica:
    name: str
    workdir: Path
    swtpm: object
    server: ServerProcess
    fingerprint: str = ""

    def start(self, model_dir: Path) -> None:
        self.server = ServerProcess(
            self.workdir,
            self.swtpm.tcti,  # type: ignore[attr-defined]
            model_dir,
            replica_name=self.name,
            **REPLICA_SETTINGS,
        )
        self.server.start()

    def calls(self, method: str) -> int:
        """How many `method` calls this replica's access log shows."""
        count = 0
        for line in self.server.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                count += entry.get("logger") == "encloud.access" and entry["method"] == method
        return count


@dataclass
class Cluster:
    replicas: list[Replica]
    policy: Policy
    address: str
    address6: str
    haproxy: subprocess.Popen[bytes]
    model_dir: Path
    by_fingerprint: dict[str, Replica] = field(default_factory=dict)


def _policy_for_all(replicas: list[Replica]) -> Policy:
    """The first replica's dev policy with every replica's AK pinned."""
    obj = json.loads(replicas[0].server.policy_path.read_text())
    keys = set()
    for replica in replicas:
        own = json.loads(replica.server.policy_path.read_text())
        keys.update(own["ak"]["pinned_public_keys"])
        replica.fingerprint = sha256(base64.b64decode(own["ak"]["pinned_public_keys"][0])).hex()
        # The same measured software everywhere: the same boot PCRs, model and runtime.
        assert own["allowed_runtime_events"] == obj["allowed_runtime_events"]
        assert own["pcr_values"] == obj["pcr_values"]
    obj["ak"]["pinned_public_keys"] = sorted(keys)
    return parse_policy(json.dumps(obj).encode())


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    haproxy_binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy_binary).exists(), "haproxy is not installed (./dev installs it)"
    root = tmp_path_factory.mktemp("cluster")
    replicas: list[Replica] = []
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for n in (1, 2, 3):
            workdir = root / f"r{n}"
            workdir.mkdir()
            swtpm = start_swtpm(workdir / "swtpm")
            replica = Replica(f"r{n}", workdir, swtpm, None)  # type: ignore[arg-type]
            replicas.append(replica)
            replica.start(model_dir)
        port = free_port()
        env = {
            **os.environ,
            "ENCLOUD_LB_BIND": f"127.0.0.1:{port}",
            "ENCLOUD_LB_BIND6": f"[::1]:{port}",
            **{f"ENCLOUD_REPLICA_{n}": r.server.address for n, r in enumerate(replicas, 1)},
        }
        log = (root / "haproxy.log").open("wb")
        haproxy = subprocess.Popen(
            [haproxy_binary, "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=log
        )
        address = f"127.0.0.1:{port}"
        wait_for(lambda: _serving(address), "HAProxy forwarding to a serving replica")
        cluster = Cluster(
            replicas, _policy_for_all(replicas), address, f"[::1]:{port}", haproxy, model_dir
        )
        cluster.by_fingerprint = {r.fingerprint: r for r in replicas}
        yield cluster
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=30)
        for replica in replicas:
            if replica.server is not None:
                replica.server.kill()
            replica.swtpm.stop()  # type: ignore[attr-defined]


def _client(cluster: Cluster, address: str | None = None, **kwargs: object) -> Client:
    return Client(address or cluster.address, cluster.policy, audit_log=NO_AUDIT, **kwargs)  # type: ignore[arg-type]


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stream(self, client: Client, messages: list, max_new_tokens: int) -> None:
        """One streamed request: counted as sent, then as ok or as its typed error."""
        with self.lock:
            self.sent += 1
        started = time.monotonic()
        first = None
        try:
            for _piece in client.stream(messages, max_new_tokens=max_new_tokens):
                if first is None:
                    first = time.monotonic() - started
        except EncloudError as error:
            with self.lock:
                self.failed[getattr(error, "code", type(error).__name__)] += 1
            return
        with self.lock:
            self.ok += 1
            if first is not None:
                self.ttft.append(first)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def test_sessions_stay_on_their_replica_survive_a_kill_and_a_restart(cluster: Cluster) -> None:
    clients = [_client(cluster) for _ in range(6)]
    homes: list[Replica] = []
    for client in clients:
        client.attest()
        client.release_key()
        assert client.attestation is not None
        homes.append(cluster.by_fingerprint[client.attestation.ak_fingerprint])
    assert len({r.name for r in homes}) == 3  # round robin spread the sessions

    # Every call of a session reaches the replica that attested it: each replica's access
    # log counts exactly the calls of its own clients.
    before = {r.name: r.calls("StreamInfer") for r in cluster.replicas}
    tally = Tally()
    threads = [
        threading.Thread(target=lambda c=c: [tally.stream(c, SHORT, 8) for _ in range(3)])
        for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tally.ok == tally.sent == 18 and not tally.failed
    for replica in cluster.replicas:
        mine = 3 * sum(1 for home in homes if home is replica)
        assert replica.calls("StreamInfer") - before[replica.name] == mine, replica.name
    ttft_before = list(tally.ttft)

    # Kill one replica while every client streams a long answer.
    victim = homes[0]
    victims = [c for c, home in zip(clients, homes, strict=True) if home is victim]
    during = Tally()
    first_pieces = threading.Barrier(len(clients) + 1)

    def long_then_more(client: Client) -> None:
        with during.lock:
            during.sent += 1
        try:
            stream = client.stream(LONG, max_new_tokens=400)
            pieces = iter(stream)
            next(pieces)
            first_pieces.wait(timeout=120)
            for _ in pieces:
                pass
            with during.lock:
                during.ok += 1
        except EncloudError as error:
            with during.lock:
                during.failed[getattr(error, "code", type(error).__name__)] += 1
        except threading.BrokenBarrierError:
            pass

    streams = [threading.Thread(target=long_then_more, args=(c,)) for c in clients]
    for t in streams:
        t.start()
    first_pieces.wait(timeout=120)
    victim.server.kill()
    for t in streams:
        t.join(timeout=300)
    # Its in-flight streams ended with a typed error; the others finished.
    assert during.sent == during.ok + sum(during.failed.values())
    assert sum(during.failed.values()) == len(victims), during.failed
    assert set(during.failed) == {"TruncatedStreamError"}, during.failed

    # Later calls: the victim's clients attest again (to a live replica) and succeed.
    after = Tally()
    reattests_before = sum(c.reattest_count for c in clients)
    threads = [
        threading.Thread(target=lambda c=c: [after.stream(c, SHORT, 8) for _ in range(2)])
        for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reattests = sum(c.reattest_count for c in clients) - reattests_before
    assert after.ok == after.sent == 12, after.failed
    assert reattests == len(victims)
    for client in victims:
        assert client.attestation is not None
        assert cluster.by_fingerprint[client.attestation.ak_fingerprint] is not victim

    # Restart the victim on the same swtpm and state folder: it serves again, its event
    # log holding both start-ups, under the same policy.
    victim.start(cluster.model_dir)
    with _client(cluster, victim.server.address) as direct:
        assert direct.infer(SHORT, max_new_tokens=4).text
        assert direct.attestation is not None
        assert len(direct.attestation.events) == 4  # two start-ups of [model, runtime]

    print(
        f"\ncluster: {tally.sent + during.sent + after.sent} requests; "
        f"ok {tally.ok + during.ok + after.ok}; errors {dict(during.failed + after.failed)}; "
        f"TTFT before the kill p50 {_pct(ttft_before, 0.5):.0f} ms p99 "
        f"{_pct(ttft_before, 0.99):.0f} ms; after p50 {_pct(after.ttft, 0.5):.0f} ms p99 "
        f"{_pct(after.ttft, 0.99):.0f} ms; re-attestations {reattests}; "
        f"median TTFT ratio {statistics.median(after.ttft) / statistics.median(ttft_before):.2f}"
    )
    for client in clients:
        client.close()


def test_two_client_addresses_get_two_quotas_through_the_proxy(cluster: Cluster) -> None:
    """The replicas see each client's address (x-forwarded-for from the trusted proxy):
    one address running its Attest rate dry leaves the other's untouched."""
    no_retry = RetryPolicy(max_retries=0, max_reattests=0)
    refused = None
    with _client(cluster, retry=no_retry, auto_reattest=False) as greedy:
        for _ in range(200):  # 3 replicas x a burst of 40 at most
            try:
                greedy.attest()
            except ServiceError as error:
                refused = error
                break
    assert refused is not None and refused.reason == "RATE_LIMITED", refused
    with _client(cluster, cluster.address6, retry=no_retry) as other:
        for _ in range(3):  # whichever replica it reaches, its own bucket is full
            other.attest()
