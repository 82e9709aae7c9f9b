"""Confidential batch jobs end to end (docs/SENTINEL.md, "Jobs"): a real Sentinel on loopback,
a real server on swtpm running the embedded model, the owner's sealed input and signed
manifest, the job RPC, the sealed answers opened by the owner. Each attack is one test
expecting its typed error and its audit entry; the faults (a server killed mid-job, Sentinel
down) and the disk and memory checks have positive controls."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pki import issue_certificate
from postgres import pg_cluster  # noqa: F401  (the session fixture)
from sentinel_support import MODEL, Workload, attested_workload
from stack import ONE_PEER_IS_EVERYONE, Stack, running_stack
from waiting import wait_for

from encloud.broker.app import RunningSentinel, init_state, start
from encloud.broker.settings import SentinelSettings
from encloud.broker.store import Store, make_engine
from encloud.client import Client
from encloud.client._status import sentinel_error
from encloud.client.jobs import JobClient, JobProgress, JobResult
from encloud.client.sentinel import OwnerClient
from encloud.protocol import errors, job, key_broker
from encloud.protocol.errors import ServiceError
from encloud.protocol.sealed_file import open_stream, seal_stream
from encloud.protocol.sentinel.v1 import sentinel_pb2 as spb
from encloud.protocol.sentinel.v1 import sentinel_pb2_grpc as spb_grpc

pytestmark = pytest.mark.jobs

RECORDS = 50
PARAMS = {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.95}
TOPICS = ["tides", "bread", "owls", "granite", "violins", "comets", "moss", "glaciers", "ink"]


def _records(n: int = RECORDS, tag: str = "") -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{tag}Say one short fact about {TOPICS[i % 9]} #{i}."}
            ],
            "seed": 1000 + i,
        }
        for i in range(n)
    ]


# --- Sentinel and the server ----------------------------------------------------------------


@dataclass
class Sentinel:
    settings: SentinelSettings
    running: RunningSentinel
    folder: Path
    certs: dict[str, tuple[bytes, bytes]]
    ca: bytes

    @property
    def workload_target(self) -> str:
        return f"127.0.0.1:{self.running.workload_port}"

    def owner(self, name: str) -> OwnerClient:
        cert, key = self.certs[name]
        return OwnerClient(
            f"127.0.0.1:{self.running.owner_port}", ca_pem=self.ca, cert_pem=cert, key_pem=key
        )

    def stop(self) -> None:
        self.running.stop()

    def start_again(self) -> None:
        self.running = start(
            self.settings.model_copy(
                update={
                    "owner_listen": f"127.0.0.1:{self.running.owner_port}",
                    "workload_listen": self.workload_target,
                }
            )
        )

    def audit(self) -> list[dict[str, Any]]:
        self.running.sentinel.audit.flush()
        lines = self.settings.resolved_audit_log().read_bytes().splitlines()
        return [json.loads(line) for line in lines]

    def audited(self, job_id: bytes, **facts: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.audit()
            if e.get("job_id") == job_id.hex() and all(e.get(k) == v for k, v in facts.items())
        ]


def _start_sentinel(folder: Path, database_url: str | None = None) -> Sentinel:
    """Sentinel on loopback (mutual TLS for owners, TLS for workloads) with the owners alice
    and bob, on SQLite in `folder` or on `database_url`."""
    from encloud.broker.servicer import certificate_spki_sha256

    ca_cert, ca_key = issue_certificate("jobs test CA", None, ca=True)
    certs = {
        name: issue_certificate(name, (ca_cert, ca_key), server=name == "sentinel")
        for name in ("sentinel", "alice", "bob")
    }
    (folder / "ca.pem").write_bytes(ca_cert)
    for name, (cert, key) in certs.items():
        (folder / f"{name}.pem").write_bytes(cert)
        (folder / f"{name}.key").write_bytes(key)
    settings = SentinelSettings(
        state_dir=folder / "state",
        database_url=database_url,
        owner_listen="127.0.0.1:0",
        workload_listen="127.0.0.1:0",
        tls_cert=folder / "sentinel.pem",
        tls_key=folder / "sentinel.key",
        client_ca=folder / "ca.pem",
        accept_dev_policies=True,  # the swtpm workloads' own policies (dev_only)
    )
    init_state(settings)
    store = Store(make_engine(settings.resolved_database_url()))
    for name in ("alice", "bob"):
        store.add_owner(name, certificate_spki_sha256(certs[name][0]))
    store.engine.dispose()
    return Sentinel(settings, start(settings), folder, certs, ca_cert)


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sentinel]:
    """The Sentinel the server fetches job keys from (SQLite)."""
    broker = _start_sentinel(tmp_path_factory.mktemp("sentinel"))
    try:
        yield broker
    finally:
        broker.running.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def states(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sentinel]:
    """A Sentinel of its own for the job-state tests, on each database."""
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_cluster").another_database("encloud_jobs")
    broker = _start_sentinel(tmp_path_factory.mktemp(f"states-{request.param}"), url)
    try:
        yield broker
    finally:
        broker.running.stop()


def _job_settings(sentinel: Sentinel, address: str | None = None) -> dict[str, Any]:
    return {
        "sentinel_address": address or sentinel.workload_target,
        "sentinel_ca_file": sentinel.folder / "ca.pem",
        "sentinel_timeout_seconds": 5,
        "job_concurrency": 8,
        "max_running_jobs": 1,
    }


@pytest.fixture(scope="module")
def server(
    sentinel: Sentinel, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("job-server"), model_dir, **_job_settings(sentinel)
    ) as stack:
        yield stack


def _kill_and_restart(stack: Stack, sentinel: Sentinel) -> None:
    """SIGKILL the server (no shutdown of any kind) and start a new one on the same TPM and
    folder: a new start-up in the same vTPM's event log."""
    from encloud.server.devstack import ServerProcess

    stack.server.kill()
    stack.server = ServerProcess(
        stack.workdir,
        stack.swtpm.tcti,
        stack.model_dir,
        **{**ONE_PEER_IS_EVERYONE, **_job_settings(sentinel)},
    )
    stack.address = stack.server.start()


