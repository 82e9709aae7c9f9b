"""The known-answer value catches a weight change that the file digests do not.

The attack simulated: the model's weights are swapped after the manifest check (time of check
to time of use), so the model digest in the event log is still the genuine one. The greedy
tokens for the fixed prompts change, so the runtime event changes, and a policy that allows
only the genuine runtime event refuses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from encloud.protocol.encoding import sha256
from encloud.protocol.eventlog import canonical_json
from encloud.protocol.policy import build_policy
from encloud.server.inference import engine as engine_mod
from encloud.server.inference.engine import Engine
from encloud.server.inference.manifest import verify_model_folder
from encloud.server.runtime_event import runtime_event
from encloud.server.settings import Settings


@pytest.mark.engine
def test_known_answer_catches_weights_swapped_after_the_digest_check(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    genuine = Engine.load(model_dir, threads=2)
    genuine_event = runtime_event(Settings(), genuine.facts())
    genuine.close()

    tampered = tmp_path / "model"
    shutil.copytree(model_dir, tampered)
    data = tampered / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + (4 << 20)] = bytes(4 << 20)  # zero 4 MiB of weights mid-file
    data.write_bytes(bytes(raw))

    # The check passes on the genuine folder; the engine then loads the swapped one.
    genuine_manifest = verify_model_folder(model_dir)
    monkeypatch.setattr(engine_mod, "verify_model_folder", lambda _folder: genuine_manifest)
    swapped = Engine.load(tampered, threads=2)
    swapped_event = runtime_event(Settings(), swapped.facts())
    swapped.close()

    assert swapped.model_digest == genuine_manifest.model_digest  # digests did not catch it
    assert swapped_event["engine"]["model_digest"] == genuine_event["engine"]["model_digest"]
    assert swapped_event["engine"]["known_answer"] != genuine_event["engine"]["known_answer"]

    ak = ec.generate_private_key(ec.SECP256R1()).public_key()
    policy = build_policy(
        pcr_selection=[15],
        workload_pcr=15,
        allowed_model_digests=[genuine_manifest.model_digest],
        allowed_runtime_events=[sha256(canonical_json(genuine_event))],
        pinned_public_keys=[
            ak.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ],
        max_session_ttl_seconds=600,
        dev_only=True,
    )
    # What the verifier's runtime_event step checks (protocol/verifier.py): the SHA-256 of the
    # start-up's canonical runtime event must be in the policy's list.
    assert sha256(canonical_json(genuine_event)) in policy.allowed_runtime_events
    assert sha256(canonical_json(swapped_event)) not in policy.allowed_runtime_events
    assert swapped.model_digest in policy.allowed_model_digests
