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

import os
import tempfile
import time
from pathlib import Path

from encloud.cli.main import print_summary, stream_to_terminal
from encloud.client import Client
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