# --- owners, keys, jobs ---------------------------------------------------------------------


@dataclass
class Owner:
    name: str
    signing: Ed25519PrivateKey


@dataclass
class Key:
    key_id: str
    key: bytes


@dataclass
class Job:
    manifest: job.JobManifest
    signed: bytes
    sealed_input: bytes
    key: Key


def _owner(sentinel: Sentinel, name: str) -> Owner:
    signing = Ed25519PrivateKey.generate()
    with sentinel.owner(name) as client:
        client.add_signing_key(signing.public_key().public_bytes_raw())
    return Owner(name, signing)


@pytest.fixture(scope="module")
def alice(sentinel: Sentinel) -> Owner:
    return _owner(sentinel, "alice")


@pytest.fixture(scope="module")
def bob(sentinel: Sentinel) -> Owner:
    return _owner(sentinel, "bob")


@pytest.fixture(scope="module")
def alice_key(sentinel: Sentinel, server: Stack, alice: Owner) -> Key:
    key = os.urandom(32)
    key_id = "alice/batch"
    with sentinel.owner("alice") as client:
        client.create_key(key_id, server.server.policy_path.read_bytes(), key)
    return Key(key_id, key)


def _model_digest(stack: Stack) -> bytes:
    return stack.policy.allowed_model_digests[0]


def _seal(key: Key, data: bytes) -> bytes:
    sink = io.BytesIO()
    seal_stream(io.BytesIO(data), sink, key.key, key.key_id)
    return sink.getvalue()


def _input(records: list[dict[str, Any]]) -> bytes:
    return b"".join(job.record_line(r["messages"], r.get("seed")) for r in records)


def _job(
    owner: Owner,
    key: Key,
    stack: Stack | None,
    records: list[dict[str, Any]],
    *,
    model: bytes | None = None,
    ttl: int = 600,
    now: float | None = None,
    output: str | None = None,
    signed_input: bytes | None = None,
) -> Job:
    sealed = _seal(key, _input(records))
    manifest = job.new_manifest(
        key_id=key.key_id,
        model_digest=model or _model_digest(stack),  # type: ignore[arg-type]
        input_sha256=hashlib.sha256(signed_input or sealed).digest(),
        records=len(records),
        output=output or f"answers-{os.urandom(4).hex()}.sealed",
        params=PARAMS,
        ttl_seconds=ttl,
        now=now,
    )
    return Job(manifest, job.sign_manifest(manifest, owner.signing), sealed, key)


def _run(
    stack: Stack, work: Job, on_progress: Any = None, signed: bytes | None = None
) -> tuple[JobResult, bytes]:
    sink = io.BytesIO()
    with JobClient(stack.address, timeout=600) as client:
        result = client.run(signed or work.signed, io.BytesIO(work.sealed_input), sink, on_progress)
    return result, sink.getvalue()


def _open_answers(work: Job, sealed: bytes) -> list[dict[str, Any]]:
    plain = io.BytesIO()
    open_stream(io.BytesIO(sealed), plain, work.key.key, expected_key_id=work.key.key_id)
    checker = job.AnswersChecker(work.manifest.digest())
    checker.feed(plain.getvalue())
    assert checker.finish() == work.manifest.records
    lines = [json.loads(line) for line in plain.getvalue().splitlines()]
    return [line["answer"] for line in lines[:-1]]


