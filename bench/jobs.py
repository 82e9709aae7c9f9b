"""`python -m bench.jobs`: batch-job throughput against the same records sent interactively.

One server on the embedded model and swtpm, fetching job keys from a Sentinel in this process
(encloud.cli.demo.batch_stack). The same `--records` chat requests (each its own seed,
`--max-new-tokens`, temperature 0.8) run three ways, each at its best on this machine:

- job:         one RunJob call (job_concurrency records at once, sealed input and answers,
               the Sentinel release, the journal and the answers file included);
- one by one:  one attested Client, Infer after Infer;
- concurrent:  `--concurrency` attested Clients, each with its share of the records at once.

Reports records/s and completion tokens/s (wall time of each run), writes JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from encloud.cli.demo import BatchStack, batch_stack, cache_root
from encloud.client import Client
from encloud.client.jobs import JobClient
from encloud.protocol import job
from encloud.protocol.policy import load_policy
from encloud.server.inference.export import DEFAULT_PRECISION, export_model

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["tides", "bread", "owls", "granite", "violins", "comets", "moss", "glaciers", "ink"]


def _records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Say one short fact about {TOPICS[i % 9]} (#{i})."}
            ],
            "seed": i,
        }
        for i in range(n)
    ]


def _run_job(stack: BatchStack, records: list[dict[str, Any]], params: dict[str, Any]) -> int:
    key_id, key = f"owner/bench-{os.urandom(4).hex()}", os.urandom(32)
    signing = Ed25519PrivateKey.generate()
    with stack.owner() as owner:
        owner.add_signing_key(signing.public_key().public_bytes_raw())
        owner.create_key(key_id, stack.policy_bytes, key)
    prepared = job.prepare_job(
        records,
        key,
        key_id,
        model_digest=stack.model_digest,
        params=params,
        output=f"bench-{os.urandom(4).hex()}.sealed",
        ttl_seconds=3600,
        signing_key=signing,
    )
    with JobClient(stack.address, timeout=3600) as client:
        result = client.run(
            prepared.signed_manifest, io.BytesIO(prepared.sealed_input), io.BytesIO()
        )
    return result.completion_tokens


def _interactive(
    stack: BatchStack, records: list[dict[str, Any]], params: dict[str, Any], audit: Path
) -> int:
    policy = load_policy(stack.server.policy_path)
    with Client(stack.address, policy, audit_log=audit) as client:
        client.attest()
        client.release_key()
        return sum(
            client.infer(r["messages"], seed=r["seed"], **params).completion.completion_tokens
            for r in records
        )


def _measure(name: str, run: Any) -> dict[str, Any]:
    started = time.monotonic()
    tokens = run()
    seconds = time.monotonic() - started
    return {"way": name, "seconds": round(seconds, 2), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__)
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "jobs.json")
    args = parser.parse_args(argv)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.8}
    records = _records(args.records)
    model_dir = export_model(None, cache_root(), DEFAULT_PRECISION)
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        workdir = Path(tmp)
        with batch_stack(workdir, model_dir, job_concurrency=args.concurrency) as stack:
            audit = workdir / "audit.jsonl"
            _interactive(stack, records[:2], params, audit)  # warm the engine up
            rows = [_measure("job", lambda: _run_job(stack, records, params))]
            rows.append(_measure("one by one", lambda: _interactive(stack, records, params, audit)))
            shares = [records[i :: args.concurrency] for i in range(args.concurrency)]
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                rows.append(
                    _measure(
                        f"concurrent x{args.concurrency}",
                        lambda: sum(
                            pool.map(lambda s: _interactive(stack, s, params, audit), shares)
                        ),
                    )
                )
    for row in rows:
        row["records_per_second"] = round(args.records / row["seconds"], 2)
        row["tokens_per_second"] = round(row["tokens"] / row["seconds"], 1)
    print(f"{'way':<16}{'seconds':>9}{'records/s':>11}{'tokens':>8}{'tokens/s':>10}")
    for row in rows:
        print(
            f"{row['way']:<16}{row['seconds']:>9}{row['records_per_second']:>11}"
            f"{row['tokens']:>8}{row['tokens_per_second']:>10}"
        )
    report = {
        "records": args.records,
        "params": params,
        "concurrency": args.concurrency,
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
