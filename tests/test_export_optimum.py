"""The optimum exporter's pure parts: the transformers 4.x config view and the genai_config
mapping (the export itself runs in tests/test_engine_vicuna.py where an optimum environment
is configured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from encloud.server.inference.optimum_export import genai_config, transformers4_config

CONFIG_V5 = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "dtype": "float32",
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}


@pytest.mark.unit
def test_rope_theta_is_carried_to_transformers4() -> None:
    out = transformers4_config(CONFIG_V5)
    assert out["rope_theta"] == 100000.0  # 4.57 would silently use 10000 otherwise
    assert "rope_parameters" not in out
    assert out["torch_dtype"] == "float32"


@pytest.mark.unit
def test_unmapped_rope_scaling_is_refused() -> None:
    scaled = dict(CONFIG_V5, rope_parameters={"rope_theta": 1e4, "rope_type": "llama3"})
    with pytest.raises(ValueError, match="RoPE"):
        transformers4_config(scaled)


@pytest.mark.unit
def test_genai_config_maps_optimum_names() -> None:
    cfg = genai_config(CONFIG_V5)
    dec = cfg["model"]["decoder"]
    assert dec["inputs"] == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    assert dec["outputs"]["present_key_names"] == "present.%d.key"
    assert (dec["head_size"], dec["num_key_value_heads"]) == (64, 3)
    assert cfg["search"]["past_present_share_buffer"] is False


@pytest.mark.unit
def test_optimum_exporter_is_fp32_only_and_needs_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from encloud.server.inference.export import export_model

    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="fp32"):
        export_model(tmp_path, tmp_path / "c", "int4", lambda _m: None, exporter="optimum")
    monkeypatch.delenv("ENCLOUD_OPTIMUM_PYTHON", raising=False)
    with pytest.raises(ValueError, match="ENCLOUD_OPTIMUM_PYTHON"):
        export_model(tmp_path, tmp_path / "c", "fp32", lambda _m: None, exporter="optimum")
