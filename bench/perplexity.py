"""Teacher-forced perplexity of an exported ONNX model folder, with plain onnxruntime.

DESIGN.md's method: the held-out text (bench/data/heldout.txt) is tokenised once with the
model's own tokenizer; the same token ids are scored by every model (the ONNX int4 model
encloud serves, the fp32 export of the same GGUF, and llama.cpp on the GGUF itself). One forward
pass over all tokens with an empty KV cache gives the logits at every position; the loss is the
negative log-likelihood of token t+1 given tokens 0..t.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def heldout_ids(model_folder: Path, n_tokens: int) -> list[int]:
    """The first n_tokens ids of the held-out text under the model folder's tokenizer."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(og.Config(str(model_folder))))
    ids = [int(t) for t in tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))]
    if len(ids) < n_tokens:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than {n_tokens}")
    return ids[:n_tokens]


def nll_of_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over positions of -log softmax(logits)[target], in float64."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return float((lse - logits[np.arange(len(targets)), targets]).sum())


def onnx_nll(model_folder: Path, ids: list[int], threads: int) -> dict[str, float | int]:
    """{"nll_sum", "predicted"} for ids under the folder's ONNX model (teacher-forced)."""
    import onnxruntime as ort

    cfg = json.loads((model_folder / "genai_config.json").read_text(encoding="utf-8"))
    decoder = cfg["model"]["decoder"]
    kv_heads, head = int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_folder / decoder["filename"]), options, providers=["CPUExecutionProvider"]
    )
    n = len(ids)
    feeds: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = np.asarray([ids], dtype=np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((1, n), dtype=np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.arange(n, dtype=np.int64)[None, :]
        elif spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros((1, kv_heads, 0, head), dtype=_DTYPES[spec.type])
        else:
            raise ValueError(f"unexpected model input {spec.name}")
    (logits,) = session.run(["logits"], feeds)
    nll = nll_of_logits(logits[0, : n - 1], np.asarray(ids[1:], dtype=np.int64))
    return {"nll_sum": nll, "predicted": n - 1}
