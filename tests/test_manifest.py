"""The model manifest: digest construction and tamper detection (no model needed)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from encloud.server.inference.manifest import (
    ModelIntegrityError,
    build_manifest,
    compute_model_digest,
    verify_model_folder,
)

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _make_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx graph")
    (folder / "model.onnx.data").write_bytes(bytes(range(256)) * 10)
    (folder / "genai_config.json").write_text('{"model": {"context_length": 8192}}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "sub" / "extra.bin").write_bytes(b"x")
    build_manifest(folder, {"precision": "int4"})
    return folder


def _independent_digest(folder: Path, template: str) -> bytes:
    """The docstring's construction, written out from scratch."""

    def field(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    files = sorted(
        p.relative_to(folder).as_posix().encode()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    out = b"encloud/v1 model\x00"
    for rel in files:
        out += field(rel + b"\x00" + hashlib.sha256((folder / rel.decode()).read_bytes()).digest())
    out += field(hashlib.sha256(template.encode()).digest())
    return hashlib.sha256(out).digest()


@pytest.mark.unit
def test_manifest_roundtrip_and_digest_is_recomputable(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path)
    manifest = verify_model_folder(folder)
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["version"] == 1
    assert set(raw["files"]) == {
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "sub/extra.bin",
    }
    assert raw["chat_template"] == TEMPLATE == manifest.chat_template
    assert manifest.model_digest.hex() == raw["model_digest"]
    assert manifest.model_digest == _independent_digest(folder, TEMPLATE)
    assert manifest.source["precision"] == "int4"


@pytest.mark.unit
def test_digest_depends_on_template_and_names() -> None:
    files = {"a": b"\x01" * 32, "b": b"\x02" * 32}
    base = compute_model_digest(files, "t")
    assert compute_model_digest(files, "u") != base
    assert compute_model_digest({"a": b"\x02" * 32, "b": b"\x01" * 32}, "t") != base
    assert compute_model_digest({"a": b"\x01" * 32, "c": b"\x02" * 32}, "t") != base
    # A template over the 65535-byte field limit is hashed first, so it is fine.
    assert len(compute_model_digest(files, "x" * 100_000)) == 32


@pytest.mark.unit
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: (f / "model.onnx.data").write_bytes(b"changed"), "differs"),
        (lambda f: (f / "sub" / "extra.bin").write_bytes(b"y"), "differs"),
        (lambda f: (f / "tokenizer.json").unlink(), "missing"),
        (lambda f: (f / "tokenizer_config.json").write_text("{}"), "unlisted"),
        (lambda f: (f / "sub" / "more.onnx").write_bytes(b""), "unlisted"),
        (lambda f: (f / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_tampering_is_detected(tmp_path: Path, mutate, message: str) -> None:
    folder = _make_folder(tmp_path)
    mutate(folder)
    with pytest.raises(ModelIntegrityError, match=message):
        verify_model_folder(folder)


@pytest.mark.unit
def test_manifest_edits_are_detected(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path)
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    raw["chat_template"] = TEMPLATE + " "
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelIntegrityError, match="model_digest"):
        verify_model_folder(folder)
    raw["chat_template"] = TEMPLATE
    raw["files"]["model.onnx"] = hashlib.sha256(b"other").hexdigest()
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelIntegrityError, match="differs"):
        verify_model_folder(folder)


@pytest.mark.unit
def test_symlink_refused(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path)
    (folder / "link.onnx").symlink_to(folder / "model.onnx")
    with pytest.raises(ModelIntegrityError, match="non-regular"):
        verify_model_folder(folder)