def _outbox(stack: Stack, owner: str = "alice") -> Path:
    return stack.workdir / "state" / "jobs" / "outbox" / owner


def _jobs_dir(stack: Stack) -> Path:
    return stack.workdir / "state" / "jobs"


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(server: Stack, alice: Owner, alice_key: Key) -> tuple[Job, JobResult, bytes]:
    """The 50-record job, run once."""
    work = _job(alice, alice_key, server, _records())
    progress: list[JobProgress] = []
    result, sealed = _run(server, work, progress.append)
    assert progress[-1].records_done == RECORDS
    return work, result, sealed


def test_fifty_records_give_the_interactive_clients_answers(
    finished: tuple[Job, JobResult, bytes], server: Stack, tmp_path: Path
) -> None:
    work, result, sealed = finished
    assert result.records == RECORDS and result.records_resumed == 0
    assert (_outbox(server) / work.manifest.output).read_bytes() == sealed
    answers = _open_answers(work, sealed)
    assert result.completion_tokens == sum(a["completion_tokens"] for a in answers) > 0
    with Client(server.address, server.policy, audit_log=tmp_path / "audit.jsonl") as client:
        for record, answer in zip(_records(), answers, strict=True):
            interactive = client.infer(record["messages"], seed=record["seed"], **PARAMS)
            assert interactive.text == answer["text"]
            assert interactive.completion.finish_reason == answer["finish_reason"]
    # Seeds matter (a positive control for the comparison): two seeds, two answers.
    assert len({a["text"] for a in answers}) > RECORDS // 2


def test_the_release_and_its_end_are_audited(
    finished: tuple[Job, JobResult, bytes], sentinel: Sentinel
) -> None:
    work, result, _ = finished
    released = sentinel.audited(work.manifest.job_id, method="ReleaseJobKey", outcome="released")
    ended = sentinel.audited(work.manifest.job_id, method="EndJobRelease", outcome="ended")
    assert [e["release_seq"] for e in released] == [1]
    assert [(e["job_outcome"], e["records_done"]) for e in ended] == [("done", RECORDS)]
    assert ended[0]["answers_sha256"] == result.answers_sha256.hex()


def test_the_job_leaves_no_plaintext_or_key_on_disk(
    finished: tuple[Job, JobResult, bytes], server: Stack, tmp_path: Path
) -> None:
    work, _, _ = finished
    needles = [work.key.key] + [r["messages"][0]["content"].encode() for r in _records()[:5]]
    # Positive control: the scan finds them in the owner's own plaintext.
    control = tmp_path / "owner-plaintext.jsonl"
    control.write_bytes(_input(_records()) + work.key.key)
    assert all(_files_holding(tmp_path, n) == [control] for n in needles)
    for needle in needles:
        assert _files_holding(server.workdir, needle) == []
    assert not (_jobs_dir(server) / work.manifest.job_id.hex()).exists()


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and needle in p.read_bytes()]


# --- attacks: each a typed refusal and an audit entry ----------------------------------------


def _refused(
    stack: Stack, work: Job, error: type[errors.SentinelError], signed: bytes | None = None
) -> errors.SentinelError:
    with pytest.raises(error) as caught:
        _run(stack, work, signed=signed)
    assert not (_outbox(stack) / work.manifest.output).exists()
    return caught.value


def test_a_manifest_signed_by_no_registered_key_is_refused(
    server: Stack, alice_key: Key, sentinel: Sentinel
) -> None:
    stranger = Owner("alice", Ed25519PrivateKey.generate())
    work = _job(stranger, alice_key, server, _records(2))
    _refused(server, work, errors.OrderSignatureError)
    assert sentinel.audited(work.manifest.job_id, reason="ORDER_SIGNATURE", outcome="refused")


