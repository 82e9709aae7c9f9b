"""Quality gate: teacher-forced perplexity of an exported model over held-out text.

Token by token through the engine's runner (plain ONNX Runtime, the KV cache as served) over
the first ``n_tokens`` tokens of the text (the model's own tokenizer, no chat template, no
special tokens added); the perplexity is ``exp(mean(-log p(t_i | t_<i)))`` over tokens 2..n.
The exported model is the one the engine serves, through the engine's own runner, so the figure
measures exactly what is served (with CPU kernels of this machine: int4 MatMulNBits at accuracy
level 4 rounds activations to int8).

``python -m encloud.server.inference.quality FOLDER [TEXT] [--tokens 512]`` prints the figure;
docs/MODEL_PIPELINE.md records the ones measured, and tests/test_quality.py gates the default
precision against the fp32 reference.

Not on the serving path; imports numpy, onnxruntime and tokenizers (the model's own
``tokenizer.json``, as the engine reads it).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from encloud.server.inference.runner import ModelRunner

DEFAULT_TOKENS = 512
HELDOUT_TEXT = Path(__file__).resolve().parents[2] / "tests" / "data" / "heldout_prose.txt"


def tokenize(folder: Path, text: str, n_tokens: int) -> np.ndarray:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if len(ids) < n_tokens:
        raise ValueError(f"text has {len(ids)} tokens, fewer than {n_tokens}")
    return ids[:n_tokens]


def perplexity(folder: Path, ids: np.ndarray, threads: int = 2) -> float:
    """Teacher-forced perplexity of the model in ``folder`` over the token ids ``ids``.

    Token by token through the engine's own runner (the exported graphs return the last
    position's logits only): feed ``t_i`` with ``t_<i`` cached, read ``p(t_{i+1})``."""
    from encloud.server.inference.runner import ModelRunner

    n = len(ids)
    runner = ModelRunner(
        Path(folder), threads=threads, spinning=False, provider="cpu", max_rows=1, max_len=n
    )
    runner.ensure(n, [0])
    nll = 0.0
    for i in range(n - 1):
        logits = runner.run(0, ids[i : i + 1].reshape(1, 1), [i])[0].astype(np.float64)
        logits -= logits.max()
        nll -= logits[int(ids[i + 1])] - math.log(np.exp(logits).sum())
    return float(math.exp(nll / (n - 1)))


def greedy_with_gaps(
    runner: ModelRunner, ids: np.ndarray, n: int, eos_ids: frozenset[int]
) -> tuple[list[int], list[float]]:
    """Up to ``n`` greedy tokens after the prompt ``ids`` on row 0 of ``runner`` alone (no
    scheduler, no other row), and each step's gap between the top two logits: the batch-1
    reference that batched answers are compared with up to their first near-tie."""
    runner.ensure(len(ids) + n, [0])
    logits = runner.run(0, np.asarray(ids, dtype=np.int64).reshape(1, -1), [0])[0]
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(n):
        top2 = np.partition(logits, -2)[-2:]
        gaps.append(float(abs(top2[1] - top2[0])))
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in eos_ids:
            break
        logits = runner.run(0, np.array([[tokens[-1]]]), [len(ids) + len(tokens) - 1])[0]
    return tokens, gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Teacher-forced perplexity of an exported model")
    parser.add_argument("folder", type=Path)
    parser.add_argument("text", type=Path, nargs="?", default=HELDOUT_TEXT)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    ids = tokenize(args.folder, args.text.read_text(encoding="utf-8"), args.tokens)
    print(f"{perplexity(args.folder, ids, args.threads):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DEFAULT_TOKENS", "HELDOUT_TEXT", "perplexity", "tokenize"]
