"""Reference values for a policy, computed without trusting a server.

`model_digest_of_folder` recomputes the model digest from the exported model's
files, exactly as docs/PROTOCOL.md defines it (independently of the server's
`encloud.server.inference.manifest`, which a test cross-checks):

    model_digest = SHA256(E("encloud/v1 model", F_1, ..., F_n, SHA256(chat_template)))
    F_i = UTF8(relpath_i) || 0x00 || SHA256(file_i), files sorted by UTF8(relpath),
    manifest.json excluded; chat_template is the manifest's (what the engine renders with).

The runtime event cannot be computed from the files alone: it records the
measured settings, the engine's versions, the session options, the CPU feature class
and a known-answer hash of tokens decoded at start-up. `runtime_event_by_loading`
computes it by loading the engine here (needs `encloud[server]`, the same versions and
CPU class as the server, and the server's ENCLOUD_* settings in the environment);
`runtime_event_from_file` takes
the JSON object published by whoever built the image (the server logs it, and
`policy init` shows it). Either is hashed as SHA256(canonical JSON), the value
`allowed_runtime_events` holds.

`policy_from_evidence` writes a DEV-ONLY policy from whatever a running server
shows about itself: trust on first use, which proves nothing to anyone else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from encloud.protocol import eventlog
from encloud.protocol.canonical import strict_loads
from encloud.protocol.encoding import encode, sha256
from encloud.protocol.errors import PolicyError, VerificationError
from encloud.protocol.evidence import Evidence
from encloud.protocol.policy import Policy, build_policy
from encloud.protocol.tpm_structures import parse_attest
from encloud.protocol.verifier import spki_der, verify

MANIFEST_NAME = "manifest.json"
MODEL_LABEL = "encloud/v1 model"
_CHUNK = 1 << 20


def _file_sha256(path: Path) -> bytes:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def model_digest_of_folder(folder: Path) -> bytes:
    """Recompute the model digest from the files; PolicyError if the folder disagrees with
    its manifest (a file missing, added or changed, or another recorded digest)."""
    folder = Path(folder)
    try:
        manifest = strict_loads((folder / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise PolicyError(f"{folder}: no readable {MANIFEST_NAME}") from err
    template = manifest.get("chat_template") if isinstance(manifest, dict) else None
    if not isinstance(template, str):
        raise PolicyError(f"{folder}/{MANIFEST_NAME}: no chat_template")
    files: dict[str, bytes] = {}
    for root, dirs, names in os.walk(folder, followlinks=False):
        rootp = Path(root)
        for name in [*dirs, *names]:
            if (rootp / name).is_symlink():
                raise PolicyError(f"{folder}: symbolic link {name} in the model folder")
        for name in names:
            rel = (rootp / name).relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                files[rel] = _file_sha256(rootp / name)
    fields = [
        rel.encode("utf-8") + b"\x00" + digest
        for rel, digest in sorted(files.items(), key=lambda kv: kv[0].encode("utf-8"))
    ]
    fields.append(sha256(template.encode("utf-8")))
    digest = sha256(encode(MODEL_LABEL, *fields))
    listed = manifest.get("files")
    if isinstance(listed, dict) and {k: v for k, v in listed.items()} != {
        k: v.hex() for k, v in files.items()
    }:
        raise PolicyError(f"{folder}: the files differ from those its manifest lists")
    recorded = manifest.get("model_digest")
    if recorded is not None and recorded != digest.hex():
        raise PolicyError(f"{folder}: the manifest records another model digest")
    return digest


def runtime_event_from_file(path: Path) -> dict[str, Any]:
    try:
        obj = strict_loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise PolicyError(f"{path}: not a JSON runtime event") from err
    if not isinstance(obj, dict):
        raise PolicyError(f"{path}: a runtime event is a JSON object")
    return obj


def runtime_event_by_loading(
    folder: Path | None, embeddings_folder: Path | None = None
) -> dict[str, Any]:
    """Load the models here and return the runtime event a server on these folders would
    measure (chat at `folder`, embeddings at `embeddings_folder`; either may be None): the
    server's other settings are read from the same ENCLOUD_* environment the server gets
    (needs encloud[server])."""
    try:
        from encloud.server.runtime_event import load_embedder, load_engine, runtime_event
        from encloud.server.settings import Settings
    except ImportError as err:
        raise PolicyError(
            "computing the runtime event needs encloud[server]; pass --runtime-event FILE"
        ) from err
    chat: dict[str, Any] = {"model_dir": Path(folder)} if folder is not None else {}
    settings = Settings(
        **chat,
        serve_chat=folder is not None,
        embeddings_model_dir=Path(embeddings_folder) if embeddings_folder else None,
    )
    engine = load_engine(settings) if folder is not None else None
    embedder = load_embedder(settings)
    try:
        return runtime_event(
            settings,
            engine.facts() if engine is not None else None,
            embedder.facts() if embedder is not None else None,
        )
    finally:
        if engine is not None:
            engine.close()
        if embedder is not None:
            embedder.close()


def runtime_event_digest(event: Mapping[str, Any]) -> bytes:
    """SHA-256 of the runtime event's canonical JSON: what allowed_runtime_events holds."""
    return sha256(eventlog.canonical_json(dict(event)))


