"""`python -m bench.sentinel`: Sentinel's key-release latency on SQLite and PostgreSQL.

A workload on a real swtpm asks a real Sentinel (in this process, on loopback, TLS) for a
key, `--releases` times one after the other, then `--concurrency` requests at once. Each
sample is split: GetChallenge (a database insert), the workload's vTPM quote, and ReleaseKey
(Sentinel's checks: nonce, order, evidence against the key's policy, the transaction that
marks the order used, HPKE to the workload; with the workload's key pair and opening). The
PostgreSQL run creates its own cluster with Debian's pg_createcluster (tests/postgres.py);
figures are nearest-rank percentiles (encloud.cli.stats). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from encloud.cli.stats import percentile

ROOT = Path(__file__).resolve().parent.parent


def _pki(folder: Path) -> dict[str, Path]:
    """A CA, Sentinel's certificate and one owner's (the same builder the tests use)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pki import issue_certificate  # type: ignore[import-not-found]

    ca = issue_certificate("bench CA", None, ca=True)
    paths = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(ca[0])
    for name in ("sentinel", "owner"):
        cert, key = issue_certificate(name, ca, server=name == "sentinel")
        (folder / f"{name}.pem").write_bytes(cert)
        (folder / f"{name}.key").write_bytes(key)
        paths[name], paths[f"{name}_key"] = folder / f"{name}.pem", folder / f"{name}.key"
    return paths


@contextlib.contextmanager
def _database(kind: str, folder: Path) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from postgres import postgres_cluster  # type: ignore[import-not-found]

    with postgres_cluster(folder) as cluster:
        yield cluster.url


def run_one(kind: str, releases: int, concurrency: int, workload: Any) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from encloud.broker.app import init_state, start
    from encloud.broker.servicer import certificate_spki_sha256
    from encloud.broker.settings import SentinelSettings
    from encloud.broker.store import Store, make_engine
    from encloud.client.sentinel import OwnerClient, WorkloadClient
    from encloud.protocol.release_order import new_order, sign_order

    model = bytes.fromhex(workload.model_hex)
    with tempfile.TemporaryDirectory() as tmp, _database(kind, Path(tmp)) as url:
        folder = Path(tmp)
        pki = _pki(folder)
        settings = SentinelSettings(
            state_dir=folder / "state",
            database_url=url,
            owner_listen="127.0.0.1:0",
            workload_listen="127.0.0.1:0",
            tls_cert=pki["sentinel"],
            tls_key=pki["sentinel_key"],
            client_ca=pki["ca"],
            accept_dev_policies=True,  # the swtpm workload's own policy
        )
        init_state(settings)
        engine = make_engine(settings.resolved_database_url())
        Store(engine).add_owner("owner", certificate_spki_sha256(pki["owner"].read_bytes()))
        engine.dispose()
        running = start(settings)
        try:
            signing = Ed25519PrivateKey.generate()
            owner = OwnerClient(
                f"127.0.0.1:{running.owner_port}",
                ca_pem=pki["ca"].read_bytes(),
                cert_pem=pki["owner"].read_bytes(),
                key_pem=pki["owner_key"].read_bytes(),
            )
            with owner:
                owner.add_signing_key(signing.public_key().public_bytes_raw())
                owner.create_key("owner/bench", workload.policy, os.urandom(32))
            target = f"127.0.0.1:{running.workload_port}"

            def release() -> dict[str, float]:
                order = sign_order(new_order("owner/bench", model, 600), signing)
                quoted: list[float] = []

                def quote(q: bytes) -> Any:
                    started = time.perf_counter()
                    try:
                        return workload.quote(q)
                    finally:
                        quoted.append(time.perf_counter() - started)

                with WorkloadClient(target, ca_pem=pki["ca"].read_bytes()) as client:
                    # The channel's TLS handshake, outside the figures.
                    grpc.channel_ready_future(client._channel).result(timeout=10)
                    started = time.perf_counter()
                    nonce = client.challenge()
                    challenged = time.perf_counter()
                    client.release_key(order, quote, nonce=nonce).wipe()
                    done = time.perf_counter()
                return {
                    "challenge_s": challenged - started,
                    "quote_s": quoted[0],
                    # ReleaseKey itself: Sentinel's checks, its transaction and HPKE seal, plus
                    # the workload's X-Wing key pair and opening (the quote taken out).
                    "release_s": done - challenged - quoted[0],
                    "total_s": done - started,
                }

            release()  # warm-up: connections, the policy parse path
            sequential = [release() for _ in range(releases)]
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
                burst = list(pool.map(lambda _: release(), range(concurrency)))
            burst_seconds = time.perf_counter() - started
        finally:
            running.stop()
    return {
        "database": kind,
        "sequential": sequential,
        "concurrent": burst,
        "concurrent_wall_s": burst_seconds,
    }


def figures(run: dict[str, Any]) -> dict[str, float | None]:
    def ms(samples: list[dict[str, float]], field: str, p: float) -> float | None:
        value = percentile([s[field] for s in samples], p)
        return None if value is None else round(value * 1000, 2)

    seq, burst = run["sequential"], run["concurrent"]
    return {
        "release_p50_ms": ms(seq, "release_s", 50),
        "release_p99_ms": ms(seq, "release_s", 99),
        "challenge_p50_ms": ms(seq, "challenge_s", 50),
        "quote_p50_ms": ms(seq, "quote_s", 50),
        "total_p50_ms": ms(seq, "total_s", 50),
        "total_p99_ms": ms(seq, "total_s", 99),
        "concurrent_total_p50_ms": ms(burst, "total_s", 50),
        "concurrent_total_p99_ms": ms(burst, "total_s", 99),
        "concurrent_releases_per_s": round(len(burst) / run["concurrent_wall_s"], 1),
    }


@contextlib.contextmanager
def _workload(folder: Path) -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from sentinel_support import MODEL, attested_workload  # type: ignore[import-not-found]

    generator = attested_workload(folder, MODEL)
    workload = next(generator)
    workload.model_hex = MODEL.hex()
    try:
        yield workload
    finally:
        generator.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sentinel", description=__doc__)
    parser.add_argument("--releases", type=int, default=200, help="sequential releases per DB")
    parser.add_argument("--concurrency", type=int, default=32, help="releases at once")
    parser.add_argument(
        "--databases", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sentinel.json")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": os.uname().machine, "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp, _workload(Path(tmp)) as workload:
        for kind in args.databases.split(","):
            run = run_one(kind, args.releases, args.concurrency, workload)
            run["figures"] = figures(run)
            report["runs"].append(run)
    print(f"{'database':<12}{'figure':<28}{'value':>10}")
    for run in report["runs"]:
        for name, value in run["figures"].items():
            print(f"{run['database']:<12}{name:<28}{value!s:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(f"samples and figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
