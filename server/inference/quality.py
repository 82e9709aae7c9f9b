"""Quality gate: teacher-forced perplexity of an exported model over held-out text.

One forward pass of plain ONNX Runtime over the first ``n_tokens`` tokens of the text (the
model's own tokenizer, no chat template, no special tokens added), with an empty KV cache; the
perplexity is ``exp(mean(-log p(t_i | t_<i)))`` over tokens 2..n. The exported model is the one
the engine serves, so the figure measures exactly what is served (with CPU kernels of this
machine: int4 MatMulNBits at accuracy level 4 rounds activations to int8).

``python -m encloud.server.inference.quality FOLDER [TEXT] [--tokens 512]`` prints the figure;
docs/MODEL_PIPELINE.md records the ones measured, and tests/test_quality.py gates the default
precision against the fp32 reference.

Not on the serving path; imports numpy, onnxruntime and tokenizers (the model's own
``tokenizer.json``, as the engine reads it).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

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
    """Teacher-forced perplexity of the model in ``folder`` over the token ids ``ids``."""
    import onnxruntime as ort

    cfg = json.loads((Path(folder) / "genai_config.json").read_text(encoding="utf-8"))
    dec = cfg["model"]["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        str(Path(folder) / dec["filename"]), opts, providers=["CPUExecutionProvider"]
    )
    n = len(ids)
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        dtype = np.int64 if "int64" in inp.type else np.int32
        if inp.name == "input_ids":
            feeds[inp.name] = ids.reshape(1, n).astype(dtype)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, n), dtype=dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(n, dtype=dtype).reshape(1, n)
        elif inp.name.startswith("past_key_values"):
            kv_dtype = np.float16 if "float16" in inp.type else np.float32
            shape = (1, dec["num_key_value_heads"], 0, dec["head_size"])
            feeds[inp.name] = np.zeros(shape, dtype=kv_dtype)
        else:
            raise ValueError(f"unexpected model input {inp.name}")
    (logits,) = sess.run(["logits"], feeds)
    logits = np.asarray(logits, dtype=np.float64).reshape(n, -1)[:-1]
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(n - 1), ids[1:]]
    return float(math.exp(nll.mean()))


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
