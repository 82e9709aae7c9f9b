"""The statistics every figure is computed with, and the recomputation from samples.

A figure is never measured directly: the harness records raw samples, and
:func:`figures_from_samples` derives every figure from them. The smoke test
recomputes them the same way, so a table cannot disagree with its samples.

- median: :func:`statistics.median` (mean of the two middle values for an even count);
- p50 / p99: nearest rank, the smallest sample with at least p % of the samples at or below it;
- decode tok/s of one run: (completion tokens - 1) / (time of the last token - time of the
  first), so time to first token is excluded from decode speed;
- perplexity: exp(sum of negative log-likelihoods / number of predicted tokens);
- embeddings/s of one sample: texts embedded / seconds of the sample (``embed_passes`` passes
  over the texts, at 1 or 32 texts per request).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from encloud.cli.stats import percentile  # the one percentile of the project's tools

ENGINES = ("encloud", "engine_plaintext", "llama_cpp")
PPL_MODELS = ("encloud", "fp32", "llama_cpp")
LEVELS = ("1", "4", "8", "16")
EMBED_PEERS = ("encloud", "in_process")
EMBED_BATCHES = ("1", "32")


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def decode_rate(run: Mapping[str, Any]) -> float | None:
    """Decode tokens/s of one run: tokens after the first over the time after the first."""
    tokens, seconds = int(run["tokens"]), float(run["decode_s"])
    if tokens < 2 or seconds <= 0:
        return None
    return (tokens - 1) / seconds


def embeddings_rate(sample: Mapping[str, Any]) -> float | None:
    """Embeddings/s of one sample: texts over seconds."""
    seconds = float(sample["seconds"])
    return int(sample["texts"]) / seconds if seconds > 0 else None


def embeddings_figures(samples: Mapping[str, Any] | None) -> dict[str, Any]:
    """Embeddings/s per peer and texts per request (median of samples), and the confidential
    overhead per texts per request: 100 x (1 - encloud / in_process), the ratio of the two
    medians, and the same ratio per round, then the median (as the chat overhead)."""
    samples = samples or {}
    per_s: dict[str, dict[str, float | None]] = {}
    for peer in EMBED_PEERS:
        by_batch = samples.get(peer) or {}
        per_s[peer] = {}
        for n in EMBED_BATCHES:
            rates = [r for r in (embeddings_rate(s) for s in by_batch.get(n) or []) if r]
            per_s[peer][n] = median(rates)
    overhead: dict[str, float | None] = {}
    paired: dict[str, float | None] = {}
    for n in EMBED_BATCHES:
        enc, plain = per_s["encloud"][n], per_s["in_process"][n]
        overhead[n] = 100.0 * (1.0 - enc / plain) if enc is not None and plain else None
        plain_by_round = {
            s["round"]: embeddings_rate(s) for s in (samples.get("in_process") or {}).get(n) or []
        }
        pairs = []
        for s in (samples.get("encloud") or {}).get(n) or []:
            enc_rate, plain_rate = embeddings_rate(s), plain_by_round.get(s["round"])
            if enc_rate is not None and plain_rate:
                pairs.append(100.0 * (1.0 - enc_rate / plain_rate))
        paired[n] = median(pairs)
    return {
        "embeddings_per_s": per_s,
        "embeddings_confidential_overhead_pct": overhead,
        "embeddings_confidential_overhead_pct_paired": paired,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def figures_from_samples(samples: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure of the table, from the raw samples only."""
    out: dict[str, Any] = {}
    decode = samples.get("decode", {})
    out["decode_tok_s"] = {}
    out["ttft_ms"] = {}
    for engine in ENGINES:
        runs = decode.get(engine) or []
        rates = [r for r in (decode_rate(run) for run in runs) if r is not None]
        out["decode_tok_s"][engine] = median(rates)
        out["ttft_ms"][engine] = median([float(run["ttft_ms"]) for run in runs])

    enc, plain = out["decode_tok_s"]["encloud"], out["decode_tok_s"]["engine_plaintext"]
    out["confidential_overhead_pct"] = (
        100.0 * (1.0 - enc / plain) if enc is not None and plain else None
    )

    # The same ratio per round (encloud and plaintext run back to back in each round), then
    # the median: less exposed to load that drifts between rounds than the ratio of medians.
    plain_by_round = {
        run["round"]: decode_rate(run) for run in decode.get("engine_plaintext") or []
    }
    paired = []
    for run in decode.get("encloud") or []:
        enc_rate, plain_rate = decode_rate(run), plain_by_round.get(run["round"])
        if enc_rate is not None and plain_rate:
            paired.append(100.0 * (1.0 - enc_rate / plain_rate))
    out["confidential_overhead_pct_paired"] = median(paired)

    hs = [float(x) for x in samples.get("handshake_ms", [])]
    out["handshake_ms"] = {"p50": percentile(hs, 50), "p99": percentile(hs, 99)}
    hs_ns = [float(x) for x in samples.get("handshake_ms_no_audit_sync", [])]
    out["handshake_ms_no_audit_sync"] = {"p50": percentile(hs_ns, 50)}
    hs_xw = [float(x) for x in samples.get("handshake_ms_xwing", [])]
    out["handshake_ms_xwing"] = {"p50": percentile(hs_xw, 50)}
    out["verify_us"] = {"p50": percentile([float(x) for x in samples.get("verify_us", [])], 50)}

    conc = samples.get("concurrency", {})
    out["aggregate_tok_s"] = {}
    out["ttft_ms_p99"] = {}
    for level in LEVELS:
        rounds = conc.get(level) or []
        totals = [
            sum(s["tokens"] for s in rnd["streams"]) / rnd["wall_s"]
            for rnd in rounds
            if rnd["wall_s"] > 0
        ]
        ttfts = [float(s["ttft_ms"]) for rnd in rounds for s in rnd["streams"]]
        out["aggregate_tok_s"][level] = median(totals)
        out["ttft_ms_p99"][level] = percentile(ttfts, 99)

    out["open_loop"] = open_loop_figures(samples.get("open_loop"))
    hwm_by_level = samples.get("concurrency_vmhwm_kb") or {}
    out["server_peak_rss_mb_after"] = {
        level: (hwm_by_level[level] / 1024.0 if hwm_by_level.get(level) else None)
        for level in ("8", "16")
    }

    rss = samples.get("server_rss") or {}
    hwm = rss.get("vmhwm_kb")
    out["server_peak_rss_mb"] = hwm / 1024.0 if hwm is not None else None

    out.update(embeddings_figures(samples.get("embeddings")))

    out["frame_seal_us"] = median([float(x) for x in samples.get("frame_seal_us", [])])
    out["frame_open_us"] = median([float(x) for x in samples.get("frame_open_us", [])])

    for key in ("perplexity", "perplexity_2"):
        ppl = samples.get(key, {})
        out[key] = {}
        for model in PPL_MODELS:
            entry = ppl.get(model)
            out[key][model] = (
                math.exp(entry["nll_sum"] / entry["predicted"])
                if entry and entry.get("predicted")
                else None
            )

    out["ratios"] = {
        "decode_encloud_over_llama_cpp": _ratio(
            out["decode_tok_s"]["encloud"], out["decode_tok_s"]["llama_cpp"]
        ),
        "ttft_encloud_over_llama_cpp": _ratio(
            out["ttft_ms"]["encloud"], out["ttft_ms"]["llama_cpp"]
        ),
        "aggregate_8_over_1": _ratio(out["aggregate_tok_s"]["8"], out["aggregate_tok_s"]["1"]),
        "perplexity_over_llama_cpp": _ratio(
            out["perplexity"]["encloud"], out["perplexity"]["llama_cpp"]
        ),
        "perplexity_2_over_llama_cpp": _ratio(
            out["perplexity_2"]["encloud"], out["perplexity_2"]["llama_cpp"]
        ),
    }
    return out


