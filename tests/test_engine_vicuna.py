"""The Vicuna path without a hub: a tiny random-weight Llama checkpoint, made here with
transformers, exported through the Hugging Face folder path with the Vicuna v1.1 template
recorded, served by the engine and streamed from.

The tokens are random, so the test asserts structure (pieces, finish reason, usage, UTF-8), not
text. Both the checkpoint and its export are cached under $ENCLOUD_CACHE_ROOT, keyed by their
inputs: a warm run imports no torch and only verifies the cached folders. The checkpoint is made
in a subprocess so that this test process never imports torch or transformers (the serving path
must not need them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from encloud.protocol.encoding import sha256
from encloud.server.inference.engine import ChatTurn, Engine, GenerationParams, GenerationResult
from encloud.server.inference.templates import VICUNA_V1_1, VICUNA_V1_1_SYSTEM

# A Llama-2 shaped model, shrunk: what matters is the architecture the builder sees.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
SEED = 1234

_MAKE = r"""
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
out, cfg, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(seed)
model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
model.save_pretrained(out)
"""


def _cache_root() -> Path:
    return Path(os.environ.get("ENCLOUD_CACHE_ROOT", "~/.cache/encloud")).expanduser()


def _tiny_checkpoint(tokenizer_from: Path) -> Path:
    """The tiny checkpoint folder (config, random weights, the SmolLM2 tokenizer without a chat
    template, as a Vicuna checkpoint ships none), built once per inputs."""
    tok = json.loads((tokenizer_from / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok.pop("chat_template", None)
    tok_json = (tokenizer_from / "tokenizer.json").read_bytes()
    with open(tokenizer_from / "tokenizer.json", encoding="utf-8") as f:
        vocab = len(json.load(f)["model"]["vocab"])
    config = {
        **TINY_CONFIG,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    key = sha256(
        json.dumps([config, SEED, tok], sort_keys=True).encode() + b"\0" + sha256(tok_json)
    ).hex()
    final = _cache_root() / "tiny-llama" / key
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        ckpt = work / "ckpt"
        subprocess.run(
            [sys.executable, "-c", _MAKE, str(ckpt), json.dumps(config), str(SEED)],
            check=True,
            capture_output=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
        )
        (ckpt / "tokenizer.json").write_bytes(tok_json)
        (ckpt / "tokenizer_config.json").write_text(json.dumps(tok, indent=2), encoding="utf-8")
        try:
            os.rename(ckpt, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _missing(name: str) -> bool:
    return importlib.util.find_spec(name) is None


@pytest.fixture(scope="module")
def tiny_vicuna(model_dir: Path) -> Path:
    if _missing("torch") or _missing("transformers") or _missing("onnx_ir"):
        pytest.skip("the export extra (torch, transformers, onnx-ir) is not installed")
    from encloud.server.inference.export import export_model

    checkpoint = _tiny_checkpoint(model_dir)
    return export_model(
        checkpoint, _cache_root(), "int4", progress=lambda _m: None, chat_template="vicuna_v1.1"
    )


@pytest.mark.engine
def test_tiny_vicuna_export_records_the_template(tiny_vicuna: Path) -> None:
    from encloud.server.inference.manifest import verify_model_folder

    manifest = verify_model_folder(tiny_vicuna)
    assert manifest.chat_template == VICUNA_V1_1
    assert manifest.source["kind"] == "hf-folder"
    assert manifest.source["chat_template"] == "vicuna_v1.1"
    cfg = json.loads((tiny_vicuna / "genai_config.json").read_text(encoding="utf-8"))
    assert cfg["model"]["decoder"]["num_hidden_layers"] == TINY_CONFIG["num_hidden_layers"]
    assert cfg["model"]["decoder"]["hidden_size"] == TINY_CONFIG["hidden_size"]


@pytest.mark.engine
def test_tiny_vicuna_serves_and_streams(tiny_vicuna: Path) -> None:
    engine = Engine.load(tiny_vicuna, threads=2)
    try:
        messages = (ChatTurn("user", "Hello! Who are you?"),)
        assert engine.render_prompt(messages) == (
            VICUNA_V1_1_SYSTEM + " USER: Hello! Who are you? ASSISTANT:"
        )
        prompt_tokens = engine.count_prompt_tokens(messages)
        assert prompt_tokens > 10

        for params in (
            GenerationParams(messages, max_new_tokens=12),
            GenerationParams(messages, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7),
        ):
            items = list(engine.stream(params, lambda: False))
            pieces, result = items[:-1], items[-1]
            assert isinstance(result, GenerationResult)
            assert all(isinstance(p, str) and p for p in pieces)
            "".join(pieces).encode("utf-8")  # no lone surrogate: whole characters only
            assert result.finish_reason in ("length", "stop")
            assert 1 <= result.completion_tokens <= 12
            if result.finish_reason == "length":
                assert result.completion_tokens == 12
            assert result.prompt_tokens == prompt_tokens

        # A fixed seed gives the same text twice, on this model too.
        sampled = GenerationParams(messages, max_new_tokens=8, temperature=1.0, seed=3)
        first = [p for p in engine.stream(sampled, lambda: False) if isinstance(p, str)]
        second = [p for p in engine.stream(sampled, lambda: False) if isinstance(p, str)]
        assert first == second
        event = engine.facts()
        assert event["model_digest"] == engine.model_digest.hex()
    finally:
        engine.close()


@pytest.mark.engine
def test_tiny_llama_through_optimum_serves(model_dir: Path) -> None:
    """The second exporter (optimum-onnx in its own environment, $ENCLOUD_OPTIMUM_PYTHON,
    which `./dev test` builds as .venv-optimum from requirements/optimum.lock)."""
    python = os.environ.get("ENCLOUD_OPTIMUM_PYTHON")
    if not python:
        pytest.skip(
            "ENCLOUD_OPTIMUM_PYTHON is not set: `./dev test` builds the optimum environment "
            "and sets it (or run `./dev setup` and point it at .venv-optimum/bin/python)"
        )
    from encloud.server.inference.export import export_model

    folder = export_model(
        _tiny_checkpoint(model_dir),
        _cache_root(),
        "fp32",
        progress=lambda _m: None,
        chat_template="vicuna_v1.1",
        exporter="optimum",
        optimum_python=python,
    )
    cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    assert cfg["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    engine = Engine.load(folder, threads=2)
    try:
        messages = (ChatTurn("user", "Hello!"),)
        items = list(engine.stream(GenerationParams(messages, max_new_tokens=6), lambda: False))
        result = items[-1]
        assert isinstance(result, GenerationResult)
        assert result.finish_reason in ("length", "stop")
        assert all(isinstance(p, str) and p for p in items[:-1])
    finally:
        engine.close()
