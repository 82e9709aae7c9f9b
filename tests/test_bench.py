"""Smoke test of the benchmark harness (issue 8): a tiny budget, no peers, no speed asserted.

It runs `python -m bench` as a user would (a real swtpm, a real server on loopback, the
exported model), then checks the JSON: every key present, every peer figure a number or null
with a reason, every figure recomputed here from `samples` (independently of bench.stats) and
equal to what the harness reported, the confidential overhead finite. The embeddings figures
are numbers or null with a reason (numbers wherever the embedding model's package is installed).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.stats import GOALS

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent

ENGINES = ("encloud", "engine_plaintext", "llama_cpp")
LEVELS = ("1", "4", "8", "16")
EMBED_PEERS = ("encloud", "in_process")
EMBED_BATCHES = ("1", "32")
EMBEDDINGS_KEYS = (
    [f"embeddings_per_s.{p}.{n}" for p in EMBED_PEERS for n in EMBED_BATCHES]
    + [f"embeddings_confidential_overhead_pct.{n}" for n in EMBED_BATCHES]
    + [f"embeddings_confidential_overhead_pct_paired.{n}" for n in EMBED_BATCHES]
)
PEER_KEYS = {
    "decode_tok_s.llama_cpp",
    "ttft_ms.llama_cpp",
    "perplexity.fp32",
    "perplexity.llama_cpp",
    "perplexity_2.fp32",
    "perplexity_2.llama_cpp",
}
KEYS = (
    [f"decode_tok_s.{e}" for e in ENGINES]
    + [f"ttft_ms.{e}" for e in ENGINES]
    + ["confidential_overhead_pct", "confidential_overhead_pct_paired"]
    + ["handshake_ms.p50", "handshake_ms.p99"]
    + ["handshake_ms_no_audit_sync.p50", "handshake_ms_xwing.p50", "verify_us.p50"]
    + [f"aggregate_tok_s.{n}" for n in LEVELS]
    + [f"ttft_ms_p99.{n}" for n in LEVELS]
    + ["server_peak_rss_mb", "frame_seal_us", "frame_open_us"]
    + ["server_peak_rss_mb_after.8", "server_peak_rss_mb_after.16"]
    + [f"{k}.{m}" for k in ("perplexity", "perplexity_2") for m in ("encloud", "fp32", "llama_cpp")]
    + [
        f"open_loop.{k}"
        for k in (
            "offered_tok_s",
            "served_tok_s",
            "ttft_ms_p50",
            "ttft_ms_p99",
            "itl_ms_p50",
            "itl_ms_p99",
        )
    ]
    + EMBEDDINGS_KEYS
)


def _get(report: dict[str, Any], key: str) -> Any:
    value: Any = report
    for part in key.split("."):
        assert isinstance(value, dict) and part in value, f"missing key {key}"
        value = value[part]
    return value


def _nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def _recompute(samples: dict[str, Any]) -> dict[str, float | None]:
    """Every figure from the raw samples, by the definitions in docs/PERFORMANCE.md."""
    out: dict[str, float | None] = {}
    for engine in ENGINES:
        runs = samples["decode"][engine]
        rates = [(r["tokens"] - 1) / r["decode_s"] for r in runs if r["tokens"] > 1]
        out[f"decode_tok_s.{engine}"] = statistics.median(rates) if rates else None
        ttfts = [r["ttft_ms"] for r in runs]
        out[f"ttft_ms.{engine}"] = statistics.median(ttfts) if ttfts else None
    enc, plain = out["decode_tok_s.encloud"], out["decode_tok_s.engine_plaintext"]
    out["confidential_overhead_pct"] = 100 * (1 - enc / plain) if enc and plain else None
    plain_rounds = {
        r["round"]: (r["tokens"] - 1) / r["decode_s"] for r in samples["decode"]["engine_plaintext"]
    }
    paired = [
        100 * (1 - (r["tokens"] - 1) / r["decode_s"] / plain_rounds[r["round"]])
        for r in samples["decode"]["encloud"]
        if r["round"] in plain_rounds
    ]
    out["confidential_overhead_pct_paired"] = statistics.median(paired)
    out["handshake_ms.p50"] = _nearest_rank(samples["handshake_ms"], 50)
    out["handshake_ms.p99"] = _nearest_rank(samples["handshake_ms"], 99)
    out["handshake_ms_no_audit_sync.p50"] = _nearest_rank(samples["handshake_ms_no_audit_sync"], 50)
    out["handshake_ms_xwing.p50"] = _nearest_rank(samples["handshake_ms_xwing"], 50)
    out["verify_us.p50"] = _nearest_rank(samples["verify_us"], 50)
    for level in LEVELS:
        rounds = samples["concurrency"][level]
        totals = [sum(s["tokens"] for s in r["streams"]) / r["wall_s"] for r in rounds]
        out[f"aggregate_tok_s.{level}"] = statistics.median(totals)
        ttfts = [s["ttft_ms"] for r in rounds for s in r["streams"]]
        out[f"ttft_ms_p99.{level}"] = _nearest_rank(ttfts, 99)
    loop = samples["open_loop"]
    streams = loop["streams"]
    out["open_loop.offered_tok_s"] = len(streams) * loop["new_tokens"] / loop["duration_s"]
    first_arrival = min(s["arrival_s"] for s in streams)
    last_end = max(s["end_s"] for s in streams)
    out["open_loop.served_tok_s"] = sum(s["tokens"] for s in streams) / (last_end - first_arrival)
    out["open_loop.ttft_ms_p50"] = _nearest_rank([s["ttft_ms"] for s in streams], 50)
    out["open_loop.ttft_ms_p99"] = _nearest_rank([s["ttft_ms"] for s in streams], 99)
    itls = [1000 * s["decode_s"] / (s["tokens"] - 1) for s in streams if s["tokens"] > 1]
    out["open_loop.itl_ms_p50"] = _nearest_rank(itls, 50)
    out["open_loop.itl_ms_p99"] = _nearest_rank(itls, 99)
    out["server_peak_rss_mb"] = samples["server_rss"]["vmhwm_kb"] / 1024
    for level in ("8", "16"):
        out[f"server_peak_rss_mb_after.{level}"] = samples["concurrency_vmhwm_kb"][level] / 1024
    embeddings = samples["embeddings"]
    for n in EMBED_BATCHES:
        for peer in EMBED_PEERS:
            rates = [s["texts"] / s["seconds"] for s in embeddings[peer][n]]
            out[f"embeddings_per_s.{peer}.{n}"] = statistics.median(rates) if rates else None
        enc, plain = out[f"embeddings_per_s.encloud.{n}"], out[f"embeddings_per_s.in_process.{n}"]
        out[f"embeddings_confidential_overhead_pct.{n}"] = (
            100 * (1 - enc / plain) if enc and plain else None
        )
        plain_rounds = {s["round"]: s["texts"] / s["seconds"] for s in embeddings["in_process"][n]}
        paired = [
            100 * (1 - s["texts"] / s["seconds"] / plain_rounds[s["round"]])
            for s in embeddings["encloud"][n]
            if s["round"] in plain_rounds
        ]
        out[f"embeddings_confidential_overhead_pct_paired.{n}"] = (
            statistics.median(paired) if paired else None
        )
    out["frame_seal_us"] = statistics.median(samples["frame_seal_us"])
    out["frame_open_us"] = statistics.median(samples["frame_open_us"])
    for key in ("perplexity", "perplexity_2"):
        for model in ("encloud", "fp32", "llama_cpp"):
            entry = samples[key].get(model)
            out[f"{key}.{model}"] = (
                math.exp(entry["nll_sum"] / entry["predicted"]) if entry else None
            )
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {**os.environ, "TSS2_LOG": "all+NONE", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--budget", "tiny", "--no-peers", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| `decode_tok_s.encloud` |" in result.stdout  # the table was printed
    return json.loads(out.read_text())


def test_every_key_present_and_peers_number_or_null_with_reason(report: dict[str, Any]) -> None:
    for key in KEYS:
        value = _get(report, key)
        if key in PEER_KEYS or key in EMBEDDINGS_KEYS:
            assert value is None or isinstance(value, (int, float)), key
            if value is None:
                assert report["reasons"].get(key), f"{key} is null without a reason"
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value), (
                key,
                value,
                report["reasons"].get(key),
            )
    for key in PEER_KEYS - {"perplexity.fp32", "perplexity_2.fp32"}:  # --no-peers: no llama.cpp
        assert _get(report, key) is None
    assert "samples" in report and "machine" in report


def test_every_figure_recomputed_from_samples(report: dict[str, Any]) -> None:
    recomputed = _recompute(report["samples"])
    for key in KEYS:
        reported, again = _get(report, key), recomputed[key]
        if reported is None:
            assert again is None, key
        else:
            assert again is not None and math.isclose(reported, again, rel_tol=1e-9), (
                key,
                reported,
                again,
            )


def test_overhead_finite_and_samples_sized_by_budget(report: dict[str, Any]) -> None:
    assert math.isfinite(report["confidential_overhead_pct"])  # may be negative
    budget = report["budget"]
    assert budget["mode"] == "tiny"
    assert len(report["samples"]["handshake_ms"]) == budget["handshake_runs"]
    assert len(report["samples"]["decode"]["encloud"]) == budget["decode_runs"]
    assert report["samples"]["server_rss"]["context_tokens"] <= budget["rss_context"]
    for level in LEVELS:
        rounds = report["samples"]["concurrency"][level]
        assert len(rounds) == budget["conc_rounds"]
        assert all(len(r["streams"]) == int(level) for r in rounds)


def test_embeddings_measured_where_the_model_is_installed(report: dict[str, Any]) -> None:
    """Numbers or null with a reason (checked above); with the model's package installed (the
    dev environment), numbers, one sample per round for each peer and batch size, both peers
    embedding the same tokens, and the same vectors."""
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("the embedding model's package is not installed here")
    for key in EMBEDDINGS_KEYS:
        value = _get(report, key)
        assert isinstance(value, (int, float)) and math.isfinite(value), (
            key,
            value,
            report["reasons"].get(key),
        )
    budget = report["budget"]
    notes = report["notes"]["embeddings"]
    assert notes["texts"] == 32 and notes["mean_tokens_per_text"] > 2
    assert notes["max_abs_diff_encloud_vs_in_process"] < 1e-3
    embeddings = report["samples"]["embeddings"]
    for n in EMBED_BATCHES:
        for peer in EMBED_PEERS:
            samples = embeddings[peer][n]
            assert len(samples) == budget["embed_rounds"], (peer, n)
            assert all(s["texts"] == 32 * budget["embed_passes"] for s in samples)
            assert all(s["requests"] == s["texts"] // int(n) for s in samples)
        assert [s["tokens"] for s in embeddings["encloud"][n]] == [
            s["tokens"] for s in embeddings["in_process"][n]
        ]


def test_machine_names_cpu_cores_and_engine_versions(report: dict[str, Any]) -> None:
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    for package in ("onnxruntime-genai", "onnxruntime", "llama-cpp-python", "python"):
        assert package in machine["versions"]
    assert len(machine["load_average_before"]) == 3


def test_goals_listed_with_their_figures(report: dict[str, Any]) -> None:
    names = [g["goal"] for g in report["goals"]]
    assert len(names) == len(GOALS)
    for goal in report["goals"]:
        assert goal["met"] in (True, False, None)
        if goal["value"] is None:
            assert goal["met"] is None


def test_a_before_column_from_an_earlier_report(report: dict[str, Any]) -> None:
    from bench.cli import render_markdown

    table = render_markdown(report, report)
    assert "| key | before | after | meaning |" in table
    row = next(line for line in table.splitlines() if line.startswith("| `decode_tok_s.encloud`"))
    assert row.count("|") == 5


def test_the_job_benchmark_runs_and_reports_each_way(tmp_path: Path) -> None:
    """`python -m bench.jobs` on two records: every way reported with its figures (no speed
    is asserted; the same records give the same tokens each way)."""
    out = tmp_path / "jobs.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.jobs",
            "--records",
            "2",
            "--max-new-tokens",
            "3",
            "--concurrency",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    ways = [row["way"] for row in report["rows"]]
    assert ways == ["job", "one by one", "concurrent x2"]
    assert len({row["tokens"] for row in report["rows"]}) == 1
    for row in report["rows"]:
        assert row["seconds"] > 0 and row["records_per_second"] > 0