def open_loop_figures(sample: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Offered load (arrivals x tokens over the arrival window), served throughput (tokens
    over the time from the first arrival to the last answer), TTFT and inter-token latency
    (per stream: decode time over tokens after the first) p50/p99."""
    keys = ("offered_tok_s", "served_tok_s", "ttft_ms_p50", "ttft_ms_p99")
    empty: dict[str, float | None] = {k: None for k in (*keys, "itl_ms_p50", "itl_ms_p99")}
    if not sample or not sample.get("streams"):
        return empty
    streams = sample["streams"]
    offered = len(streams) * sample["new_tokens"] / sample["duration_s"]
    span = max(s["end_s"] for s in streams) - min(s["arrival_s"] for s in streams)
    served = sum(s["tokens"] for s in streams) / span if span > 0 else None
    ttfts = [float(s["ttft_ms"]) for s in streams]
    itls = [1000.0 * s["decode_s"] / (s["tokens"] - 1) for s in streams if s["tokens"] > 1]
    return {
        "offered_tok_s": offered,
        "served_tok_s": served,
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p99": percentile(ttfts, 99),
        "itl_ms_p50": percentile(itls, 50) if itls else None,
        "itl_ms_p99": percentile(itls, 99) if itls else None,
    }


GOALS: tuple[tuple[str, str, str, float], ...] = (
    # (name, figure path, comparison, target)
    ("decode >= 1.5x llama.cpp", "ratios.decode_encloud_over_llama_cpp", ">=", 1.5),
    ("TTFT <= 0.5x llama.cpp", "ratios.ttft_encloud_over_llama_cpp", "<=", 0.5),
    ("confidential overhead <= 2 %", "confidential_overhead_pct", "<=", 2.0),
    ("handshake p50 <= 2 ms", "handshake_ms.p50", "<=", 2.0),
    ("8 streams >= 3x one", "ratios.aggregate_8_over_1", ">=", 3.0),
    ("open-loop TTFT p99 <= 1 s at 75 % of peak", "open_loop.ttft_ms_p99", "<=", 1000.0),
    ("16 streams TTFT p99 <= 0.5 s", "ttft_ms_p99.16", "<=", 500.0),
    ("server peak RSS <= 300 MB", "server_peak_rss_mb", "<=", 300.0),
    ("perplexity <= llama.cpp, first text", "ratios.perplexity_over_llama_cpp", "<=", 1.0),
    ("perplexity <= llama.cpp, second text", "ratios.perplexity_2_over_llama_cpp", "<=", 1.0),
)


def lookup(figures: Mapping[str, Any], path: str) -> Any:
    value: Any = figures
    for part in path.split("."):
        value = value[part]
    return value


def goals(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, path, op, target in GOALS:
        value = lookup(figures, path)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"goal": name, "figure": path, "value": value, "target": target, "met": met})
    return out
