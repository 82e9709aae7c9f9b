"""Second exporter: ``optimum-onnx`` (``optimum-cli export onnx --task
text-generation-with-past``), run in its own Python environment, served by the same engine.

optimum-onnx 0.1.0 pins transformers < 4.58, so it cannot share the environment of the
onnxruntime-genai builder (transformers 5.x, which is also what reads the GGUF). The export
therefore runs as a subprocess of another interpreter (``--optimum-python`` or
``$ENCLOUD_OPTIMUM_PYTHON``), e.g. a venv made with::

    python3.11 -m venv /opt/optimum-venv
    /opt/optimum-venv/bin/pip install "optimum-onnx[onnxruntime]==0.1.0"

Two things make its output servable by onnxruntime-genai (docs/MODEL_PIPELINE.md has the
figures):

1. **The config is translated for transformers 4.x.** A Hugging Face folder written by
   transformers 5 keeps RoPE's base in ``rope_parameters.rope_theta``; transformers 4.57 ignores
   that key and silently uses its default ``rope_theta = 10000`` (SmolLM2's is 100000), which
   exported a model with perplexity 30.40 instead of 25.39. The export reads a view of the folder
   (weights linked, ``config.json`` rewritten with ``rope_theta`` and ``torch_dtype``); a RoPE
   type other than ``default`` is refused rather than guessed.
2. **A genai_config.json maps its names.** Inputs ``input_ids``, ``attention_mask``,
   ``position_ids``, ``past_key_values.%d.key/value``; outputs ``logits``,
   ``present.%d.key/value``. Its attention is plain MatMul/Softmax, not GroupQueryAttention, so
   the past and present buffers cannot be shared (``past_present_share_buffer: false``).

Only fp32: optimum's own quantisers (``optimum-cli onnxruntime quantize``) produce QDQ/
MatMulInteger graphs, not the MatMulNBits kernels the builder's precisions use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

OPTIMUM_PYTHON_ENV = "ENCLOUD_OPTIMUM_PYTHON"
_VERSIONS_SCRIPT = (
    "import importlib.metadata as m, json, sys\n"
    "out = {'python': '%d.%d.%d' % sys.version_info[:3]}\n"
    "for n in ('optimum-onnx', 'optimum', 'transformers', 'torch', 'onnx'):\n"
    "    out[n] = m.version(n)\n"
    "print(json.dumps(out))\n"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

Progress = Callable[[str], None]


def optimum_python(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The interpreter of the optimum environment: ``explicit``, else $ENCLOUD_OPTIMUM_PYTHON."""
    value = explicit or os.environ.get(OPTIMUM_PYTHON_ENV)
    if not value:
        raise ValueError(
            f"the optimum exporter needs its own Python environment: set ${OPTIMUM_PYTHON_ENV} "
            "or pass --optimum-python (see encloud.server.inference.optimum_export)"
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"optimum Python interpreter not found: {path}")
    return path


def optimum_versions(python: Path) -> dict[str, str]:
    """Versions in the optimum environment (part of the export cache key)."""
    proc = subprocess.run(  # noqa: S603 (the configured interpreter, fixed script)
        [str(python), "-c", _VERSIONS_SCRIPT], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{python} lacks optimum-onnx: {proc.stderr.strip()[-500:]}")
    return {f"optimum-env/{k}": v for k, v in json.loads(proc.stdout).items()}


def transformers4_config(config: dict) -> dict:
    """``config.json`` as transformers 4.x reads it (see the module docstring)."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    if rope is not None:
        if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_theta", "rope_type"}:
            raise ValueError(f"RoPE parameters {rope} have no checked transformers 4.x mapping")
        out["rope_theta"] = rope["rope_theta"]
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out.pop("dtype")
    return out


def genai_config(config: dict, filename: str = "model.onnx") -> dict:
    """onnxruntime-genai's config for an optimum decoder export of a Llama-type ``config``."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    context = int(config.get("max_position_embeddings", 2048))
    eos = config.get("eos_token_id", 2)
    pad = config.get("pad_token_id")
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id", 1),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(config.get("head_dim") or hidden // heads),
                "hidden_size": hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": int(config["num_hidden_layers"]),
                "num_key_value_heads": int(config.get("num_key_value_heads", heads)),
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": config.get("model_type", "llama"),
            "vocab_size": int(config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # Plain attention: past and present have different lengths, no shared buffer.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def export_with_optimum(hf: Path, out: Path, python: Path, work: Path, progress: Progress) -> None:
    """Export the Hugging Face folder ``hf`` with optimum-onnx into ``out`` (created), add
    genai_config.json and the tokenizer files."""
    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    view = Path(tempfile.mkdtemp(prefix="hf4-", dir=work))
    for p in hf.iterdir():
        if p.is_file() and p.name != "config.json":
            os.symlink(p.resolve(), view / p.name)
    (view / "config.json").write_text(
        json.dumps(transformers4_config(config), indent=2), encoding="utf-8"
    )
    raw = work / "optimum-out"
    cmd = [
        str(python),
        "-m",
        "optimum.commands.optimum_cli",
        "export",
        "onnx",
        "--model",
        str(view),
        "--task",
        "text-generation-with-past",
        str(raw),
    ]
    progress("exporting with optimum-onnx (its own environment) ...")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # noqa: S603
    if proc.returncode != 0 or not (raw / "model.onnx").is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-20:]
        raise RuntimeError(f"optimum export failed ({proc.returncode}):\n" + "\n".join(tail))
    out.mkdir(parents=True)
    for p in raw.iterdir():
        if p.name.startswith("model.onnx"):  # the graph and any external data beside it
            shutil.move(str(p), out / p.name)
    for name in TOKENIZER_FILES:
        if (hf / name).is_file():
            shutil.copy2(hf / name, out / name)
    (out / "genai_config.json").write_text(
        json.dumps(genai_config(config), indent=4) + "\n", encoding="utf-8"
    )


__all__ = [
    "OPTIMUM_PYTHON_ENV",
    "export_with_optimum",
    "genai_config",
    "optimum_python",
    "optimum_versions",
    "transformers4_config",
]
