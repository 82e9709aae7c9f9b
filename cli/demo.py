"""`encloud demo`: the whole path on one machine, with a real TPM 2.0 simulator.

1. export the embedded SmolLM2 chat model and the embedded all-MiniLM-L6-v2 embedding
   model to ONNX (cached after the first run);
2. start swtpm in a private temporary folder and the server against it, serving both;
3. attest, verify, release a fresh data key, stream an encrypted chat, and embed three
   sentences encrypted in the same session.

The policy is written by the server at start-up: trust on first use, DEV ONLY.
A real deployment writes its policy offline from the model manifest and the
platform's reference values (docs/DEPLOY.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from encloud.cli.main import print_summary, stream_to_terminal
from encloud.client import Client
from encloud.client.sentinel import OwnerClient
from encloud.protocol.policy import load_policy
from encloud.server.devstack import ServerProcess, start_swtpm
from encloud.server.inference.embeddings_export import export_embeddings_model
from encloud.server.inference.export import DEFAULT_PRECISION, export_model

SENTENCES = (
    "The patient's blood pressure was high at the last visit.",
    "Hypertension was recorded during the most recent appointment.",
    "The quarterly report is due on Friday.",
)


def cache_root() -> Path:
    return Path(os.environ.get("ENCLOUD_CACHE_ROOT", Path.home() / ".cache" / "encloud"))


def run_demo(prompt: str, max_new_tokens: int) -> int:
    started = time.monotonic()
    print(f"[1/3] model: embedded SmolLM2-135M-Instruct GGUF -> ONNX {DEFAULT_PRECISION}, cached")
    model_dir = export_model(
        None, cache_root(), DEFAULT_PRECISION, progress=lambda m: print(f"      {m}")
    )
    print("      and the embedded all-MiniLM-L6-v2 -> ONNX fp32, cached")
    embeddings_dir = export_embeddings_model(cache_root(), progress=lambda m: print(f"      {m}"))
    with tempfile.TemporaryDirectory(prefix="encloud-demo-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o700)
        print(f"[2/3] swtpm and the server in {workdir} (private, removed at exit)")
        swtpm = start_swtpm(workdir / "swtpm")
        server = ServerProcess(workdir, swtpm.tcti, model_dir, embeddings_model_dir=embeddings_dir)
        try:
            address = server.start()
            print(f"      serving on {address} after {time.monotonic() - started:.1f} s")
            policy = load_policy(server.policy_path)
            print("[3/3] encrypted chat and embeddings")
            audit = Path(".encloud/audit.jsonl").resolve()
            with Client(address, policy, audit_log=audit) as client:
                attest_started = time.monotonic()
                attestation = client.attest()
                print_summary(attestation, policy)
                client.release_key()
                print("Data key released to the attested session; key confirmation verified.")
                print(f"Audit log: {audit}\n")
                print(f"you> {prompt}")
                _, first = stream_to_terminal(client, [("user", prompt)], max_new_tokens)
                if first is not None:
                    to_first = (first - attest_started) * 1000
                    print(f"[Attest request to first answer token: {to_first:.0f} ms]")
                _embed_to_terminal(client)
            code = server.terminate()
            print(f"Session ended, server drained and stopped (exit {code}); keys wiped.")
            return 0 if code == 0 else 1
        finally:
            server.kill()
            swtpm.stop()


def _embed_to_terminal(client: Client) -> None:
    """Embed the sentences in the same session; print how alike each pair is."""
    print("\nembed> " + "\n       ".join(SENTENCES))
    began = time.monotonic()
    result = client.embed(SENTENCES)
    elapsed = (time.monotonic() - began) * 1000
    vectors = result.vectors
    for i, j in ((0, 1), (0, 2)):
        cosine = sum(a * b for a, b in zip(vectors[i], vectors[j], strict=True))
        print(f"  cosine(sentence {i + 1}, sentence {j + 1}) = {cosine:.3f}")
    print(
        f"[{len(vectors)} vectors of {result.dimensions} dimensions, {result.prompt_tokens} "
        f"tokens, {elapsed:.0f} ms; bound to the request by its transcript hash]"
    )


BATCH_PROMPTS = (
    "Name one use of encryption at rest.",
    "What does a TPM measure?",
    "Give one reason to batch requests.",
    "What is a nonce?",
    "Why rotate keys?",
)


@contextlib.contextmanager
def batch_stack(workdir: Path, model_dir: Path, **server_settings: object) -> Iterator[BatchStack]:
    """Sentinel (SQLite, a throwaway CA, one owner) and a server on swtpm that fetches job
    keys from it, in `workdir`: the batch demo's and the job benchmark's set-up."""
    from encloud.broker.app import init_state, start
    from encloud.broker.servicer import certificate_spki_sha256
    from encloud.broker.settings import SentinelSettings
    from encloud.broker.store import Store, make_engine
    from encloud.cli.dev_pki import issue_certificate

    ca = issue_certificate("encloud demo CA", None, ca=True)
    for name, is_server in (("sentinel", True), ("owner", False)):
        cert, key = issue_certificate(name, ca, server=is_server)
        (workdir / f"{name}.pem").write_bytes(cert)
        (workdir / f"{name}.key").write_bytes(key)
    (workdir / "ca.pem").write_bytes(ca[0])
    settings = SentinelSettings(
        state_dir=workdir / "sentinel",
        owner_listen="127.0.0.1:0",
        workload_listen="127.0.0.1:0",
        tls_cert=workdir / "sentinel.pem",
        tls_key=workdir / "sentinel.key",
        client_ca=workdir / "ca.pem",
        accept_dev_policies=True,  # the swtpm server's trust-on-first-use policy: DEV ONLY
    )
    init_state(settings)
    store = Store(make_engine(settings.resolved_database_url()))
    store.add_owner("owner", certificate_spki_sha256((workdir / "owner.pem").read_bytes()))
    store.engine.dispose()
    sentinel = start(settings)
    swtpm = start_swtpm(workdir / "swtpm")
    server = ServerProcess(
        workdir,
        swtpm.tcti,
        model_dir,
        sentinel_address=f"127.0.0.1:{sentinel.workload_port}",
        sentinel_ca_file=workdir / "ca.pem",
        **server_settings,
    )
    try:
        address = server.start()
        yield BatchStack(workdir, address, server, sentinel.owner_port, ca[0])
    finally:
        server.kill()
        swtpm.stop()
        sentinel.stop()


@dataclass
class BatchStack:
    workdir: Path
    address: str
    server: ServerProcess
    owner_port: int
    ca_pem: bytes

    @property
    def policy_bytes(self) -> bytes:
        return self.server.policy_path.read_bytes()

    @property
    def model_digest(self) -> bytes:
        return bytes.fromhex(json.loads(self.policy_bytes)["allowed_model_digests"][0])

    def owner(self) -> OwnerClient:
        return OwnerClient(
            f"127.0.0.1:{self.owner_port}",
            ca_pem=self.ca_pem,
            cert_pem=(self.workdir / "owner.pem").read_bytes(),
            key_pem=(self.workdir / "owner.key").read_bytes(),
        )


def run_batch_demo(max_new_tokens: int) -> int:
    """The confidential batch flow once (docs/SENTINEL.md, "Jobs"): the owner seals a JSONL
    of chat requests and signs a job manifest; Sentinel releases the key only to the attested
    server for that manifest; the server answers into a sealed file; the owner opens it."""
    import io

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from encloud.client.jobs import JobClient, JobProgress
    from encloud.protocol import job, sealed_file

    started = time.monotonic()
    print(f"[1/6] model: embedded SmolLM2-135M-Instruct GGUF -> ONNX {DEFAULT_PRECISION}, cached")
    model_dir = export_model(
        None, cache_root(), DEFAULT_PRECISION, progress=lambda m: print(f"      {m}")
    )
    with tempfile.TemporaryDirectory(prefix="encloud-batch-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o700)
        print(f"[2/6] Sentinel (SQLite, a throwaway CA) and the server in {workdir}")
        with batch_stack(workdir, model_dir) as stack:
            print(f"      server on {stack.address} after {time.monotonic() - started:.1f} s")
            print("[3/6] owner: a fresh data key, registered with Sentinel under the policy")
            key_id, data_key = "owner/batch-demo", bytearray(os.urandom(32))
            signing = Ed25519PrivateKey.generate()
            with stack.owner() as owner:
                owner.add_signing_key(signing.public_key().public_bytes_raw())
                owner.create_key(key_id, stack.policy_bytes, data_key)

            print(f"[4/6] owner: seal {len(BATCH_PROMPTS)} chat requests, sign the job manifest")
            prepared = job.prepare_job(
                [
                    {"messages": [{"role": "user", "content": p}], "seed": i}
                    for i, p in enumerate(BATCH_PROMPTS)
                ],
                data_key,
                key_id,
                model_digest=stack.model_digest,
                params={"max_new_tokens": max_new_tokens, "temperature": 0.0},
                output="batch-demo.answers.sealed",
                ttl_seconds=600,
                signing_key=signing,
            )
            manifest = prepared.manifest
            print(f"      job {manifest.job_id.hex()}, manifest {manifest.digest().hex()[:16]}...")

            print("[5/6] the job: sealed input in, Sentinel releases the key to the attested")
            print("      server for this manifest only, sealed answers out")

            def show(progress: JobProgress) -> None:
                print(f"      {progress.records_done}/{progress.records_total} records")

            answers = io.BytesIO()
            job_started = time.monotonic()
            with JobClient(stack.address, timeout=600) as client:
                result = client.run(
                    prepared.signed_manifest, io.BytesIO(prepared.sealed_input), answers, show
                )
            print(
                f"      done in {time.monotonic() - job_started:.1f} s: {result.records} "
                f"records, {result.completion_tokens} tokens, answers sha256 "
                f"{result.answers_sha256.hex()[:16]}..."
            )

            print("[6/6] owner: open the answers (each bound to its record and this job)")
            opened = io.BytesIO()
            sealed_file.open_stream(
                io.BytesIO(answers.getvalue()), opened, data_key, expected_key_id=key_id
            )
            checker = job.AnswersChecker(manifest.digest())
            checker.feed(opened.getvalue())
            checker.finish()
            for prompt, line in zip(BATCH_PROMPTS, opened.getvalue().splitlines(), strict=False):
                text = json.loads(line)["answer"]["text"].strip()
                print(f"      you> {prompt}\n      llm> {text}")
            data_key[:] = bytes(32)
            code = stack.server.terminate()
            print(f"Server stopped (exit {code}); the job's key and journal are gone.")
            return 0 if code == 0 else 1
