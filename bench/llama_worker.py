"""llama.cpp peer, in its own process: `python -m bench.llama_worker GGUF THREADS CTX`.

It runs apart from the harness so that a crash of llama.cpp's native code (seen on these
machines: the default native build dies in an AMX kernel on some Xeons) becomes a null figure
with a reason, not a dead benchmark, and so that its memory is its own.

Protocol: one JSON object per line. The worker first writes {"ready": true, "versions": ...}.
Then for each command line it writes one reply line:

- {"op": "decode", "prompt": TEXT, "n": N}: greedy decode of exactly N tokens (end of sequence
  is not honoured, so every engine decodes the same count) from the rendered chat prompt TEXT,
  tokenised with special tokens and no added BOS. The KV cache is cleared first, so no prompt
  prefix is reused between runs. Reply: {"ttft_ms", "decode_s", "tokens", "prompt_tokens"}.
- {"op": "ppl", "ids": [...]}: teacher-forced negative log-likelihood of ids[1:] given the
  prefix. Reply: {"nll_sum", "predicted"}.
- {"op": "quit"}.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    picked = logits[np.arange(len(targets)), targets]
    return float((lse - picked).sum())


def main(argv: list[str]) -> int:
    gguf, threads, n_ctx = argv[0], int(argv[1]), int(argv[2])
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=gguf,
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    scorer: Any = None
    info = llama_cpp.llama_print_system_info()
    versions = {
        "llama-cpp-python": llama_cpp.__version__,
        "system_info": info.decode() if isinstance(info, bytes) else str(info),
    }
    _reply({"ready": True, "versions": versions})
    for line in sys.stdin:
        command = json.loads(line)
        op = command.get("op")
        if op == "quit":
            break
        if op == "decode":
            ids = llm.tokenize(command["prompt"].encode("utf-8"), add_bos=False, special=True)
            n = int(command["n"])
            llm.reset()
            started = time.perf_counter()
            first = last = started
            count = 0
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                llm.detokenize([token])
                last = time.perf_counter()
                if count == 0:
                    first = last
                count += 1
                if count >= n:
                    break
            _reply(
                {
                    "ttft_ms": (first - started) * 1000.0,
                    "decode_s": last - first,
                    "tokens": count,
                    "prompt_tokens": len(ids),
                }
            )
        elif op == "ppl":
            ids = [int(t) for t in command["ids"]]
            if scorer is None or scorer.n_ctx() < len(ids) + 8:  # one context per length
                scorer = None
                scorer = llama_cpp.Llama(
                    model_path=gguf,
                    n_ctx=max(len(ids) + 8, 64),
                    n_batch=max(len(ids) + 8, 64),
                    n_threads=threads,
                    n_threads_batch=threads,
                    logits_all=True,
                    verbose=False,
                )
            scorer.reset()
            scorer.eval(ids)
            logits = np.asarray(scorer.scores[: len(ids) - 1], dtype=np.float32)
            nll = _log_softmax_nll(logits, np.asarray(ids[1:], dtype=np.int64))
            _reply({"nll_sum": nll, "predicted": len(ids) - 1})
        else:
            _reply({"error": f"unknown op {op!r}"})
    return 0


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
