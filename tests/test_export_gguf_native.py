"""The q4_1-native export carries the GGUF's own weights: no second rounding.

Checked against an independent reading of the GGUF (gguf's own ``dequantize`` and the row
permutation as transformers' GGUF loader writes it), matrix by matrix for two layers, and end to
end by perplexity on the held-out text. The export is cached under $ENCLOUD_CACHE_ROOT; from a
cached int4 export it takes ~3 s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def _cache_root() -> Path:
    return Path(os.environ.get("ENCLOUD_CACHE_ROOT", "~/.cache/encloud")).expanduser()


@pytest.fixture(scope="module")
def native_folder() -> Path:
    pytest.importorskip("gguf")
    pytest.importorskip("onnx")
    from encloud.server.inference.export import export_model

    return export_model(None, _cache_root(), "q4_1-native", progress=lambda _m: None)


def _hf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' ``reverse_permute_weights`` for llama.cpp's q/k rows."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@pytest.mark.unit
def test_native_precision_needs_a_gguf(tmp_path: Path) -> None:
    from encloud.server.inference.export import export_model

    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="GGUF"):
        export_model(tmp_path, tmp_path / "cache", "q4_1-native", progress=lambda _m: None)


@pytest.mark.engine
def test_native_weights_are_the_ggufs_own(native_folder: Path) -> None:
    import gguf
    import onnx
    from onnx import numpy_helper

    from encloud.server.inference.export import default_gguf

    reader = gguf.GGUFReader(str(default_gguf()))
    tensors = {t.name: t for t in reader.tensors}

    def gguf_matrix(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)

    model = onnx.load(str(native_folder / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}

    def onnx_matrix(prefix: str) -> np.ndarray:
        """Dequantise what the graph computes: d*(q - 8) per 32-block, plus the correction."""
        codes = numpy_helper.to_array(inits[f"{prefix}.MatMul.weight_Q4"])  # [N, K/32, 16]
        d = numpy_helper.to_array(inits[f"{prefix}.MatMul.weight_scales"])  # [N, K/32]
        c = numpy_helper.to_array(inits[f"{prefix}.MatMul.weight_q4_1_correction"]).T
        q = np.empty((*codes.shape[:2], 32), dtype=np.float64)
        q[..., 0::2] = codes & 0x0F
        q[..., 1::2] = codes >> 4
        w = d[..., None] * (q - 8) + c[..., None]
        return w.reshape(w.shape[0], -1)

    for layer in (0, 29):
        qkv = np.concatenate(
            [
                _hf_rows(gguf_matrix(f"blk.{layer}.attn_q.weight"), 9),
                _hf_rows(gguf_matrix(f"blk.{layer}.attn_k.weight"), 3),
                gguf_matrix(f"blk.{layer}.attn_v.weight"),
            ]
        )
        gate_up = np.concatenate(
            [gguf_matrix(f"blk.{layer}.ffn_gate.weight"), gguf_matrix(f"blk.{layer}.ffn_up.weight")]
        )
        expected = {
            "attn.qkv_proj": qkv,
            "attn.o_proj": gguf_matrix(f"blk.{layer}.attn_output.weight"),
            "mlp.gate_proj": gate_up,  # gate and up fused into one MatMulNBits
            "mlp.down_proj": gguf_matrix(f"blk.{layer}.ffn_down.weight"),
        }
        for proj, ref in expected.items():
            got = onnx_matrix(f"model.layers.{layer}.{proj}")
            assert got.shape == ref.shape, proj
            # Equal up to the float32 rounding of c = m + 8d.
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())

    emb = gguf_matrix("token_embd.weight")  # Q8_0, tied to lm_head
    codes = numpy_helper.to_array(inits["lm_head.MatMul.weight_Q8"]).astype(np.float64)
    scales = numpy_helper.to_array(inits["lm_head.MatMul.weight_scales"])
    got = (scales[..., None] * (codes - 128)).reshape(emb.shape)
    np.testing.assert_array_equal(got, emb)


@pytest.mark.engine
def test_native_perplexity_within_floor(native_folder: Path) -> None:
    from encloud.server.inference.quality import perplexity, tokenize

    ref = json.loads((DATA / "quality_reference.json").read_text(encoding="utf-8"))
    text = (DATA / "heldout_prose.txt").read_text(encoding="utf-8")
    ids = tokenize(native_folder, text, ref["tokens"])
    ppl = perplexity(native_folder, ids)
    assert 0.9 * ref["fp32_perplexity"] <= ppl <= ref["floor_ratio"] * ref["fp32_perplexity"]
    # What no second rounding buys: well below the builder's re-rounded int4 (34.13 here).
    assert ppl <= 1.02 * ref["fp32_perplexity"], ppl


@pytest.mark.engine
def test_native_model_serves(native_folder: Path) -> None:
    from encloud.server.inference.engine import ChatTurn, Engine, GenerationParams, GenerationResult

    engine = Engine.load(native_folder, threads=2)
    try:
        params = GenerationParams((ChatTurn("user", "What is the capital of France?"),), 16)
        items = list(engine.stream(params, lambda: False))
        result = items[-1]
        assert isinstance(result, GenerationResult)
        assert result.completion_tokens == 16 or result.finish_reason == "stop"
        assert "".join(p for p in items[:-1] if isinstance(p, str)).strip()
    finally:
        engine.close()