def test_an_unsigned_manifest_is_refused(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    work = _job(alice, alice_key, server, _records(2))
    obj = json.loads(work.signed)
    obj["signature"] = "A" * 86 + "=="  # 64 zero bytes: no signature at all
    import rfc8785

    _refused(server, work, errors.OrderSignatureError, signed=rfc8785.dumps(obj))
    assert sentinel.audited(work.manifest.job_id, reason="ORDER_SIGNATURE", outcome="refused")


def test_a_manifest_signed_by_another_owner_is_refused(
    server: Stack, bob: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    work = _job(bob, alice_key, server, _records(2))
    _refused(server, work, errors.OrderSignatureError)
    assert sentinel.audited(
        work.manifest.job_id, reason="ORDER_SIGNATURE", owner="alice", outcome="refused"
    )


def test_a_finished_job_replayed_is_refused(
    finished: tuple[Job, JobResult, bytes], server: Stack, sentinel: Sentinel
) -> None:
    work, _, sealed = finished
    with pytest.raises(errors.JobFinishedError):
        _run(server, work)
    assert sentinel.audited(work.manifest.job_id, reason="JOB_FINISHED", outcome="refused")
    # The first run's answers are untouched.
    assert (_outbox(server) / work.manifest.output).read_bytes() == sealed


def test_an_expired_manifest_is_refused(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    work = _job(alice, alice_key, server, _records(2), ttl=1, now=time.time() - 60)
    _refused(server, work, errors.OrderExpiredError)
    assert sentinel.audited(work.manifest.job_id, reason="ORDER_EXPIRED", outcome="refused")


def test_a_manifest_naming_another_model_is_refused(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    work = _job(alice, alice_key, server, _records(2), model=bytes.fromhex("22" * 32))
    _refused(server, work, errors.ModelMismatchError)
    assert sentinel.audited(work.manifest.job_id, reason="MODEL_MISMATCH", outcome="refused")


def test_an_input_other_than_the_manifests_is_refused(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    signed_for = _seal(alice_key, _input(_records(2)))
    work = _job(alice, alice_key, server, _records(2, tag="other "), signed_input=signed_for)
    _refused(server, work, errors.InputMismatchError)
    assert sentinel.audited(work.manifest.job_id, reason="INPUT_MISMATCH", outcome="refused")
    assert not (_jobs_dir(server) / work.manifest.job_id.hex()).exists()


def _reseal(work: Job, plaintext: bytes) -> bytes:
    return _seal(work.key, plaintext)


def _answers_plaintext(work: Job, sealed: bytes) -> list[bytes]:
    plain = io.BytesIO()
    open_stream(io.BytesIO(sealed), plain, work.key.key)
    return plain.getvalue().splitlines(keepends=True)


@pytest.mark.parametrize("tamper", ["swap", "drop", "drop_last", "move"])
def test_an_answers_file_reordered_cut_or_moved_is_refused_at_open(
    finished: tuple[Job, JobResult, bytes],
    tmp_path: Path,
    tamper: str,
    capsys: Any,
    node_client: str,
) -> None:
    """Whoever holds the key (the attested server or the owner) could reseal plaintext; the
    index and job on every line, and the end line, still refuse it at `encloud open` (and at
    the Node client's `open`)."""
    from conftest import NODE_DIR

    from encloud.cli.main import main as cli

    work, _, sealed = finished
    lines = _answers_plaintext(work, sealed)
    if tamper == "swap":
        lines[3], lines[4] = lines[4], lines[3]
    elif tamper == "drop":
        del lines[7]
    elif tamper == "drop_last":
        del lines[-2]  # the last answer, keeping the end line
    else:  # another job's answers under the same key
        other = json.loads(lines[0])
        other["job"] = "ab" * 32
        lines[0] = json.dumps(other, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    (tmp_path / "answers.sealed").write_bytes(_reseal(work, b"".join(lines)))
    (tmp_path / "key").write_bytes(work.key.key.hex().encode())
    (tmp_path / "manifest.json").write_bytes(work.signed)
    argv = [
        "open",
        str(tmp_path / "answers.sealed"),
        "-o",
        str(tmp_path / "answers.jsonl"),
        "--key",
        str(tmp_path / "key"),
        "--manifest",
        str(tmp_path / "manifest.json"),
    ]
    node = [node_client, "bin/encloud-node.js", *argv]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "answers" in err.lower()
    assert not (tmp_path / "answers.jsonl").exists()
    refused = subprocess.run(node, cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "AnswersFileError" in refused.stderr, refused.stderr
    assert not (tmp_path / "answers.jsonl").exists()
    # Positive control: the untampered file opens through the same commands.
    (tmp_path / "answers.sealed").write_bytes(sealed)
    assert cli(argv) == 0
    opened = (tmp_path / "answers.jsonl").read_bytes()
    (tmp_path / "answers.jsonl").unlink()
    done = subprocess.run(node, cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "answers.jsonl").read_bytes() == opened


# --- faults --------------------------------------------------------------------------------------


def test_sentinel_unreachable_is_a_clear_error_and_nothing_is_written(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    work = _job(alice, alice_key, server, _records(3))
    sentinel.stop()
    try:
        with pytest.raises(ServiceError) as caught:
            _run(server, work)
    finally:
        sentinel.start_again()
    assert caught.value.code == "UNAVAILABLE" and caught.value.reason == "SENTINEL_UNAVAILABLE"
    assert "Sentinel" in str(caught.value) and "nothing of the job ran" in str(caught.value)
    assert not (_outbox(server) / work.manifest.output).exists()
    assert not (_jobs_dir(server) / work.manifest.job_id.hex()).exists()
    # Sentinel back: the same job runs (a positive control for "nothing happened").
    result, _ = _run(server, work)
    assert result.records == 3


def test_the_key_leaves_the_servers_memory_when_the_job_ends(
    server: Stack, alice: Owner, sentinel: Sentinel
) -> None:
    key = Key("alice/memory-check", os.urandom(32))
    with sentinel.owner("alice") as client:
        client.create_key(key.key_id, server.server.policy_path.read_bytes(), key.key)
    work = _job(alice, key, server, _records(24, tag="memory "))
    pid = server.server.process.pid
    seen_during: list[bool] = []

    def during(progress: JobProgress) -> None:
        if not seen_during and progress.records_done >= 1:
            seen_during.append(_process_holds(pid, key.key))

    _run(server, work, during)
    # Positive control: while the job ran, the scan found the key in the server's memory.
    assert seen_during == [True]
    assert not _process_holds(pid, key.key)


def _process_holds(pid: int, needle: bytes) -> bool:
    """Whether `needle` is anywhere in the readable memory of process `pid`."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            offset = start
            tail = b""
            while offset < end:
                size = min(1 << 22, end - offset)
                try:
                    mem.seek(offset)
                    chunk = mem.read(size)
                except OSError:
                    break
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle) :]
                offset += size
    return False


def test_a_server_killed_mid_job_resumes_without_losing_or_doubling_a_record(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    records = _records()
    work = _job(alice, alice_key, server, records)
    killed = threading.Event()

    def kill_after_ten(progress: JobProgress) -> None:
        if progress.records_done >= 10 and not killed.is_set():
            killed.set()
            server.server.kill()

    with pytest.raises(ServiceError):
        _run(server, work, kill_after_ten)
    assert killed.is_set()
    journal = _jobs_dir(server) / work.manifest.job_id.hex() / "journal"
    journaled = sorted(p.name for p in journal.glob("*.sealed"))
    assert len(journaled) >= 10
    # The host sees the journal: its entries' sizes do not tell the answers' lengths apart.
    assert len({p.stat().st_size for p in journal.glob("*.sealed")}) == 1
    assert not (_outbox(server) / work.manifest.output).exists()

    _kill_and_restart(server, sentinel)
    progress: list[JobProgress] = []
    result, sealed = _run(server, work, progress.append)
    assert result.records_resumed == len(journaled)
    assert result.records == RECORDS
    answers = _open_answers(work, sealed)  # every index once, in order, the end line last
    # The second call ran exactly the records the journal lacked: its tokens are theirs.
    kept = {int(name.split(".")[0]) for name in journaled}
    rerun = [a["completion_tokens"] for i, a in enumerate(answers) if i not in kept]
    assert result.completion_tokens == sum(rerun)
    assert len(progress) == 1 + len(rerun)  # accepted, then one progress per record run
    # The answers equal an uninterrupted run's (the same records and seeds).
    reference = _reference_answers(server, alice, alice_key, records)
    assert [a["text"] for a in answers] == reference
    released = sentinel.audited(work.manifest.job_id, method="ReleaseJobKey", outcome="released")
    assert [e["release_seq"] for e in released] == [1, 2]
    assert released[1]["startups"] == released[0]["startups"] + 1


def _reference_answers(
    stack: Stack, owner: Owner, key: Key, records: list[dict[str, Any]]
) -> list[str]:
    work = _job(owner, key, stack, records)
    _, sealed = _run(stack, work)
    return [a["text"] for a in _open_answers(work, sealed)]


def test_the_owner_runs_a_job_with_the_encloud_commands(
    server: Stack, sentinel: Sentinel, tmp_path: Path, capsys: Any
) -> None:
    """seal -> job sign -> job run -> open --manifest, as the docs tell a user to."""
    from cryptography.hazmat.primitives import serialization

    from encloud.cli.main import main as cli

    signing = Ed25519PrivateKey.generate()
    with sentinel.owner("alice") as client:
        client.add_signing_key(signing.public_key().public_bytes_raw())
    (tmp_path / "signing.pem").write_bytes(
        signing.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "requests.jsonl").write_bytes(_input(_records(4, tag="cli ")))
    t = str(tmp_path)
    assert cli(["seal", f"{t}/requests.jsonl", "-o", f"{t}/in.sealed", "--key-id",
                "alice/cli", "--new-key", f"{t}/key"]) == 0  # fmt: skip
    with sentinel.owner("alice") as client:
        key = bytes.fromhex((tmp_path / "key").read_text().strip())
        client.create_key("alice/cli", server.server.policy_path.read_bytes(), key)
    model = _model_digest(server).hex()
    assert cli(["job", "sign", "--input", f"{t}/in.sealed", "--key", f"{t}/key",
                "--model-digest", model, "--output-name", "cli.sealed", "--signing-key",
                f"{t}/signing.pem", "--params", '{"max_new_tokens": 8}',
                "-o", f"{t}/manifest.json"]) == 0  # fmt: skip
    assert "4 records under key id alice/cli" in capsys.readouterr().out
    assert cli(["job", "run", "--manifest", f"{t}/manifest.json", "--input", f"{t}/in.sealed",
                "-o", f"{t}/answers.sealed", "--target", server.address]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert "job done: 4 records" in out.out and "4/4 records" in out.err
    assert cli(["open", f"{t}/answers.sealed", "--key", f"{t}/key", "--manifest",
                f"{t}/manifest.json", "-o", f"{t}/answers.jsonl"]) == 0  # fmt: skip
    lines = (tmp_path / "answers.jsonl").read_bytes().splitlines()
    assert [json.loads(line).get("index") for line in lines] == [0, 1, 2, 3, None]
    # A second run of the same manifest: one line, Sentinel's typed refusal, no traceback.
    assert cli(["job", "run", "--manifest", f"{t}/manifest.json", "--input", f"{t}/in.sealed",
                "-o", f"{t}/again.sealed", "--target", server.address]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "JobFinishedError" in err and err.count("\n") == 1
    assert not (tmp_path / "again.sealed").exists()


# --- Sentinel's job states, driven by a workload on its own swtpm ---------------------------------


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    yield from attested_workload(tmp_path_factory.mktemp("workload"), MODEL)


@pytest.fixture(scope="module")
def other_workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    """The same software on another vTPM: another machine (another AK)."""
    yield from attested_workload(tmp_path_factory.mktemp("other-workload"), MODEL)


_direct_keys = iter(range(1000))


def _direct_job(sentinel: Sentinel, owner: Owner, workload: Workload, *also: Workload) -> Job:
    """A job whose key's policy is the workload's, its AK pins extended by `also`'s."""
    policy = json.loads(workload.policy)
    for other in also:
        policy["ak"]["pinned_public_keys"] += json.loads(other.policy)["ak"]["pinned_public_keys"]
    key = Key(f"alice/direct-{next(_direct_keys)}", os.urandom(32))
    with sentinel.owner("alice") as client:
        client.create_key(key.key_id, json.dumps(policy).encode(), key.key)
    return _job(owner, key, None, _records(2), model=MODEL)


_STATE_OWNERS: dict[int, Owner] = {}


def _state_owner(states: Sentinel) -> Owner:
    """alice, with a signing key registered at this Sentinel (once per Sentinel)."""
    if id(states) not in _STATE_OWNERS:
        _STATE_OWNERS[id(states)] = _owner(states, "alice")
    return _STATE_OWNERS[id(states)]


def _workload_channel(sentinel: Sentinel) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(sentinel.ca)
    return grpc.secure_channel(sentinel.workload_target, credentials)


def _release(
    sentinel: Sentinel, work: Job, workload: Workload
) -> tuple[key_broker.ReleasedKeys, int]:
    channel = grpc.secure_channel(
        sentinel.workload_target, grpc.ssl_channel_credentials(sentinel.ca)
    )
    stub = spb_grpc.WorkloadServiceStub(channel)
    try:
        nonce = stub.GetChallenge(spb.GetChallengeRequest()).nonce
        pending = key_broker.prepare_job_release(
            work.signed, hashlib.sha256(work.sealed_input).digest(), nonce, workload.quote
        )
        reply = stub.ReleaseJobKey(pending.request)
        return pending.open(reply), reply.release_seq
    except grpc.RpcError as err:
        raise sentinel_error(err) from None
    finally:
        channel.close()


def _end(
    sentinel: Sentinel,
    work: Job,
    seq: int,
    outcome: str,
    records: int,
    key: bytes | None = None,
) -> None:
    answers = b"\x01" * 32 if outcome == job.DONE else b""
    proof = job.end_proof(key or work.key.key, work.manifest.job_id, seq, outcome, answers, records)
    channel = grpc.secure_channel(
        sentinel.workload_target, grpc.ssl_channel_credentials(sentinel.ca)
    )
    try:
        spb_grpc.WorkloadServiceStub(channel).EndJobRelease(
            spb.EndJobReleaseRequest(
                job_id=work.manifest.job_id,
                release_seq=seq,
                outcome=outcome,
                answers_sha256=answers,
                records_done=records,
                proof=proof,
            )
        )
    except grpc.RpcError as err:
        raise sentinel_error(err) from None
    finally:
        channel.close()


def test_one_release_of_a_job_is_live_per_start_up(states: Sentinel, workload: Workload) -> None:
    work = _direct_job(states, _state_owner(states), workload)
    released, seq = _release(states, work, workload)
    assert seq == 1 and released.newest() == work.key.key
    released.wipe()
    with pytest.raises(errors.JobHeldError):
        _release(states, work, workload)
    assert states.audited(work.manifest.job_id, reason="JOB_HELD", outcome="refused")


def test_a_live_job_is_not_released_to_another_machine(
    states: Sentinel, workload: Workload, other_workload: Workload
) -> None:
    work = _direct_job(states, _state_owner(states), workload, other_workload)
    _release(states, work, workload)[0].wipe()
    with pytest.raises(errors.JobHeldError, match="another machine"):
        _release(states, work, other_workload)
    _end(states, work, 1, job.PAUSED, 0)  # even paused: its journal is on the first machine
    with pytest.raises(errors.JobHeldError, match="another machine"):
        _release(states, work, other_workload)
    # Positive control: the policy does admit the other machine, for a job of its own.
    fresh = _direct_job(states, _state_owner(states), workload, other_workload)
    _release(states, fresh, other_workload)[0].wipe()


def test_a_release_ended_paused_is_asked_again_and_done_is_final(
    states: Sentinel, workload: Workload
) -> None:
    work = _direct_job(states, _state_owner(states), workload)
    _release(states, work, workload)[0].wipe()
    _end(states, work, 1, job.PAUSED, 1)
    released, seq = _release(states, work, workload)
    released.wipe()
    assert seq == 2
    with pytest.raises(errors.JobReleaseUnknownError):  # the first release's end, replayed
        _end(states, work, 1, job.PAUSED, 1)
    _end(states, work, 2, job.DONE, 2)
    with pytest.raises(errors.JobFinishedError):
        _release(states, work, workload)
    ended = states.audited(work.manifest.job_id, method="EndJobRelease", outcome="ended")
    assert [(e["release_seq"], e["job_outcome"]) for e in ended] == [(1, "paused"), (2, "done")]


def test_an_end_not_proven_with_the_jobs_key_is_refused(
    states: Sentinel, workload: Workload
) -> None:
    work = _direct_job(states, _state_owner(states), workload)
    _release(states, work, workload)[0].wipe()
    with pytest.raises(errors.JobProofError):
        _end(states, work, 1, job.DONE, 2, key=os.urandom(32))
    assert states.audited(work.manifest.job_id, reason="JOB_PROOF", outcome="refused")
    # Still live: the real end is accepted (a positive control for the proof check).
    _end(states, work, 1, job.DONE, 2)


# --- the server's own refusals ------------------------------------------------------------------


def test_a_record_that_is_not_a_chat_request_is_refused_without_its_content(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    canary = "canary-7f3a9 not json"
    records = _records(3)
    work = _job(alice, alice_key, server, records)
    plain = _input(records[:1]) + canary.encode() + b"\n" + _input(records[2:])
    work.sealed_input = _seal(alice_key, plain)
    manifest = job.JobManifest(
        **{**work.manifest.__dict__, "input_sha256": hashlib.sha256(work.sealed_input).digest()}
    )
    work = Job(manifest, job.sign_manifest(manifest, alice.signing), work.sealed_input, alice_key)
    with pytest.raises(ServiceError) as caught:
        _run(server, work)
    assert caught.value.reason == "JOB_INPUT_INVALID" and "record 1" in str(caught.value)
    assert "canary" not in str(caught.value)
    assert not (_outbox(server) / work.manifest.output).exists()
    ended = sentinel.audited(work.manifest.job_id, method="EndJobRelease", outcome="ended")
    assert [e["job_outcome"] for e in ended] == ["paused"]
    assert not _process_holds(server.server.process.pid, alice_key.key)  # wiped on failure


def test_an_input_with_another_record_count_than_the_manifest_is_refused(
    server: Stack, alice: Owner, alice_key: Key
) -> None:
    records = _records(3)
    sealed = _seal(alice_key, _input(records))
    manifest = job.new_manifest(
        key_id=alice_key.key_id,
        model_digest=_model_digest(server),
        input_sha256=hashlib.sha256(sealed).digest(),
        records=4,
        output="count.sealed",
        params=PARAMS,
        ttl_seconds=600,
    )
    work = Job(manifest, job.sign_manifest(manifest, alice.signing), sealed, alice_key)
    with pytest.raises(ServiceError) as caught:
        _run(server, work)
    assert caught.value.reason == "JOB_INPUT_INVALID" and "3 records" in str(caught.value)
    assert not (_outbox(server) / "count.sealed").exists()


def test_a_cancelled_call_pauses_the_job_and_the_next_call_resumes_it(
    server: Stack, alice: Owner, alice_key: Key, sentinel: Sentinel
) -> None:
    from encloud.client.jobs import _requests
    from encloud.protocol.v2 import encloud_pb2_grpc

    work = _job(alice, alice_key, server, _records(24, tag="cancel "))
    channel = grpc.insecure_channel(server.address)
    call = encloud_pb2_grpc.JobServiceStub(channel).RunJob(
        _requests(work.signed, io.BytesIO(work.sealed_input))
    )
    with pytest.raises(grpc.RpcError):
        for reply in call:
            if reply.WhichOneof("item") == "progress" and reply.progress.records_done >= 4:
                call.cancel()
    channel.close()
    journal = _jobs_dir(server) / work.manifest.job_id.hex() / "journal"
    wait_for(
        lambda: bool(sentinel.audited(work.manifest.job_id, method="EndJobRelease")),
        "the cancelled call's release ended paused",
    )
    # Wiped on cancellation too (the scan's positive control: the memory test above).
    assert not _process_holds(server.server.process.pid, alice_key.key)
    entries = sorted(journal.glob("*.sealed"))
    assert len(entries) >= 4
    # The host tampers with one journal entry: it is dropped and its record runs again.
    tampered = bytearray(entries[1].read_bytes())
    tampered[-1] ^= 1
    entries[1].write_bytes(bytes(tampered))
    result, sealed = _run(server, work)
    assert result.records_resumed == len(entries) - 1 and result.records == 24
    assert len(_open_answers(work, sealed)) == 24
    released = sentinel.audited(work.manifest.job_id, method="ReleaseJobKey", outcome="released")
    assert [e["release_seq"] for e in released] == [1, 2]
    assert released[0]["startups"] == released[1]["startups"]  # the same start-up, resumed


def test_a_job_beyond_max_running_jobs_is_told_to_retry(
    server: Stack, alice: Owner, alice_key: Key
) -> None:
    first = _job(alice, alice_key, server, _records(12, tag="first "))
    other = _job(alice, alice_key, server, _records(2, tag="other "))
    refused: list[ServiceError] = []

    def start_another(progress: JobProgress) -> None:
        if not refused and progress.records_done >= 1:
            with pytest.raises(ServiceError) as caught:
                _run(server, other)
            refused.append(caught.value)

    _run(server, first, start_another)
    assert refused[0].code == "RESOURCE_EXHAUSTED" and refused[0].reason == "SERVER_BUSY"
    assert refused[0].retry_after_seconds is not None
    assert _run(server, other)[0].records == 2  # once the first ended (a positive control)


def test_a_second_call_of_a_running_job_is_refused(
    server: Stack, alice: Owner, alice_key: Key
) -> None:
    work = _job(alice, alice_key, server, _records(16, tag="twice "))
    second: list[BaseException] = []

    def call_again(progress: JobProgress) -> None:
        if not second and progress.records_done >= 1:
            try:
                _run(server, work)
            except ServiceError as err:
                second.append(err)

    result, _ = _run(server, work, call_again)
    assert result.records == 16
    assert isinstance(second[0], ServiceError) and second[0].reason == "JOB_RUNNING"


def test_concurrent_first_releases_of_one_job_release_it_once(
    states: Sentinel, workload: Workload
) -> None:
    """Six requests for the same job, quoted one after the other (one vTPM), sent at once:
    the job's row is claimed in one transaction, so one is released and five are held."""
    import concurrent.futures

    work = _direct_job(states, _state_owner(states), workload)
    channel = _workload_channel(states)
    stub = spb_grpc.WorkloadServiceStub(channel)
    digest = hashlib.sha256(work.sealed_input).digest()
    requests = [
        key_broker.prepare_job_release(
            work.signed, digest, stub.GetChallenge(spb.GetChallengeRequest()).nonce, workload.quote
        ).request
        for _ in range(6)
    ]

    def send(request: Any) -> str:
        try:
            stub.ReleaseJobKey(request)
        except grpc.RpcError as err:
            return sentinel_error(err).reason
        return "released"

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = sorted(pool.map(send, requests))
    finally:
        channel.close()
    assert outcomes == ["JOB_HELD"] * 5 + ["released"]


def test_a_job_sealed_under_an_older_key_version_runs_after_a_rotation(
    server: Stack, alice: Owner, sentinel: Sentinel
) -> None:
    """The input sealed under version 1, the key rotated to version 2: the answers are sealed
    under the version that opened the input, and the release ends with the newest."""
    old = Key("alice/rotated", os.urandom(32))
    with sentinel.owner("alice") as client:
        client.create_key(old.key_id, server.server.policy_path.read_bytes(), old.key)
    work = _job(alice, old, server, _records(3, tag="rotated "))
    with sentinel.owner("alice") as client:
        assert client.rotate_key(old.key_id, os.urandom(32)).versions == (1, 2)
    result, sealed = _run(server, work)
    assert len(_open_answers(work, sealed)) == 3 == result.records  # opens under version 1
    ended = sentinel.audited(work.manifest.job_id, method="EndJobRelease", outcome="ended")
    assert [e["job_outcome"] for e in ended] == ["done"]
