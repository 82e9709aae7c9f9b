"""Sentinel, the key broker, end to end (docs/SENTINEL.md): a real Sentinel on loopback
(owner API over mutual TLS, workload API), on SQLite and on PostgreSQL, and a workload that
quotes with a real swtpm. Each attack is one test expecting its typed error and its audit
entry."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pki import issue_certificate
from postgres import PgCluster, pg_cluster  # noqa: F401  (the session fixture)
from sentinel_support import MODEL, Workload, attested_workload

from encloud.broker.app import RunningSentinel, build, init_state, start
from encloud.broker.kek import KekError
from encloud.broker.settings import SentinelSettings
from encloud.broker.store import Store, migrate
from encloud.client.sentinel import OwnerClient, ReleasedKeys, WorkloadClient
from encloud.protocol import errors, release_order
from encloud.protocol.audit import verify_log
from encloud.protocol.evidence import Evidence
from encloud.protocol.faults import OrderUsedFault
from encloud.protocol.handshake import SUITE_V1, quote_qualifying_data
from encloud.protocol.sealed_file import (
    SealedFileDecryptError,
    SealedFileKeyIdError,
    read_key_file,
    seal_stream,
)
from encloud.protocol.sentinel.v1 import sentinel_pb2 as pb
from encloud.protocol.sentinel.v1 import sentinel_pb2_grpc as pb_grpc

pytestmark = pytest.mark.broker

OTHER_MODEL = bytes.fromhex("22" * 32)
SECRET_TEXT = b"quarterly figures: confidential\n" * 64


# --- PKI: a CA, Sentinel's certificate, two owners and a stranger --------------------------


@dataclass
class Pki:
    folder: Path
    ca: bytes
    ca_key: bytes
    certs: dict[str, tuple[bytes, bytes]]

    def path(self, name: str) -> Path:
        return self.folder / name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = issue_certificate("sentinel test CA", None, ca=True)
    certs = {
        name: issue_certificate(name, (ca_cert, ca_key), server=name == "sentinel")
        for name in ("sentinel", "alice", "bob", "stranger")
    }
    (folder / "ca.pem").write_bytes(ca_cert)
    for name, (cert, key) in certs.items():
        (folder / f"{name}.pem").write_bytes(cert)
        (folder / f"{name}.key").write_bytes(key)
    return Pki(folder, ca_cert, ca_key, certs)


def _spki_sha256(cert_pem: bytes) -> str:
    from encloud.broker.servicer import certificate_spki_sha256

    return certificate_spki_sha256(cert_pem)


# --- the workload: a vTPM that measured a model and a runtime ------------------------------


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    yield from attested_workload(tmp_path_factory.mktemp("workload"), MODEL)


@pytest.fixture(scope="module")
def other_workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    """The same software on another vTPM: another AK."""
    yield from attested_workload(tmp_path_factory.mktemp("other-workload"), MODEL)


def _policy_allowing(policy: bytes, *models: bytes) -> bytes:
    obj = json.loads(policy)
    obj["allowed_model_digests"] = [m.hex() for m in models]
    return json.dumps(obj, sort_keys=True).encode()


# --- Sentinel on each database --------------------------------------------------------------


@dataclass
class Broker:
    settings: SentinelSettings
    pki: Pki
    running: RunningSentinel
    database: str
    pg: PgCluster | None

    @property
    def owner_target(self) -> str:
        return f"127.0.0.1:{self.running.owner_port}"

    @property
    def workload_target(self) -> str:
        return f"127.0.0.1:{self.running.workload_port}"

    def owner(self, name: str) -> OwnerClient:
        cert, key = self.pki.certs[name]
        return OwnerClient(self.owner_target, ca_pem=self.pki.ca, cert_pem=cert, key_pem=key)

    def workload_client(self) -> WorkloadClient:
        return WorkloadClient(self.workload_target, ca_pem=self.pki.ca)

    def restart(self) -> None:
        self.running.stop()
        self.running = start(self._fixed_ports())

    def _fixed_ports(self) -> SentinelSettings:
        return self.settings.model_copy(
            update={
                "owner_listen": self.owner_target,
                "workload_listen": self.workload_target,
            }
        )

    def audit_entries(self) -> list[dict[str, Any]]:
        self.running.sentinel.audit.flush()
        lines = self.settings.resolved_audit_log().read_bytes().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def broker(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    state = tmp_path_factory.mktemp(f"sentinel-{request.param}")
    pg: PgCluster | None = None
    url = None
    if request.param == "postgresql":
        pg = request.getfixturevalue("pg_cluster")
        url = pg.url
    settings = SentinelSettings(
        state_dir=state,
        database_url=url,
        owner_listen="127.0.0.1:0",
        workload_listen="127.0.0.1:0",
        tls_cert=pki.path("sentinel.pem"),
        tls_key=pki.path("sentinel.key"),
        client_ca=pki.path("ca.pem"),
        accept_dev_policies=True,  # the swtpm workload's own policy (dev_only)
    )
    init_state(settings)
    store = Store(_engine(settings))
    for name in ("alice", "bob"):
        store.add_owner(name, _spki_sha256(pki.certs[name][0]))
    store.engine.dispose()
    running = start(settings)
    broker = Broker(settings, pki, running, request.param, pg)
    try:
        yield broker
    finally:
        broker.running.stop()


def _engine(settings: SentinelSettings) -> Any:
    from encloud.broker.store import make_engine

    return make_engine(settings.resolved_database_url())


@dataclass
class Owner:
    name: str
    signing: Ed25519PrivateKey


_counter = iter(range(10_000))


@pytest.fixture(scope="module")
def alice(broker: Broker) -> Owner:
    signing = Ed25519PrivateKey.generate()
    with broker.owner("alice") as client:
        client.add_signing_key(signing.public_key().public_bytes_raw())
    return Owner("alice", signing)


@pytest.fixture(scope="module")
def bob(broker: Broker) -> Owner:
    signing = Ed25519PrivateKey.generate()
    with broker.owner("bob") as client:
        client.add_signing_key(signing.public_key().public_bytes_raw())
    return Owner("bob", signing)


def _new_key(broker: Broker, owner: Owner, workload: Workload, *models: bytes) -> tuple[str, bytes]:
    """A fresh key registered by `owner` with the workload's policy: (key id, key)."""
    key_id = f"{owner.name}/data-{next(_counter)}"
    key = os.urandom(32)
    policy = _policy_allowing(workload.policy, *(models or (MODEL,)))
    with broker.owner(owner.name) as client:
        info = client.create_key(key_id, policy, key)
    assert info.key_id == key_id and info.state == "active" and info.versions == (1,)
    return key_id, key


