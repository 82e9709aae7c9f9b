"""The Node.js client (clients/node) against the shared vectors and a real server.

The client is written from docs/PROTOCOL.md; these tests are the proof that the spec is
complete: it installs its packages (npm ci from the lock file), checks every vector with
node's test runner, then attests, verifies, releases a key, runs Infer and StreamInfer
against the real server of the `stack` fixture, and refuses the wrong-nonce and
stream-tampering attacks with the same typed errors the Python client raises.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import NODE_DIR
from relay import Relay

from encloud.client import NO_AUDIT, Client

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Name three colours of the rainbow."
MAX_NEW_TOKENS = 12


def _run_node(node: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    result = subprocess.run(
        [node, "bin/encloud-node.js", *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output (rc {result.returncode}): {result.stderr}"
    return json.loads(lines[-1])


def test_node_client_passes_every_vector(node_client: str) -> None:
    result = subprocess.run(
        [node_client, "--test", "--test-reporter=tap", "test/"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
    # Each negative evidence vector ran as its own subtest.
    vectors = json.loads((ROOT / "tests" / "vectors" / "evidence.json").read_text())
    for case in vectors["negative"]:
        pattern = rf"^\s*ok \d+ - {re.escape(case['name'])}$"
        assert re.search(pattern, result.stdout, re.MULTILINE), case["name"]


def _end_to_end(node_client: str, stack: Any, address: str) -> dict:
    return _run_node(
        node_client,
        "--target",
        address,
        "--policy",
        str(stack.server.policy_path),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
    )


def test_node_client_end_to_end(node_client: str, stack: Any) -> None:
    relay = Relay(stack.address).start()  # to see the metadata of every call
    try:
        out = _end_to_end(node_client, stack, relay.address)
    finally:
        relay.stop()
    assert out["ok"], out
    # The replica's routing token from the Attest reply went with every later call.
    route = out["route"]
    assert len(route) == 32
    sent = [(method, md.get("encloud-route", "")) for method, md in relay.metadata]
    assert [m for m, token in sent if token != route] == ["Attest"], sent
    assert all(line.startswith("PASS") for line in out["report"]) and len(out["report"]) >= 20
    assert bytes.fromhex(out["model_digest"]) in stack.policy.allowed_model_digests
    assert out["infer"]["text"].strip()
    assert out["infer"]["finishReason"] in {"stop", "length"}
    assert 0 < out["infer"]["completionTokens"] <= MAX_NEW_TOKENS
    # Greedy decoding: the stream says what Infer said, frame by frame.
    assert out["stream"]["text"] == out["infer"]["text"]
    assert len(out["stream"]["pieces"]) >= 1
    assert out["stream"]["finishReason"] == out["infer"]["finishReason"]

    assert out["suite_kem_id"] == 0x647A  # the post-quantum hybrid, where both sides have it

    # The Python client, same server and prompt, gets the same answer and the same AK.
    with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
        attestation = client.attest()
        client.release_key()
        answer = client.infer([("user", PROMPT)], max_new_tokens=MAX_NEW_TOKENS)
    assert answer.text == out["infer"]["text"]
    assert attestation.ak_fingerprint == out["ak_fingerprint"]


def test_node_client_refuses_wrong_nonce_and_stream_tampering(node_client: str, stack: Any) -> None:
    out = _run_node(
        node_client,
        "--target",
        stack.address,
        "--policy",
        str(stack.server.policy_path),
        "--max-new-tokens",
        "8",
        "--attacks",
    )
    assert out["ok"], out
    attacks = out["attacks"]
    assert attacks["baseline"]["error"] is None and attacks["baseline"]["frames"] >= 3, attacks
    expected = {
        "wrong_nonce": "NonceMismatchError",
        "replayed_quote": "NonceMismatchError",
        "malformed_reply": "MalformedAttestResponseError",
        "stream_drop_final": "TruncatedStreamError",
        "stream_drop_frame": "HeaderMismatchError",
        "stream_swap_frames": "HeaderMismatchError",
        "stream_flip_bit": "DecryptError",
        "stream_replay_frame_relabelled": "DecryptError",
        "stream_replay_frame_own_header": "HeaderMismatchError",
        "stream_frame_after_final": "StreamOrderError",
        "stream_final_forged": "DecryptError",
    }
    got = {name: attacks[name]["error"] for name in expected}
    assert got == expected
    assert attacks["wrong_nonce"]["check"] == "qualifying_data"
    assert attacks["malformed_reply"]["check"] == "attest_response"
    # The session still works after every refused stream.
    assert attacks["after_attacks"]["error"] is None


def test_node_client_uses_the_suite_its_policy_lists(
    node_client: str, stack: Any, tmp_path
) -> None:
    policy = json.loads(stack.server.policy_path.read_text())
    policy["hpke_suites"] = ["x25519"]
    path = tmp_path / "x25519-only.json"
    path.write_text(json.dumps(policy))
    out = _run_node(
        node_client, "--target", stack.address, "--policy", str(path), "--max-new-tokens", "4"
    )
    assert out["ok"], out
    assert out["suite_kem_id"] == 0x0020