def read_pinned_key(path: Path) -> bytes:
    """DER SubjectPublicKeyInfo from a PEM or DER public key file, or a PEM certificate."""
    data = Path(path).read_bytes()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        elif data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(data)  # type: ignore[assignment]
        else:
            key = serialization.load_der_public_key(data)  # type: ignore[assignment]
    except ValueError as err:
        raise PolicyError(f"{path}: not a public key or certificate") from err
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def read_roots(path: Path) -> list[bytes]:
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise PolicyError(f"{path}: not PEM certificates") from err
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def read_pcr_values(path: Path) -> dict[int, bytes]:
    """A JSON object {"<index>": "<hex>"} of expected PCR values."""
    try:
        obj = strict_loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise PolicyError(f"{path}: not a JSON object of PCR values") from err
    if not isinstance(obj, dict):
        raise PolicyError(f"{path}: not a JSON object of PCR values")
    out: dict[int, bytes] = {}
    for key, value in obj.items():
        if not key.isdigit() or not isinstance(value, str):
            raise PolicyError(f"{path}: entry {key!r} is not index -> hex")
        try:
            out[int(key)] = bytes.fromhex(value)
        except ValueError as err:
            raise PolicyError(f"{path}: entry {key!r} is not hex") from err
    return out


IMAGE_PCR_SELECTION = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15)
"""The PCRs the measured image's server quotes (deploy/image/vm/systemd/encloud.service)."""


def policy_from_manifest(
    model_dirs: Iterable[Path],
    runtime_events: Iterable[Mapping[str, Any]],
    *,
    embedding_model_dirs: Iterable[Path] = (),
    pinned_public_keys: Iterable[bytes] = (),
    certificate_roots: Iterable[bytes] = (),
    pcr_values: Mapping[int, bytes] | None = None,
    pcr_selection: Iterable[int] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15),
    workload_pcr: int = 15,
    max_session_ttl_seconds: int = 900,
) -> Policy:
    """A production-shaped policy from offline reference values (validated as parsed)."""
    return build_policy(
        pcr_selection=pcr_selection,
        workload_pcr=workload_pcr,
        allowed_model_digests=[model_digest_of_folder(d) for d in model_dirs],
        allowed_embedding_model_digests=[model_digest_of_folder(d) for d in embedding_model_dirs],
        allowed_runtime_events=[runtime_event_digest(e) for e in runtime_events],
        pinned_public_keys=pinned_public_keys,
        certificate_roots=certificate_roots,
        pcr_values=pcr_values,
        max_session_ttl_seconds=max_session_ttl_seconds,
        dev_only=False,
    )


