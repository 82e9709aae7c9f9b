"""`python -m bench [--quick] [--json PATH]`: measure, print the table, write the figures.

Modes: ``--quick`` (under 5 minutes on 2 cores), the default full mode, and ``--budget tiny``
(the smoke test's budget: seconds of measuring, figures too noisy to quote).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import BUDGETS, Bench, budget_dict
from bench.stats import figures_from_samples, goals, lookup

FIGURE_KEYS = (
    "decode_tok_s.encloud",
    "decode_tok_s.engine_plaintext",
    "decode_tok_s.llama_cpp",
    "ttft_ms.encloud",
    "ttft_ms.engine_plaintext",
    "ttft_ms.llama_cpp",
    "confidential_overhead_pct",
    "confidential_overhead_pct_paired",
    "handshake_ms.p50",
    "handshake_ms.p99",
    "handshake_ms_no_audit_sync.p50",
    "handshake_ms_xwing.p50",
    "verify_us.p50",
    "aggregate_tok_s.1",
    "aggregate_tok_s.4",
    "aggregate_tok_s.8",
    "aggregate_tok_s.16",
    "ttft_ms_p99.1",
    "ttft_ms_p99.4",
    "ttft_ms_p99.8",
    "ttft_ms_p99.16",
    "server_peak_rss_mb",
    "server_peak_rss_mb_after.8",
    "server_peak_rss_mb_after.16",
    "frame_seal_us",
    "frame_open_us",
    "perplexity.encloud",
    "perplexity.fp32",
    "perplexity.llama_cpp",
    "perplexity_2.encloud",
    "perplexity_2.fp32",
    "perplexity_2.llama_cpp",
    "open_loop.offered_tok_s",
    "open_loop.served_tok_s",
    "open_loop.ttft_ms_p50",
    "open_loop.ttft_ms_p99",
    "open_loop.itl_ms_p50",
    "open_loop.itl_ms_p99",
    "embeddings_per_s.encloud.1",
    "embeddings_per_s.in_process.1",
    "embeddings_per_s.encloud.32",
    "embeddings_per_s.in_process.32",
    "embeddings_confidential_overhead_pct.1",
    "embeddings_confidential_overhead_pct.32",
    "embeddings_confidential_overhead_pct_paired.1",
    "embeddings_confidential_overhead_pct_paired.32",
)
PEER_KEYS = frozenset(
    {
        "decode_tok_s.llama_cpp",
        "ttft_ms.llama_cpp",
        "perplexity.fp32",
        "perplexity.llama_cpp",
        "perplexity_2.fp32",
        "perplexity_2.llama_cpp",
    }
)
MEANINGS = {
    "decode_tok_s": "decode tok/s, batch 1 (median)",
    "ttft_ms": "time to first token, ms (median)",
    "confidential_overhead_pct": "100 x (1 - encloud / plaintext) decode tok/s",
    "confidential_overhead_pct_paired": "the same, median of per-round pairs (drift-robust)",
    "handshake_ms": "Attest + verify + ReleaseKey + key confirmation, ms, audit fsync",
    "handshake_ms_no_audit_sync": "the same, audit log not fsynced, ms",
    "handshake_ms_xwing": "the handshake with the post-quantum hybrid (X-Wing), audit fsync, ms",
    "verify_us": "verifier.verify of one quote, us",
    "aggregate_tok_s": "total tok/s, N concurrent sealed streams (median of rounds)",
    "ttft_ms_p99": "p99 time to first token at N streams, ms",
    "server_peak_rss_mb": "server VmHWM after one 1024-token-context stream, MB",
    "server_peak_rss_mb_after": "server VmHWM after the N-stream rounds (life's peak so far), MB",
    "frame_seal_us": "seal one token frame, us (median)",
    "frame_open_us": "open one token frame, us (median)",
    "perplexity": "teacher-forced, tests/data/heldout_prose.txt (first 512 tokens)",
    "perplexity_2": "teacher-forced, tests/data/heldout_prose_2.txt (first 2,048 tokens)",
    "open_loop": "Poisson arrivals at 75 % of the peak aggregate, seeded (offered/served "
    "tok/s; TTFT and inter-token latency, ms)",
    "embeddings_per_s": "all-MiniLM-L6-v2 embeddings/s, <peer>.<texts per request>, sequential "
    "requests, 32 held-out sentences (median of samples)",
    "embeddings_confidential_overhead_pct": "100 x (1 - encloud / in_process) embeddings/s, "
    "per texts per request",
    "embeddings_confidential_overhead_pct_paired": "the same, median of per-round pairs",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick mode (under 5 minutes)")
    parser.add_argument(
        "--budget", choices=sorted(BUDGETS), help="full (default), quick, or tiny (smoke test)"
    )
    parser.add_argument("--json", type=Path, help="write the figures and samples here")
    parser.add_argument(
        "--before",
        type=Path,
        help="a JSON report of an earlier run (e.g. the previous engine): the table shows it "
        "as a 'before' column, its figures recomputed from its samples",
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="skip llama.cpp and the fp32 reference"
    )
    parser.add_argument("--threads", type=int, default=2, help="engine threads, every engine")
    parser.add_argument(
        "--cache-root",
        type=Path,
        default=Path(os.environ.get("ENCLOUD_CACHE_ROOT", Path.home() / ".cache" / "encloud")),
    )
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra server setting (ENCLOUD_NAME=VALUE for the benchmark's server)",
    )
    args = parser.parse_args(argv)
    budget_name = args.budget or ("quick" if args.quick else "full")
    settings: dict[str, object] = {}
    for item in args.server_setting:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--server-setting wants NAME=VALUE, not {item!r}")
        settings[name] = value

    started = time.monotonic()
    load_before = os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    bench = Bench(
        BUDGETS[budget_name],
        peers=not args.no_peers,
        threads=args.threads,
        cache_root=args.cache_root,
        server_settings=settings,
        log=log,
    )
    results = bench.run()
    load_after = os.getloadavg()
    report = build_report(results, budget_name, args.threads, load_before, load_after)
    report["elapsed_s"] = time.monotonic() - started
    before = None
    if args.before is not None:
        before = json.loads(args.before.read_text(encoding="utf-8"))
        before.update(figures_from_samples(before["samples"]))
        before["goals"] = goals(before)
    print(render_markdown(report, before))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        log(f"wrote {args.json}")
    return 0


def build_report(
    results: Any,
    budget_name: str,
    threads: int,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> dict[str, Any]:
    figures = figures_from_samples(results.samples)
    reasons = dict(results.reasons)
    for key in FIGURE_KEYS:
        value = lookup(figures, key)
        if value is None and key not in reasons:
            reasons[key] = "no samples"
        if isinstance(value, float) and not math.isfinite(value):
            reasons.setdefault(key, "not finite")
    for key in list(reasons):
        if lookup_or_none(figures, key) is not None:
            del reasons[key]  # measured after all (a reason from a failed warm-up, say)
    report: dict[str, Any] = dict(figures)
    report["reasons"] = reasons
    report["goals"] = goals(figures)
    report["machine"] = machine(results.versions, threads, load_before, load_after)
    report["budget"] = {"mode": budget_name, **budget_dict(BUDGETS[budget_name])}
    report["notes"] = results.notes
    report["samples"] = results.samples
    return report


def lookup_or_none(figures: dict[str, Any], key: str) -> Any:
    try:
        return lookup(figures, key)
    except (KeyError, TypeError):
        return None


def machine(
    engine_versions: dict[str, str],
    threads: int,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for package in (
        "onnxruntime-genai",
        "onnxruntime",
        "llama-cpp-python",
        "grpcio",
        "cryptography",
        "protobuf",
        "numpy",
        "tokenizers",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions.update({k: v for k, v in engine_versions.items() if k != "system_info"})
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "threads_per_engine": threads,
        "versions": versions,
        "llama_cpp_system_info": engine_versions.get("system_info"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def render_markdown(report: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """The table; with ``before`` (an earlier run's report), a "before" column beside it."""
    m = report["machine"]
    head = "| key | before | after | meaning |" if before else "| key | value | meaning |"
    lines = [
        f"encloud benchmark, {report['budget']['mode']} mode: {m['cpu']}, {m['cores']} cores, "
        f"{m['threads_per_engine']} threads per engine; load average "
        f"{m['load_average_before'][0]} before, {m['load_average_after'][0]} after",
        "",
        head,
        "|---|---|---|---|" if before else "|---|---|---|",
    ]
    for key in FIGURE_KEYS:
        shown = _shown(report, key)
        meaning = MEANINGS.get(key.split(".")[0], "")
        earlier = f" {_shown(before, key)} |" if before else ""
        lines.append(f"| `{key}` |{earlier} {shown} | {meaning} |")
    lines += ["", "| goal | value | met |", "|---|---|---|"]
    for goal in report["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {_fmt(goal['value'])} (`{goal['figure']}`) | {met} |")
    return "\n".join(lines)


def _shown(report: dict[str, Any], key: str) -> str:
    try:
        value = lookup(report, key)
    except (KeyError, TypeError):
        return "not in this report"
    if value is None:
        return f"null ({report.get('reasons', {}).get(key, 'no reason')})"
    return _fmt(value)