def _order(
    owner: Owner, key_id: str, model: bytes = MODEL, ttl: int = 300, now: float | None = None
) -> bytes:
    return release_order.sign_order(
        release_order.new_order(key_id, model, ttl, now=now), owner.signing
    )


def _seal(key: bytes, key_id: str, data: bytes = SECRET_TEXT) -> bytes:
    sink = io.BytesIO()
    seal_stream(io.BytesIO(data), sink, key, key_id)
    return sink.getvalue()


def _open(sealed: bytes, released: ReleasedKeys) -> bytes:
    sink = io.BytesIO()
    released.open_sealed(io.BytesIO(sealed), sink)
    return sink.getvalue()


def _refusal_audited(broker: Broker, reason: str, **facts: Any) -> dict[str, Any]:
    entries = [
        e
        for e in broker.audit_entries()
        if e.get("outcome") == "refused"
        and e.get("reason") == reason
        and all(e.get(k) == v for k, v in facts.items())
    ]
    assert entries, f"no refused audit entry with reason {reason} and {facts}"
    return entries[-1]


# --- the flow ---------------------------------------------------------------------------


def test_an_owner_seals_registers_and_an_attested_workload_opens(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    key_id, key = _new_key(broker, alice, workload)
    sealed = _seal(key, key_id)
    order = _order(alice, key_id)
    with broker.workload_client() as client:
        released = client.release_key(order, workload.quote)
    assert released.key_id == key_id and [v for v, _ in released.versions] == [1]
    assert _open(sealed, released) == SECRET_TEXT
    order_id = release_order.parse_order(order)[0].order_id.hex()
    entry = next(e for e in broker.audit_entries() if e.get("order_id") == order_id)
    assert entry["outcome"] == "released" and entry["owner"] == "alice"
    assert entry["key_id"] == key_id and entry["key_versions"] == [1]


def test_the_x25519_suite_also_releases(broker: Broker, alice: Owner, workload: Workload) -> None:
    key_id, key = _new_key(broker, alice, workload)
    with broker.workload_client() as client:
        released = client.release_key(_order(alice, key_id), workload.quote, suite=SUITE_V1)
    assert released.newest() == key


def test_a_rotated_key_releases_every_version_and_old_files_still_open(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    key_id, key = _new_key(broker, alice, workload)
    old_file = _seal(key, key_id, b"sealed before the rotation")
    new_key = os.urandom(32)
    with broker.owner("alice") as client:
        info = client.rotate_key(key_id, new_key)
    assert info.versions == (1, 2)
    new_file = _seal(new_key, key_id, b"sealed after it")
    with broker.workload_client() as client:
        released = client.release_key(_order(alice, key_id), workload.quote)
    assert [v for v, _ in released.versions] == [2, 1] and released.newest() == new_key
    assert _open(old_file, released) == b"sealed before the rotation"
    assert _open(new_file, released) == b"sealed after it"


def test_an_owner_lists_only_its_own_keys_and_reads_only_its_own_audit_entries(
    broker: Broker, alice: Owner, bob: Owner, workload: Workload
) -> None:
    alice_key, _ = _new_key(broker, alice, workload)
    bob_key, _ = _new_key(broker, bob, workload)
    with broker.owner("bob") as client:
        listed = {k.key_id for k in client.list_keys()}
        audit = client.read_audit()
    assert bob_key in listed and not any(k.startswith("alice/") for k in listed)
    assert audit and all(e["owner"] == "bob" for e in audit)
    assert not any(e.get("key_id") == alice_key for e in audit)


# --- attacks on the release -------------------------------------------------------------


@pytest.mark.attack
def test_an_order_not_signed_by_the_keys_owner_is_refused(
    broker: Broker, alice: Owner, bob: Owner, workload: Workload
) -> None:
    key_id, _ = _new_key(broker, alice, workload)
    forged = _order(bob, key_id)  # bob's own registered key, on alice's key id
    with broker.workload_client() as client, pytest.raises(errors.OrderSignatureError):
        client.release_key(forged, workload.quote)
    _refusal_audited(broker, "ORDER_SIGNATURE", key_id=key_id)


@pytest.mark.attack
def test_an_expired_order_is_refused(broker: Broker, alice: Owner, workload: Workload) -> None:
    key_id, _ = _new_key(broker, alice, workload)
    expired = _order(alice, key_id, ttl=10, now=time.time() - 60)
    with broker.workload_client() as client, pytest.raises(errors.OrderExpiredError):
        client.release_key(expired, workload.quote)
    _refusal_audited(broker, "ORDER_EXPIRED", key_id=key_id)


@pytest.mark.attack
def test_an_order_used_twice_is_refused(broker: Broker, alice: Owner, workload: Workload) -> None:
    key_id, _ = _new_key(broker, alice, workload)
    order = _order(alice, key_id)
    with broker.workload_client() as client:
        client.release_key(order, workload.quote).wipe()
        with pytest.raises(errors.OrderUsedError):
            client.release_key(order, workload.quote)
    order_id = release_order.parse_order(order)[0].order_id.hex()
    _refusal_audited(broker, "ORDER_USED", order_id=order_id)


@pytest.mark.attack
def test_evidence_of_another_model_than_the_order_names_is_refused(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    # The policy allows both models; the order names the one the workload does not run.
    key_id, _ = _new_key(broker, alice, workload, MODEL, OTHER_MODEL)
    with broker.workload_client() as client, pytest.raises(errors.ModelMismatchError):
        client.release_key(_order(alice, key_id, model=OTHER_MODEL), workload.quote)
    _refusal_audited(broker, "MODEL_MISMATCH", key_id=key_id)


@pytest.mark.attack
def test_a_model_the_keys_policy_does_not_allow_is_refused(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    key_id, _ = _new_key(broker, alice, workload, OTHER_MODEL)
    with broker.workload_client() as client, pytest.raises(errors.AttestationRefusedError) as err:
        client.release_key(_order(alice, key_id), workload.quote)
    assert err.value.check == "model_digest"
    _refusal_audited(broker, "ATTESTATION_REFUSED", key_id=key_id, check="model_digest")


@pytest.mark.attack
def test_a_revoked_key_is_never_released(broker: Broker, alice: Owner, workload: Workload) -> None:
    key_id, _ = _new_key(broker, alice, workload)
    order = _order(alice, key_id)
    with broker.owner("alice") as owner:
        info = owner.revoke_key(key_id)
    assert info.state == "revoked" and info.versions == ()
    with broker.workload_client() as client, pytest.raises(errors.KeyRevokedError):
        client.release_key(order, workload.quote)
    _refusal_audited(broker, "KEY_REVOKED", key_id=key_id)


@pytest.mark.attack
def test_a_replayed_nonce_is_refused(broker: Broker, alice: Owner, workload: Workload) -> None:
    key_id, _ = _new_key(broker, alice, workload)
    with broker.workload_client() as client:
        nonce = client.challenge()
        client.release_key(_order(alice, key_id), workload.quote, nonce=nonce).wipe()
        with pytest.raises(errors.NonceUnknownError):
            client.release_key(_order(alice, key_id), workload.quote, nonce=nonce)
        with pytest.raises(errors.NonceUnknownError):  # never issued
            client.release_key(_order(alice, key_id), workload.quote, nonce=os.urandom(32))
    _refusal_audited(broker, "NONCE_UNKNOWN")


@pytest.mark.attack
def test_a_replayed_key_request_is_refused(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    """The exact bytes of a request that released a key, sent again (as a recorder of the
    workload's traffic would): its nonce is spent."""
    from encloud.protocol import key_broker

    key_id, _ = _new_key(broker, alice, workload)
    with broker.workload_client() as client:
        pending = key_broker.prepare_release(
            _order(alice, key_id), client.challenge(), workload.quote
        )
    channel = grpc.secure_channel(
        broker.workload_target, grpc.ssl_channel_credentials(broker.pki.ca)
    )
    with channel:
        stub = pb_grpc.WorkloadServiceStub(channel)
        pending.open(stub.ReleaseKey(pending.request, timeout=10)).wipe()
        with pytest.raises(grpc.RpcError) as err:
            stub.ReleaseKey(pending.request, timeout=10)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    _refusal_audited(
        broker, "NONCE_UNKNOWN", nonce_sha256=hashlib.sha256(pending.request.nonce).hexdigest()
    )


@pytest.mark.attack
def test_a_session_quote_offered_to_sentinel_is_refused(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    """The quote a server makes for an Attest (session label) over the same nonce and key."""
    key_id, _ = _new_key(broker, alice, workload)

    def session_quote(_sentinel_q: bytes) -> Evidence:
        q = quote_qualifying_data(SUITE_V1, nonce, os.urandom(32), os.urandom(32), b"\0" * 16, 60)
        return workload.quote(q)

    with broker.workload_client() as client:
        nonce = client.challenge()
        with pytest.raises(errors.AttestationRefusedError) as err:
            client.release_key(_order(alice, key_id), session_quote, nonce=nonce)
    assert err.value.check == "qualifying_data"
    _refusal_audited(broker, "ATTESTATION_REFUSED", key_id=key_id, check="qualifying_data")


@pytest.mark.attack
def test_a_quote_from_another_ak_is_refused(
    broker: Broker, alice: Owner, workload: Workload, other_workload: Workload
) -> None:
    key_id, _ = _new_key(broker, alice, workload)  # the policy pins the first vTPM's AK
    with broker.workload_client() as client, pytest.raises(errors.AttestationRefusedError) as err:
        client.release_key(_order(alice, key_id), other_workload.quote)
    assert err.value.check == "ak_trust"
    _refusal_audited(broker, "ATTESTATION_REFUSED", key_id=key_id, check="ak_trust")


@contextlib.contextmanager
def _fresh_sentinel(pki: Pki, state: Path, **settings: Any) -> Iterator[RunningSentinel]:
    """A Sentinel of its own on SQLite (alice registered), with these settings."""
    config = SentinelSettings(
        state_dir=state,
        owner_listen="127.0.0.1:0",
        workload_listen="127.0.0.1:0",
        tls_cert=pki.path("sentinel.pem"),
        tls_key=pki.path("sentinel.key"),
        client_ca=pki.path("ca.pem"),
        **settings,
    )
    init_state(config)
    store = Store(_engine(config))
    store.add_owner("alice", _spki_sha256(pki.certs["alice"][0]))
    store.engine.dispose()
    running = start(config)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.attack
def test_an_unauthenticated_caller_cannot_make_sentinel_store_nonces_without_bound(
    pki: Pki, tmp_path: Path
) -> None:
    with _fresh_sentinel(pki, tmp_path, max_outstanding_nonces=2) as running:
        target = f"127.0.0.1:{running.workload_port}"
        with WorkloadClient(target, ca_pem=pki.ca) as client:
            client.challenge()
            client.challenge()
            with pytest.raises(errors.ServiceError) as err:
                client.challenge()
    assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.retry_after_seconds
    with (tmp_path / "audit.jsonl").open() as log:
        outcomes = [json.loads(line).get("outcome") for line in log]
    assert outcomes.count("refused") == 1


@pytest.mark.attack
def test_one_caller_cannot_take_every_challenge(pki: Pki, tmp_path: Path) -> None:
    """Each caller (behind a trusted proxy: the address it forwarded) has its share of the
    live nonces; a caller over its share is refused, the next caller is not."""
    proxied = {"max_outstanding_nonces_per_peer": 2, "trusted_proxies": ["127.0.0.1/32"]}
    with _fresh_sentinel(pki, tmp_path, **proxied) as running:
        target = f"127.0.0.1:{running.workload_port}"
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(pki.ca)) as channel:
            stub = pb_grpc.WorkloadServiceStub(channel)

            def challenge(caller: str) -> bytes:
                metadata = (("x-forwarded-for", caller),)
                reply = stub.GetChallenge(pb.GetChallengeRequest(), metadata=metadata, timeout=10)
                return bytes(reply.nonce)

            challenge("198.51.100.7")
            challenge("198.51.100.7")
            with pytest.raises(grpc.RpcError) as err:
                challenge("198.51.100.7")
            assert len(challenge("203.0.113.9")) == 32
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this caller" in (err.value.details() or "")


@pytest.mark.attack
def test_a_production_sentinel_refuses_a_dev_only_release_policy(
    pki: Pki, workload: Workload, tmp_path: Path
) -> None:
    """The swtpm workload's own trust-on-first-use policy: fine for the tests' Sentinel (it
    sets accept_dev_policies), refused by one with the default settings."""
    assert json.loads(workload.policy)["dev_only"] is True
    with _fresh_sentinel(pki, tmp_path) as running:
        cert, key = pki.certs["alice"]
        target = f"127.0.0.1:{running.owner_port}"
        with OwnerClient(target, ca_pem=pki.ca, cert_pem=cert, key_pem=key) as client:
            with pytest.raises(errors.PolicyRejectedError, match="dev-only"):
                client.create_key("alice/data", workload.policy, os.urandom(32))
            assert client.list_keys() == []


# --- attacks by other owners ---------------------------------------------------------------


@pytest.mark.attack
@pytest.mark.parametrize("action", ["rotate", "revoke", "create"])
def test_another_owner_cannot_touch_a_key(
    broker: Broker, alice: Owner, bob: Owner, workload: Workload, action: str
) -> None:
    key_id, key = _new_key(broker, alice, workload)
    with broker.owner("bob") as client, pytest.raises(errors.NotKeyOwnerError):
        if action == "rotate":
            client.rotate_key(key_id, os.urandom(32))
        elif action == "revoke":
            client.revoke_key(key_id)
        else:
            client.create_key(f"alice/by-bob-{next(_counter)}", workload.policy, os.urandom(32))
    _refusal_audited(broker, "NOT_KEY_OWNER", owner="bob")
    with broker.owner("alice") as owner:
        info = next(k for k in owner.list_keys() if k.key_id == key_id)
    assert info.state == "active" and info.versions == (1,)
    with broker.workload_client() as client:
        assert client.release_key(_order(alice, key_id), workload.quote).newest() == key


@pytest.mark.attack
def test_a_certificate_no_owner_pinned_is_refused(broker: Broker) -> None:
    """Signed by the same CA, but no `sentinel owner add` pinned it."""
    with broker.owner("stranger") as client, pytest.raises(errors.OwnerUnknownError):
        client.list_keys()
    _refusal_audited(broker, "OWNER_UNKNOWN")


@pytest.mark.attack
def test_the_owner_api_on_the_workload_port_has_no_owner(broker: Broker) -> None:
    channel = grpc.secure_channel(
        broker.workload_target, grpc.ssl_channel_credentials(broker.pki.ca)
    )
    with channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.OwnerServiceStub(channel).ListKeys(pb.ListKeysRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.attack
def test_a_key_sealed_for_another_key_id_does_not_import(broker: Broker, alice: Owner) -> None:
    from encloud.protocol import key_broker

    with broker.owner("alice") as client:
        suite, public = client.import_key()
        sealed = key_broker.seal_data_key(
            suite, public, os.urandom(32), key_broker.import_info("alice/other", 1)
        )
        stub = pb_grpc.OwnerServiceStub(client._channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateKey(
                pb.CreateKeyRequest(key_id="alice/target", policy=b"{}", sealed_key=sealed),
                timeout=10,
            )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- the sealed file after release ----------------------------------------------------------


@pytest.mark.attack
def test_a_tampered_file_or_one_sealed_under_another_key_id_does_not_open(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    """Reordered, dropped and spliced segments are tests/test_sealed_file.py's; here the
    released key meets a flipped bit, a cut file and a file of another key id."""
    key_id, key = _new_key(broker, alice, workload)
    with broker.workload_client() as client:
        released = client.release_key(_order(alice, key_id), workload.quote)
    sealed = bytearray(_seal(key, key_id))
    sealed[-20] ^= 1
    with pytest.raises(SealedFileDecryptError):
        _open(bytes(sealed), released)
    with pytest.raises(SealedFileDecryptError):
        _open(_seal(key, key_id)[:-17], released)
    with pytest.raises(SealedFileKeyIdError):
        _open(_seal(key, "alice/someone-else"), released)


# --- faults ------------------------------------------------------------------------------


@pytest.mark.faults
def test_keys_persist_wrapped_across_a_restart(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    key_id, key = _new_key(broker, alice, workload)
    broker.restart()
    with broker.workload_client() as client:
        assert client.release_key(_order(alice, key_id), workload.quote).newest() == key


@pytest.mark.faults
# SQLite is embedded: it cannot be down apart from Sentinel, so this runs on PostgreSQL only.
@pytest.mark.parametrize("broker", ["postgresql"], indirect=True)
def test_the_database_down_is_unavailable_and_nothing_is_half_written(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    assert broker.pg is not None
    key_id, _ = _new_key(broker, alice, workload)
    order = _order(alice, key_id)
    broker.pg.stop()
    try:
        with broker.owner("alice") as client, pytest.raises(errors.DatabaseUnavailableError):
            client.create_key("alice/while-down", workload.policy, os.urandom(32))
        with broker.workload_client() as client, pytest.raises(errors.DatabaseUnavailableError):
            client.challenge()
    finally:
        broker.pg.start()
    # The owner call stopped where it first needed the database: its certificate's owner.
    _refusal_audited(broker, "DATABASE_UNAVAILABLE", method="GetImportKey")
    _refusal_audited(broker, "DATABASE_UNAVAILABLE", method="GetChallenge")
    with broker.owner("alice") as client:
        assert not any(k.key_id == "alice/while-down" for k in client.list_keys())
    with broker.workload_client() as client:  # the order was not burnt by the outage
        assert client.release_key(order, workload.quote).versions


@pytest.mark.faults
def test_a_kek_rotation_rewraps_every_key_and_a_sentinel_left_on_the_old_kek_refuses(
    broker: Broker, alice: Owner, workload: Workload, tmp_path: Path
) -> None:
    from encloud.broker.app import rotate

    key_id, key = _new_key(broker, alice, workload)
    with broker.owner("alice") as client:
        client.rotate_key(key_id, newer := os.urandom(32))
    old_kek = broker.settings.resolved_kek_file().read_bytes()
    count = rotate(broker.settings, tmp_path / "new-kek")
    assert count >= 2 and not (tmp_path / "new-kek").exists()
    assert broker.settings.resolved_kek_file().read_bytes() != old_kek
    # The Sentinel still running on the old KEK writes and releases nothing.
    with broker.owner("alice") as client, pytest.raises(errors.KekRotatedError):
        client.create_key(f"alice/after-{next(_counter)}", workload.policy, os.urandom(32))
    with broker.workload_client() as client, pytest.raises(errors.KekRotatedError):
        client.release_key(_order(alice, key_id), workload.quote)
    broker.restart()  # on the new KEK: every version of every key still opens
    with broker.workload_client() as client:
        released = client.release_key(_order(alice, key_id), workload.quote)
    assert [bytes(k) for _, k in released.versions] == [newer, key]
    stale = tmp_path / "old-kek"
    stale.write_bytes(old_kek)
    stale.chmod(0o600)
    with pytest.raises(KekError, match="not the one"):
        build(broker.settings.model_copy(update={"kek_file": stale}))


@pytest.mark.faults
def test_sentinel_refuses_to_start_without_its_kek(broker: Broker, tmp_path: Path) -> None:
    missing = broker.settings.model_copy(update={"kek_file": tmp_path / "no-kek"})
    with pytest.raises(KekError, match="missing"):
        build(missing)
    loose = tmp_path / "loose-kek"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    with pytest.raises(KekError, match="readable by others"):
        build(broker.settings.model_copy(update={"kek_file": loose}))
    other = tmp_path / "other-kek"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    with pytest.raises(KekError, match="not the one"):
        build(broker.settings.model_copy(update={"kek_file": other}))


# --- what Sentinel writes -------------------------------------------------------------------


def _files_written(broker: Broker) -> list[Path]:
    folders = [broker.settings.state_dir]
    if broker.pg is not None:
        folders.append(Path(broker.pg.data_dir))
        # Flush PostgreSQL's buffers to its data files (CHECKPOINT needs the superuser).
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-h",
                broker.pg.socket_dir,
                "-p",
                str(broker.pg.port),
                "-d",
                broker.pg.dbname,
                "-qc",
                "CHECKPOINT",
            ],
            check=True,
            capture_output=True,
        )
    kek = broker.settings.resolved_kek_file()
    return [p for f in folders for p in f.rglob("*") if p.is_file() and p != kek]


def test_no_file_sentinel_or_its_database_writes_holds_a_data_key(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    key_id, key = _new_key(broker, alice, workload)
    with broker.workload_client() as client:
        client.release_key(_order(alice, key_id), workload.quote).wipe()
    files = _files_written(broker)
    # Positive control: the scan reads the database's files (the wrapped row is found) and
    # would find the key if it were written in clear beside them.
    store = broker.running.sentinel.store
    record = store.key(key_id)
    assert record is not None
    with store.transaction() as db:
        import sqlalchemy as sa

        from encloud.broker import schema

        wrapped = db.execute(
            sa.select(schema.key_versions.c.wrapped).where(
                schema.key_versions.c.data_key == record.id
            )
        ).scalar_one()
    assert any(bytes(wrapped) in p.read_bytes() for p in files), "the scan misses the database"
    planted = broker.settings.state_dir / "control.bin"
    planted.write_bytes(b"x" + key + b"y")
    try:
        assert any(key in p.read_bytes() for p in _files_written(broker))
    finally:
        planted.unlink()
    leaking = [p for p in files if key in p.read_bytes() or key.hex().encode() in p.read_bytes()]
    assert not leaking, f"a data key in clear in {leaking}"


def test_32_concurrent_key_requests_all_succeed_and_each_is_audited_once(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    key_id, key = _new_key(broker, alice, workload)
    orders = [_order(alice, key_id) for _ in range(32)]
    seconds: list[float] = []

    def fetch(order: bytes) -> bytes:
        started = time.perf_counter()
        with broker.workload_client() as client:
            released = client.release_key(order, workload.quote)
        seconds.append(time.perf_counter() - started)
        return released.newest()

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(fetch, orders))
    assert results == [key] * 32
    ids = {release_order.parse_order(o)[0].order_id.hex() for o in orders}
    released = [
        e
        for e in broker.audit_entries()
        if e.get("outcome") == "released" and e.get("order_id") in ids
    ]
    assert sorted(e["order_id"] for e in released) == sorted(ids)
    ordered = sorted(seconds)
    print(
        f"\n[{broker.database}] 32 concurrent releases: p50 {ordered[15] * 1000:.0f} ms, "
        f"max {ordered[-1] * 1000:.0f} ms (includes each workload's vTPM quote)"
    )


def test_the_audit_log_verifies_with_the_unchanged_verifier(broker: Broker) -> None:
    from encloud.protocol.audit import load_public_key

    broker.running.sentinel.audit.flush()
    key = broker.settings.resolved_checkpoint_key()
    log = broker.settings.resolved_audit_log()
    checkpoints = log.with_name(log.name + ".checkpoints")
    result = verify_log(log, checkpoints, load_public_key(key.with_suffix(".pub")))
    assert result.entries > 10
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "encloud.cli.main",
            "audit",
            "verify",
            str(log),
            "--checkpoints",
            str(checkpoints),
            "--public-key",
            str(key.with_suffix(".pub")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr


# --- encloud sentinel, as the docs run it -------------------------------------------------

ENCLOUD = str(Path(sys.executable).with_name("encloud"))


def _cli(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [ENCLOUD, *map(str, args)], capture_output=True, text=True, check=False, timeout=120
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert words in lines[0], lines[0]


def _wait_serving(process: subprocess.Popen[str]) -> str:
    """The line `encloud sentinel serve` prints once it listens."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "workload API on port" in line, line + (process.stderr.read() if process.stderr else "")
    return line


def test_the_cli_runs_sentinel_and_the_owner_flow_as_documented(
    pki: Pki, workload: Workload, tmp_path: Path
) -> None:
    from stack import free_port

    state = tmp_path / "state"
    _cli("sentinel", "init", "--state-dir", state)
    assert (state / "kek").stat().st_mode & 0o777 == 0o600
    _cli("sentinel", "owner", "add", "alice", "--cert", pki.path("alice.pem"), "--state-dir", state)
    owner_port, workload_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            ENCLOUD, "sentinel", "serve", "--state-dir", str(state),
            "--owner-listen", f"127.0.0.1:{owner_port}",
            "--workload-listen", f"127.0.0.1:{workload_port}",
            "--tls-cert", str(pki.path("sentinel.pem")), "--tls-key", str(pki.path("sentinel.key")),
            "--client-ca", str(pki.path("ca.pem")), "--accept-dev-policies", "true",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_serving(process)
        owner = [
            "--sentinel", f"127.0.0.1:{owner_port}", "--ca", pki.path("ca.pem"),
            "--cert", pki.path("alice.pem"), "--cert-key", pki.path("alice.key"),
        ]  # fmt: skip
        _cli(
            "audit",
            "keygen",
            "--private",
            tmp_path / "order.key",
            "--public",
            tmp_path / "order.pub",
        )
        _cli("sentinel", "signing-key", "add", "--public", tmp_path / "order.pub", *owner)
        (tmp_path / "data.txt").write_bytes(SECRET_TEXT)
        _cli(
            "seal", tmp_path / "data.txt", "-o", tmp_path / "data.sealed",
            "--key-id", "alice/reports", "--new-key", tmp_path / "data.key",
        )  # fmt: skip
        (tmp_path / "policy.json").write_bytes(workload.policy)
        created = _cli(
            "sentinel", "key", "create", "alice/reports",
            "--policy", tmp_path / "policy.json", "--key", tmp_path / "data.key", *owner,
        )  # fmt: skip
        assert '"state": "active"' in created.stdout
        listed = _cli("sentinel", "key", "list", *owner).stdout
        assert '"key_id": "alice/reports"' in listed and "versions" in listed
        _cli(
            "sentinel", "order", "sign", "--key-id", "alice/reports",
            "--model-digest", MODEL.hex(), "--ttl", "600",
            "--signing-key", tmp_path / "order.key", "-o", tmp_path / "order.json",
        )  # fmt: skip
        with WorkloadClient(f"127.0.0.1:{workload_port}", ca_pem=pki.ca) as client:
            released = client.release_key((tmp_path / "order.json").read_bytes(), workload.quote)
        assert _open((tmp_path / "data.sealed").read_bytes(), released) == SECRET_TEXT
        audit = _cli("sentinel", "audit", *owner).stdout
        assert '"outcome":"released"' in audit.replace(" ", "")
        # A mistake of the owner: another owner's key id, one line, no traceback.
        _one_line_error(
            _cli("sentinel", "key", "revoke", "bob/anything", *owner, ok=False),
            1, "NotKeyOwnerError",
        )  # fmt: skip
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    # Sentinel logged every call (JSON, whitelisted fields), and nothing it printed or logged
    # holds the data key, raw or hex.
    key = read_key_file((tmp_path / "data.key").read_bytes())
    printed = process.stdout.read().encode() + process.stderr.read().encode()  # type: ignore[union-attr]
    assert b'"method": "ReleaseKey", "code": "OK"' in printed
    assert key not in printed and key.hex().encode() not in printed
    log = state / "audit.jsonl"
    _cli(
        "audit", "verify", log, "--checkpoints", log.with_name("audit.jsonl.checkpoints"),
        "--public-key", state / "audit-checkpoint.pub",
    )  # fmt: skip


@pytest.mark.faults
def test_serve_without_its_kek_refuses_in_one_line(pki: Pki, tmp_path: Path) -> None:
    result = _cli(
        "sentinel", "serve", "--state-dir", tmp_path / "empty",
        "--tls-cert", pki.path("sentinel.pem"), "--tls-key", pki.path("sentinel.key"),
        "--client-ca", pki.path("ca.pem"), ok=False,
    )  # fmt: skip
    _one_line_error(result, 2, "missing")


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("sentinel", "serve", "--state-dir", "{tmp}"), 2, "mutual TLS"),
        (("sentinel", "owner", "add", "Alice!", "--cert", "{tmp}/none.pem"), 2, "owner name"),
        (("sentinel", "owner", "add", "alice", "--cert", "{tmp}/none.pem"), 1, "none.pem"),
        (("sentinel", "serve", "--nonce-ttl-seconds", "1"), 2, "nonce_ttl_seconds"),
        (
            ("sentinel", "rotate-kek", "--state-dir", "{tmp}", "--new-kek-file", "{tmp}/kek"),
            2, "the new KEK is the current one",
        ),
        (
            ("sentinel", "serve", "--state-dir", "{tmp}", "--owner-listen", "256.0.0.1:1",
             "--tls-cert", "{pki}/sentinel.pem", "--tls-key", "{pki}/sentinel.key",
             "--client-ca", "{pki}/ca.pem"),
            2, "cannot listen on 256.0.0.1:1 (owner_listen)",
        ),
        (
            ("sentinel", "order", "sign", "--key-id", "alice/x", "--model-digest", "abc",
             "--signing-key", "{tmp}/none.key", "-o", "{tmp}/o.json"),
            1, "none.key",
        ),
    ],
)  # fmt: skip
def test_operator_and_owner_mistakes_are_one_line_errors(
    pki: Pki, tmp_path: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    from encloud.broker.kek import create_kek_file

    create_kek_file(tmp_path / "kek")
    filled = (a.replace("{tmp}", str(tmp_path)).replace("{pki}", str(pki.folder)) for a in args)
    result = _cli(*filled, ok=False)
    _one_line_error(result, code, words)


@pytest.mark.bench
def test_the_sentinel_benchmark_runs_on_a_tiny_budget(tmp_path: Path) -> None:
    """python -m bench.sentinel end to end on both databases; asserts no speed, only that
    every figure is recomputed from the samples it wrote."""
    out = tmp_path / "sentinel.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.sentinel", "--releases", "3", "--concurrency", "2",
         "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    from bench.sentinel import figures

    report = json.loads(out.read_text())
    assert [run["database"] for run in report["runs"]] == ["sqlite", "postgresql"]
    for run in report["runs"]:
        assert len(run["sequential"]) == 3 and len(run["concurrent"]) == 2
        assert run["figures"] == figures(run)
        assert f"{run['database']:<12}release_p99_ms" in result.stdout


def test_the_migrated_schema_is_the_one_the_queries_use(broker: Broker) -> None:
    """Alembic's autogenerate finds nothing between the migrated database and schema.py."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from encloud.broker import schema
    from encloud.broker.store import schema_revision

    with broker.running.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), schema.metadata)
    assert diff == []
    current, head = schema_revision(broker.running.engine)
    assert current == head == "0004"


def test_migrations_go_down_to_nothing_and_up_again(tmp_path: Path) -> None:
    import sqlalchemy as sa
    from alembic import command

    from encloud.broker.store import _alembic_config, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'scratch.db'}")
    migrate(engine)
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), "base")
    assert sa.inspect(engine).get_table_names() == ["alembic_version"]
    migrate(engine)
    assert "data_keys" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_sentinel_installs_from_its_lock_alone_and_serves(pki: Pki, tmp_path: Path) -> None:
    """As docs/SENTINEL.md installs it: requirements/sentinel.lock and the wheel in a clean
    venv (no TPM library, no inference engine), then init, owner add, serve, and an owner's
    call from that venv."""
    from clean_install import clean_venv
    from stack import free_port

    venv = clean_venv(tmp_path, "sentinel.lock")
    installed = venv.installed()
    for heavy in ("onnxruntime", "tpm2-pytss", "torch", "tokenizers", "pytest"):
        assert f"{heavy}==" not in installed, heavy
    encloud = venv.bin("encloud")

    def run(*args: str | Path) -> str:
        done = subprocess.run(
            [encloud, *map(str, args)], env=venv.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    state = tmp_path / "state"
    run("sentinel", "init", "--state-dir", state)
    run("sentinel", "owner", "add", "alice", "--cert", pki.path("alice.pem"), "--state-dir", state)
    owner_port = free_port()
    process = subprocess.Popen(
        [
            encloud, "sentinel", "serve", "--state-dir", str(state),
            "--owner-listen", f"127.0.0.1:{owner_port}", "--workload-listen", "127.0.0.1:0",
            "--tls-cert", str(pki.path("sentinel.pem")), "--tls-key", str(pki.path("sentinel.key")),
            "--client-ca", str(pki.path("ca.pem")),
        ],
        env=venv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_serving(process)
        listed = run(
            "sentinel", "key", "list", "--sentinel", f"127.0.0.1:{owner_port}",
            "--ca", pki.path("ca.pem"), "--cert", pki.path("alice.pem"),
            "--cert-key", pki.path("alice.key"),
        )  # fmt: skip
        assert listed == ""
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


@pytest.mark.attack
def test_a_request_that_is_not_protobuf_is_invalid_argument_and_harms_no_one(
    broker: Broker, alice: Owner, workload: Workload
) -> None:
    channel = grpc.secure_channel(
        broker.workload_target, grpc.ssl_channel_credentials(broker.pki.ca)
    )
    with channel:
        garbage = channel.unary_unary("/encloud.sentinel.v1.WorkloadService/ReleaseKey")
        with pytest.raises(grpc.RpcError) as err:
            garbage(b"\xff\xff\xff\xff", timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf" in (err.value.details() or "")
    _refusal_audited(broker, "MALFORMED_MESSAGE", method="ReleaseKey")
    key_id, key = _new_key(broker, alice, workload)  # Sentinel serves on
    with broker.workload_client() as client:
        assert client.release_key(_order(alice, key_id), workload.quote).newest() == key


def test_sentinel_answers_grpc_health_on_both_ports(broker: Broker) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(broker.pki.ca)
    with grpc.secure_channel(broker.workload_target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "encloud.sentinel.v1.WorkloadService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    cert, key = broker.pki.certs["alice"]
    owner = grpc.ssl_channel_credentials(broker.pki.ca, key, cert)
    with grpc.secure_channel(broker.owner_target, owner) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="encloud.sentinel.v1.OwnerService"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_an_old_database_upgrades_with_its_data_and_expired_orders_are_pruned(
    tmp_path: Path,
) -> None:
    """A database at revision 0001 with a used order upgrades to 0002 keeping it (expiry
    unknown: kept); orders an hour past their expiry are pruned on the next use, and an order
    still valid stays refused as used."""
    import sqlalchemy as sa
    from alembic import command

    from encloud.broker import schema
    from encloud.broker.store import (
        PRUNE_MARGIN_SECONDS,
        KeyRecord,
        Owner,
        _alembic_config,
        make_engine,
    )

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0001")
        connection.execute(
            sa.text("INSERT INTO owners (name, cert_spki_sha256, created_at) VALUES ('o', 'x', 1)")
        )
        connection.execute(
            sa.text(
                "INSERT INTO data_keys (key_id, owner_id, policy, policy_sha256, state, created_at)"
                " VALUES ('o/k', 1, x'7b7d', 'p', 'active', 1)"
            )
        )
        connection.execute(
            sa.text("INSERT INTO used_orders (order_id, data_key, used_at) VALUES (x'01', 1, 1)")
        )
    migrate(engine)
    store = Store(engine)
    record = KeyRecord(1, "o/k", Owner(1, "o"), b"{}", "p", "active", 1, ())
    now = int(time.time())
    store.use_order(b"\x02", now - PRUNE_MARGIN_SECONDS - 10, record)  # long expired
    store.use_order(b"\x03", now + 600, record)  # valid
    store.use_order(b"\x04", now + 600, record)  # the next use prunes
    with engine.connect() as connection:
        kept = set(connection.execute(sa.select(schema.used_orders.c.order_id)).scalars())
    assert kept == {b"\x01", b"\x03", b"\x04"}
    with pytest.raises(OrderUsedFault):
        store.use_order(b"\x03", now + 600, record)
    engine.dispose()


@pytest.mark.unit
def test_released_versions_open_the_file_their_version_sealed_and_nothing_else() -> None:
    from encloud.protocol.key_broker import ReleasedKeys

    old, new = os.urandom(32), os.urandom(32)
    released = ReleasedKeys("o/k", [(2, bytearray(new)), (1, bytearray(old))])
    for key, version in ((old, 1), (new, 2)):
        sink = io.BytesIO()
        assert released.open_sealed(io.BytesIO(_seal(key, "o/k")), sink) == version
        assert sink.getvalue() == SECRET_TEXT
    with pytest.raises(SealedFileDecryptError):  # no version opens it
        released.open_sealed(io.BytesIO(_seal(os.urandom(32), "o/k")), io.BytesIO())
    # Two segments, the second tampered: the first one's plaintext was written under v1, so
    # the failure is the file's, raised as it is (no other version is tried over it).
    big = bytearray(_seal(old, "o/k", os.urandom(1 << 20)))
    big[-30] ^= 1
    sink = io.BytesIO()
    with pytest.raises(SealedFileDecryptError):
        released.open_sealed(io.BytesIO(bytes(big)), sink)
    assert sink.tell() > 0
