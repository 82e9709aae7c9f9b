"""The CUDA path, checked and measured on a CUDA machine (run by ``scripts/gpu-check``).

On the exporter's CUDA precision (``fp16``, built with ``-e cuda``):

1. **Known answer**: the engine loaded twice on ``--provider`` gives the same known-answer hash
   (the runtime event measures it, so it must not vary between start-ups on one provider);
   printed, since a policy for a GPU server pins the event of a GPU reference machine.
2. **Against the CPU**: greedy tokens of the known-answer prompts on the provider equal those
   of the same export on ONNX Runtime's CPU kernels (``--reference-python``: the CPU venv) up to
   the first step whose CPU top-two logits are within ``CROSS_PROVIDER_TIE``.
3. **Batching**: 8 answers admitted together equal their single-stream answers up to the
   first near-tie (rows moved in device memory included).
4. **The service**: swtpm + the server started with ``provider=<provider>``; the client
   attests, checks the runtime event (provider, known answer), releases a key and streams
   an encrypted answer; Attest request to first token.
5. **Speed**, in process: TTFT of one stream, decode tok/s of 1 stream, aggregate tok/s of
   8, 16 and 64 streams (64 new tokens each); printed as a table and written to ``--json``.

Exit status 0 only when 1-4 pass. ``--provider cpu`` runs every step on the CPU (the script's
own check on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from encloud.server.inference.engine import (
    KNOWN_ANSWER_NEW_TOKENS,
    KNOWN_ANSWER_PROMPTS,
    ChatTurn,
    Engine,
    GenerationParams,
    GenerationResult,
)
from encloud.server.inference.quality import greedy_with_gaps
from encloud.server.inference.runner import ModelRunner

# fp16 kernels on two providers differ by more than batched kernels on one.
CROSS_PROVIDER_TIE = 0.1
SAME_PROVIDER_TIE = 0.05
BATCH_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain gravity.",
    "Name three colours.",
    "What is 12 times 12?",
    "Give me a tip for sleeping well.",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
)


def greedy_reference(model: Path, provider: str, prompts: list[str], n: int) -> list[dict]:
    """Per prompt: greedy token ids and each step's top-two logit gap, one row, no scheduler."""
    engine = Engine.load(model, threads=2, provider=provider)
    try:
        runner = ModelRunner(
            model, threads=2, spinning=False, provider=provider, max_rows=1, max_len=1024
        )
        out = []
        for prompt in prompts:
            ids = engine._encode_messages([ChatTurn("user", prompt)])
            tokens, gaps = greedy_with_gaps(runner, ids, n, engine._eos_ids)
            out.append({"prompt": prompt, "tokens": tokens, "gaps": gaps})
        return out
    finally:
        engine.close()


def agreed_until_tie(mine: list[int], reference: dict, tie: float) -> tuple[int, int]:
    """(steps that must agree, steps that do): the reference's steps before its first gap
    under ``tie``, and how many of ``mine`` match it from the start."""
    must = next((i for i, g in enumerate(reference["gaps"]) if g < tie), len(reference["tokens"]))
    same = 0
    for a, b in zip(mine, reference["tokens"], strict=False):
        if a != b:
            break
        same += 1
    return must, same


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        failures.append(what)


def known_answer(model: Path, provider: str, failures: list[str]) -> str:
    answers = []
    for _ in range(2):
        engine = Engine.load(model, threads=2, provider=provider)
        answers.append(engine.known_answer)
        engine.close()
    check(answers[0] == answers[1], f"known answer stable across loads: {answers[0]}", failures)
    return answers[0]


def against_cpu(model: Path, provider: str, ref_python: str, failures: list[str]) -> None:
    prompts = list(KNOWN_ANSWER_PROMPTS)
    mine = greedy_reference(model, provider, prompts, KNOWN_ANSWER_NEW_TOKENS)
    script = Path(__file__).resolve()
    raw = subprocess.run(  # noqa: S603 (our own script, in the venv the wrapper names)
        [ref_python, str(script), "--reference-of", str(model)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cpu = json.loads(raw.strip().splitlines()[-1])
    for got, ref in zip(mine, cpu, strict=True):
        must, same = agreed_until_tie(got["tokens"], ref, CROSS_PROVIDER_TIE)
        check(same >= must, f"{provider} = cpu greedy for {must} steps (same: {same})", failures)


def batching(model: Path, provider: str, failures: list[str]) -> None:
    references = greedy_reference(model, provider, list(BATCH_PROMPTS), 24)
    engine = Engine.load(model, threads=2, provider=provider, max_batch=8)
    try:
        texts = [""] * len(BATCH_PROMPTS)

        def run(i: int) -> None:
            params = GenerationParams((ChatTurn("user", BATCH_PROMPTS[i]),), 24)
            items = list(engine.stream(params, lambda: False))
            texts[i] = "".join(x for x in items if isinstance(x, str))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(BATCH_PROMPTS))]
        with engine.hold_admission():
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while engine.scheduler.waiting() < len(threads) and time.monotonic() < deadline:
                time.sleep(0.005)
        for t in threads:
            t.join(timeout=300)
        for text, ref in zip(texts, references, strict=True):
            must, _ = agreed_until_tie(ref["tokens"], ref, SAME_PROVIDER_TIE)
            prefix = engine.decode(ref["tokens"][:must]).rstrip("\ufffd")
            check(text.startswith(prefix), f"batched = single stream: {ref['prompt']!r}", failures)
    finally:
        engine.close()


