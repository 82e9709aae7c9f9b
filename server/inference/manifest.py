"""The manifest of an exported model folder, and the model digest.

A model folder holds the ONNX model (``model.onnx``, ``model.onnx.data``), ``genai_config.json``,
the tokenizer files and the chat template, plus ``manifest.json``, written by
:func:`build_manifest`::

    {
      "version": 1,
      "files": {"<relpath>": "<sha256 hex of the file>", ...},   # every file but manifest.json
      "chat_template": "<the Jinja chat template the engine renders prompts with>",
      "model_digest": "<hex, see below>",
      "source": {...}                                         # informational, not in the digest
    }

``relpath`` is the path relative to the folder, with ``/`` separators, UTF-8.

Model digest (what verifiers recompute offline, with ``E`` the protocol v1 canonical encoding
``encloud.protocol.encoding.encode``: label ASCII, a zero byte, then each field as a 2-byte
big-endian length and its bytes)::

    model_digest = SHA256(E("encloud/v1 model", F_1, ..., F_n, T))
    F_i = UTF8(relpath_i) || 0x00 || SHA256(file_i)          (the 32 raw digest bytes)
    T   = SHA256(UTF8(chat_template))                        (always hashed, any length)

with the files sorted by the bytes of ``UTF8(relpath)`` ascending, ``manifest.json`` itself
excluded. A relpath never contains a zero byte, so each ``F_i`` splits uniquely; the fixed
32-byte ``T`` is always the last field. The ``source`` block (GGUF hash, precision, exporter
versions) is provenance only and is not part of the digest: the digest covers exactly what the
engine loads.

:func:`verify_model_folder` recomputes every file digest and the model digest and refuses the
folder (:class:`ModelIntegrityError`) if a listed file is missing or differs, if any file not
listed is present (the engine or its tokenizer could load it), or if the recorded model digest
does not match.

This module imports only the standard library and the client's encoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from encloud.protocol.encoding import encode, sha256

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MODEL_DIGEST_LABEL = "encloud/v1 model"
CHAT_TEMPLATE_FILES = ("chat_template.jinja",)

_CHUNK = 1 << 20


class ModelIntegrityError(Exception):
    """The model folder does not match its manifest; the server must not start on it."""


@dataclass(frozen=True)
class Manifest:
    """A verified manifest. ``files`` maps relpath to the 32-byte SHA-256 of the file."""

    model_digest: bytes
    files: MappingProxyType[str, bytes]
    chat_template: str
    source: MappingProxyType[str, Any]

    @property
    def model_digest_hex(self) -> str:
        return self.model_digest.hex()


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def compute_model_digest(files: dict[str, bytes], chat_template: str) -> bytes:
    """The model digest of the module docstring, from relpath -> raw 32-byte file digests."""
    fields = []
    for relpath in sorted(files, key=lambda p: p.encode("utf-8")):
        name = relpath.encode("utf-8")
        digest = files[relpath]
        if b"\0" in name:
            raise ValueError(f"file name contains a zero byte: {relpath!r}")
        if len(digest) != 32:
            raise ValueError(f"file digest of {relpath!r} is not 32 bytes")
        fields.append(name + b"\0" + digest)
    fields.append(sha256(chat_template.encode("utf-8")))
    return sha256(encode(MODEL_DIGEST_LABEL, *fields))


def _list_files(folder: Path) -> list[str]:
    """Every regular file under folder (recursively) except the manifest, as relpaths.

    Symbolic links and other non-regular entries are refused: the digest must cover bytes that
    live in the folder.
    """
    out = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        rootp = Path(root)
        for d in dirs:
            if (rootp / d).is_symlink():
                raise ModelIntegrityError(f"model folder contains a symbolic link: {d}")
        for name in names:
            p = rootp / name
            rel = p.relative_to(folder).as_posix()
            if rel == MANIFEST_NAME:
                continue
            if p.is_symlink() or not p.is_file():
                raise ModelIntegrityError(f"model folder contains a non-regular file: {rel}")
            out.append(rel)
    return sorted(out)


def read_chat_template(folder: Path) -> str:
    """The chat template shipped in an exported folder: chat_template.jinja, else the
    ``chat_template`` string of tokenizer_config.json."""
    for name in CHAT_TEMPLATE_FILES:
        p = folder / name
        if p.is_file():
            return p.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            return template
    raise ModelIntegrityError(f"no chat template found in {folder}")


def build_manifest(folder: Path, source: dict[str, Any], chat_template: str | None = None) -> dict:
    """Hash every file in ``folder``, write ``manifest.json`` there and return its content.

    ``chat_template`` defaults to the folder's own template (see :func:`read_chat_template`).
    """
    folder = Path(folder)
    template = chat_template if chat_template is not None else read_chat_template(folder)
    files = {rel: file_sha256(folder / rel) for rel in _list_files(folder)}
    manifest = {
        "version": MANIFEST_VERSION,
        "files": {rel: d.hex() for rel, d in files.items()},
        "model_digest": compute_model_digest(files, template).hex(),
        "chat_template": template,
        "source": source,
    }
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def _parse_hex32(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise ModelIntegrityError(f"manifest: {what} is not a 64-digit hex SHA-256")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ModelIntegrityError(f"manifest: {what} is not hex") from None


def verify_model_folder(folder: Path) -> Manifest:
    """Recompute every digest of ``folder`` against its manifest.

    Raises :class:`ModelIntegrityError` naming the first problem: no or malformed manifest, a
    listed file missing or changed, a file present that the manifest does not list, or a model
    digest that does not match the files and chat template.
    """
    folder = Path(folder)
    mpath = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ModelIntegrityError(f"model folder not found: {folder}")
    if not mpath.is_file():
        raise ModelIntegrityError(f"model folder has no {MANIFEST_NAME}: {folder}")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("version") != MANIFEST_VERSION:
        raise ModelIntegrityError("manifest: unsupported or missing version")
    listed = raw.get("files")
    template = raw.get("chat_template")
    source = raw.get("source", {})
    if not isinstance(listed, dict) or not listed:
        raise ModelIntegrityError("manifest: files missing or empty")
    if not isinstance(template, str) or not template:
        raise ModelIntegrityError("manifest: chat_template missing")
    if not isinstance(source, dict):
        raise ModelIntegrityError("manifest: source is not an object")
    expected = {rel: _parse_hex32(h, f"digest of {rel}") for rel, h in listed.items()}
    recorded = _parse_hex32(raw.get("model_digest"), "model_digest")

    present = set(_list_files(folder))
    missing = sorted(set(expected) - present)
    if missing:
        raise ModelIntegrityError(f"model file missing: {missing[0]}")
    extra = sorted(present - set(expected))
    if extra:
        raise ModelIntegrityError(f"model folder contains an unlisted file: {extra[0]}")
    for rel in sorted(expected):
        if file_sha256(folder / rel) != expected[rel]:
            raise ModelIntegrityError(f"model file differs from its manifest: {rel}")
    digest = compute_model_digest(expected, template)
    if digest != recorded:
        raise ModelIntegrityError("manifest: model_digest does not match the files")
    return Manifest(
        model_digest=digest,
        files=MappingProxyType(dict(expected)),
        chat_template=template,
        source=MappingProxyType(dict(source)),
    )
