"""In-process engine figures: TTFT, decode tok/s of one stream, total tok/s of N concurrent
streams, and peak RSS. Never used by tests (speed is not asserted); docs/MODEL_PIPELINE.md
records the figures with the command line.

``python -m encloud.server.inference.benchmark FOLDER [--streams 1 8] [--tokens 128]``
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path

from encloud.server.inference.engine import ChatTurn, Engine, GenerationParams, GenerationResult

PROMPTS = (
    "Write a long story about a lighthouse keeper.",
    "Explain how a steam engine works, in detail.",
    "Describe a walk through a forest in autumn.",
    "Write a long letter to a friend about your holiday.",
)


def _one(engine: Engine, prompt: str, tokens: int, out: list) -> None:
    params = GenerationParams((ChatTurn("user", prompt),), tokens)
    t0 = time.perf_counter()
    first = None
    result = None
    for item in engine.stream(params, lambda: False):
        if first is None:
            first = time.perf_counter() - t0
        if isinstance(item, GenerationResult):
            result = item
    out.append((first, time.perf_counter() - t0, result))


def run(engine: Engine, streams: int, tokens: int) -> dict[str, float]:
    out: list = []
    threads = [
        threading.Thread(target=_one, args=(engine, PROMPTS[i % len(PROMPTS)], tokens, out))
        for i in range(streams)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r.completion_tokens for _f, _w, r in out)
    one = out[0]
    return {
        "streams": streams,
        "total_tok_s": total / wall,
        "ttft_ms_mean": 1000 * sum(f for f, _w, _r in out) / len(out),
        "decode_tok_s_per_stream": (one[2].completion_tokens - 1) / (one[1] - one[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    engine = Engine.load(args.folder, threads=args.threads)
    run(engine, 1, 8)  # warm-up
    for _ in range(args.repeat):
        for n in args.streams:
            r = run(engine, n, args.tokens)
            print(
                f"streams {n:2d}: total {r['total_tok_s']:6.1f} tok/s, "
                f"TTFT mean {r['ttft_ms_mean']:6.0f} ms, "
                f"one stream's decode {r['decode_tok_s_per_stream']:6.1f} tok/s",
                flush=True,
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