def service(model: Path, provider: str, known: str, failures: list[str]) -> float:
    from encloud.client import Client
    from encloud.protocol.policy import load_policy
    from encloud.server.devstack import ServerProcess, start_swtpm

    with tempfile.TemporaryDirectory(prefix="encloud-gpu-check-") as tmp:
        workdir = Path(tmp)
        swtpm = start_swtpm(workdir / "swtpm")
        server = ServerProcess(workdir, swtpm.tcti, model, provider=provider)
        try:
            address = server.start()
            policy = load_policy(server.policy_path)
            with Client(address, policy, audit_log=workdir / "audit.jsonl") as client:
                started = time.monotonic()
                attestation = client.attest()
                event = attestation.runtime_event
                check(event["settings"]["provider"] == provider, "event: provider", failures)
                check(event["engine"]["known_answer"] == known, "event: known answer", failures)
                client.release_key()
                first = None
                pieces = []
                for piece in client.stream([("user", "What is the capital of France?")]):
                    first = first or time.monotonic()
                    pieces.append(piece)
                check("Paris" in "".join(pieces), "encrypted answer names Paris", failures)
            check(server.terminate() == 0, "server drained and stopped", failures)
            return ((first or time.monotonic()) - started) * 1000
        finally:
            server.kill()
            swtpm.stop()


def speed(model: Path, provider: str) -> dict:
    engine = Engine.load(model, threads=2, provider=provider, max_batch=64)
    figures: dict = {}
    try:
        prompt = "Write a long story about a lighthouse keeper. " * 8

        def one(out: list, i: int) -> None:
            params = GenerationParams((ChatTurn("user", f"{i} {prompt}"),), 64)
            begun, first, count = time.monotonic(), None, 0
            for item in engine.stream(params, lambda: False):
                if isinstance(item, GenerationResult):
                    count = item.completion_tokens
                elif first is None:
                    first = time.monotonic()
            out.append((begun, first or begun, time.monotonic(), count))

        one([], -1)  # warm-up
        for streams in (1, 8, 16, 64):
            out: list = []
            threads = [threading.Thread(target=one, args=(out, i)) for i in range(streams)]
            begun = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - begun
            ttft = [(f - b) * 1000 for b, f, _, _ in out]
            row = {
                "ttft_ms_p50": round(statistics.median(ttft), 1),
                "ttft_ms_max": round(max(ttft), 1),
                "aggregate_tok_s": round(sum(c for *_, c in out) / wall, 1),
            }
            if streams == 1:
                _, f, e, c = out[0]
                row["decode_tok_s"] = round((c - 1) / (e - f), 1) if c > 1 else None
            figures[str(streams)] = row
        return figures
    finally:
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the fp16 (CUDA) export's folder")
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--reference-python", default=sys.executable)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--reference-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_of is not None:  # the CPU side of step 2, in the CPU venv
        prompts = list(KNOWN_ANSWER_PROMPTS)
        refs = greedy_reference(args.reference_of, "cpu", prompts, KNOWN_ANSWER_NEW_TOKENS)
        print(json.dumps(refs))
        return 0
    if args.model is None:
        parser.error("--model is required")
    failures: list[str] = []
    t0 = time.monotonic()
    print(f"model {args.model}, provider {args.provider}", flush=True)
    print("1. known answer")
    known = known_answer(args.model, args.provider, failures)
    print("2. against the CPU")
    against_cpu(args.model, args.provider, args.reference_python, failures)
    print("3. batching")
    batching(args.model, args.provider, failures)
    print("4. the service")
    to_first = service(args.model, args.provider, known, failures)
    print(f"  Attest request to first token: {to_first:.0f} ms")
    print("5. speed (64 new tokens per stream, prompts of ~100 tokens)")
    figures = speed(args.model, args.provider)
    print("| streams | TTFT p50 ms | TTFT max ms | aggregate tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    for streams, row in figures.items():
        decode = row.get("decode_tok_s", "")
        print(
            f"| {streams} | {row['ttft_ms_p50']} | {row['ttft_ms_max']} | "
            f"{row['aggregate_tok_s']} | {decode} |"
        )
    report = {
        "provider": args.provider,
        "known_answer": known,
        "attest_to_first_token_ms": round(to_first, 1),
        "speed": figures,
        "failures": failures,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "machine": os.uname().nodename,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'PASS' if not failures else 'FAIL'} in {report['elapsed_s']} s", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
