"""Soak: run the bounded load against a fresh local server for a while and report
the server's memory growth. Not in CI (10 minutes by default).

    .venv/bin/python scripts/soak.py --minutes 10 --clients 16 --max-new-tokens 16

Starts swtpm and a real server process in a private temporary folder, runs the
load generator in rounds until the time is up, samples the server's RSS
(/proc/PID/status VmRSS) after each round, and prints a JSON summary: RSS after
warm-up, at the end, the growth, and the load figures of the last round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from encloud.cli.loadgen import run_load
from encloud.client import NO_AUDIT
from encloud.protocol.policy import load_policy
from encloud.server.devstack import ServerProcess, start_swtpm
from encloud.server.inference.export import DEFAULT_PRECISION, export_model


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description="encloud soak test")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client and round")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    cache = Path(os.environ.get("ENCLOUD_CACHE_ROOT", Path.home() / ".cache" / "encloud"))
    model_dir = export_model(None, cache, DEFAULT_PRECISION, progress=lambda _: None)
    with tempfile.TemporaryDirectory(prefix="encloud-soak-") as tmp:
        root = Path(tmp)
        swtpm = start_swtpm(root / "swtpm")
        # All soak clients are one peer (127.0.0.1): its quotas are the global ones here.
        server = ServerProcess(
            root,
            swtpm.tcti,
            model_dir,
            attest_burst=1024,
            max_pending_sessions_per_peer=64,
            max_sessions_per_peer=256,
            max_queued_requests_per_peer=128,
        )
        try:
            address = server.start()
            assert server.process is not None
            pid = server.process.pid
            policy = load_policy(server.policy_path)
            deadline = time.monotonic() + args.minutes * 60
            samples: list[tuple[float, int]] = []
            rounds = requests = 0
            errors: dict[str, int] = {}
            started = time.monotonic()
            last: dict[str, object] = {}
            while time.monotonic() < deadline:
                report = asyncio.run(
                    run_load(
                        address,
                        policy,
                        clients=args.clients,
                        requests_per_client=args.requests,
                        max_new_tokens=args.max_new_tokens,
                        duration_seconds=max(1.0, deadline - time.monotonic()),
                        audit_log=NO_AUDIT,
                    )
                )
                rounds += 1
                requests += len(report.results)
                for code, count in report.errors.items():
                    errors[code] = errors.get(code, 0) + count
                last = report.summary()
                samples.append((time.monotonic() - started, rss_kib(pid)))
                print(f"round {rounds}: rss {samples[-1][1] / 1024:.1f} MiB", file=sys.stderr)
            warm = samples[0][1] if samples else 0
            end = samples[-1][1] if samples else 0
            print(
                json.dumps(
                    {
                        "minutes": args.minutes,
                        "rounds": rounds,
                        "requests": requests,
                        "errors": errors,
                        "rss_after_first_round_mib": round(warm / 1024, 1),
                        "rss_end_mib": round(end / 1024, 1),
                        "growth_mib": round((end - warm) / 1024, 1),
                        "max_rss_mib": round(max(s for _, s in samples) / 1024, 1)
                        if samples
                        else 0,
                        "last_round": last,
                    },
                    indent=2,
                )
            )
            return 0 if not errors else 1
        finally:
            server.terminate()
            swtpm.stop()


if __name__ == "__main__":
    raise SystemExit(main())