def policy_from_evidence(
    evidence: Evidence, *, qualifying_data: bytes, ttl_seconds: int, workload_pcr: int = 15
) -> tuple[Policy, list[dict[str, Any]]]:
    """DEV ONLY, trust on first use: pin what the server shows. Returns the policy and the
    runtime events it allows (for the user to read).

    The result is verified against the same evidence, so a server whose evidence is not even
    self-consistent (bad signature, log that does not replay) gets no policy."""
    attest = parse_attest(evidence.quote_attest)
    if attest.quote is None or len(attest.quote.pcr_select) != 1:
        raise PolicyError("the server's quote is not a one-bank PCR quote")
    selection = attest.quote.pcr_select[0].indices
    records = eventlog.parse(evidence.workload_event_log)
    models = eventlog.logged_models(r.event for r in records)
    runtimes: dict[bytes, dict[str, Any]] = {}
    for r in records:
        if r.event.event_type == eventlog.EVENT_RUNTIME:
            runtimes[sha256(r.event.data)] = json.loads(r.event.data)
    policy = build_policy(
        pcr_selection=selection,
        workload_pcr=workload_pcr,
        allowed_model_digests=models.get(eventlog.ROLE_CHAT, []),
        allowed_embedding_model_digests=models.get(eventlog.ROLE_EMBEDDINGS, []),
        allowed_runtime_events=sorted(runtimes),
        pinned_public_keys=[spki_der(evidence.ak_public)],
        pcr_values={i: v for i, v in evidence.pcr_values.items() if i != workload_pcr},
        max_session_ttl_seconds=max(ttl_seconds, 1),
        dev_only=True,
    )
    try:
        verify(
            evidence,
            policy,
            expected_qualifying_data=qualifying_data,
            session_ttl_seconds=ttl_seconds,
        )
    except VerificationError as err:
        raise PolicyError(f"the server's own evidence does not verify: {err}") from err
    return policy, list(runtimes.values())


def policy_from_image(
    image_dir: Path,
    runtime_events: Iterable[Mapping[str, Any]],
    firmware_reference: Path,
    *,
    pinned_public_keys: Iterable[bytes] = (),
    certificate_roots: Iterable[bytes] = (),
    pcr_selection: Iterable[int] = IMAGE_PCR_SELECTION,
    workload_pcr: int = 15,
    max_session_ttl_seconds: int = 900,
) -> Policy:
    """A policy for the measured VM image (deploy/image/build-vm.sh): boot PCRs predicted from
    the image's files (encloud.cli.image_pcrs), the firmware's own PCRs from the recorded
    reference boot of the pinned OVMF build, the model digest the image was built with."""
    image_dir = Path(image_dir)
    try:
        built = strict_loads((image_dir / "image.json").read_bytes())
        uki = (image_dir / "uki.efi").read_bytes()
        reference = strict_loads(Path(firmware_reference).read_bytes())
    except (OSError, ValueError) as err:
        raise PolicyError(f"cannot read the image or the firmware reference: {err}") from err
    try:
        values = boot_pcrs(uki, reference)
        model_digest = bytes.fromhex(built["model_digest"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PolicyError(f"image.json or the firmware reference is malformed: {err!r}") from err
    selection = list(pcr_selection)
    return build_policy(
        pcr_selection=selection,
        workload_pcr=workload_pcr,
        allowed_model_digests=[model_digest],
        allowed_runtime_events=[runtime_event_digest(e) for e in runtime_events],
        pinned_public_keys=pinned_public_keys,
        certificate_roots=certificate_roots,
        pcr_values={i: v for i, v in values.items() if i in selection and i != workload_pcr},
        max_session_ttl_seconds=max_session_ttl_seconds,
        dev_only=False,
    )


def boot_pcrs(uki: bytes, reference: Mapping[str, Any]) -> dict[int, bytes]:
    """Every boot PCR of an image booted on the firmware of ``reference`` (a firmware reference
    file's JSON): the firmware's own PCRs as recorded, the rest predicted from the UKI.
    Raises KeyError, TypeError or ValueError on a malformed reference."""
    from encloud.cli import image_pcrs

    values = {int(k): bytes.fromhex(v) for k, v in reference["pcr_values"].items()}
    values.update(
        image_pcrs.predict(
            uki,
            _hex_map(reference["secure_boot_variables"]),
            [str(p) for p in reference["phases"]],
            [bytes.fromhex(e["sha256"]) for e in reference["pcr4_before_uki"]],
        )
    )
    return values


def _hex_map(obj: Mapping[str, str]) -> dict[str, bytes]:
    return {name: bytes.fromhex(value) for name, value in obj.items()}
