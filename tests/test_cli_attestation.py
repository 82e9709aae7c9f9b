"""The attestation CLI as a new user runs it, against a real server on swtpm.

`encloud policy from-manifest` (offline), `policy init` (dev only), `policy
check`, `attest --report --save`, `verify` (offline) and `audit verify`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encloud.cli.main import main
from encloud.cli.reference import model_digest_of_folder
from encloud.protocol import eventlog
from encloud.protocol.encoding import sha256
from encloud.protocol.policy import load_policy
from encloud.protocol.verifier import spki_der

pytestmark = pytest.mark.e2e


def _runtime_event_of(stack) -> dict:
    """The runtime event the server logged (what its image builder would publish)."""
    from encloud.client import first_use_evidence as fetch_evidence

    records = eventlog.parse(fetch_evidence(stack.address).evidence.workload_event_log)
    return json.loads(records[-1].event.data)


def _ak_pem(stack, tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    from encloud.client import first_use_evidence as fetch_evidence

    der = spki_der(fetch_evidence(stack.address).evidence.ak_public)
    key = serialization.load_der_public_key(der)
    path = tmp_path / "ak.pem"
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _pcr_values_file(stack, tmp_path: Path) -> Path:
    path = tmp_path / "pcrs.json"
    values = {str(i): v.hex() for i, v in stack.policy.pcr_values.items()}
    path.write_text(json.dumps(values))
    return path


@pytest.mark.unit
def test_model_digest_recomputed_offline_equals_the_manifest(model_dir) -> None:
    from encloud.server.inference.manifest import verify_model_folder

    assert model_digest_of_folder(model_dir) == verify_model_folder(model_dir).model_digest


def test_policy_from_manifest_verifies_a_real_server(stack, tmp_path, capsys) -> None:
    runtime = tmp_path / "runtime.json"
    runtime.write_text(json.dumps(_runtime_event_of(stack)))
    out = tmp_path / "policy.json"
    rc = main(
        [
            "policy",
            "from-manifest",
            str(stack.model_dir),
            "--runtime-event",
            str(runtime),
            "--ak-pin",
            str(_ak_pem(stack, tmp_path)),
            "--pcr-values",
            str(_pcr_values_file(stack, tmp_path)),
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    policy = load_policy(out)
    assert not policy.dev_only
    assert policy.allowed_model_digests == stack.policy.allowed_model_digests
    assert policy.allowed_runtime_events == stack.policy.allowed_runtime_events

    assert main(["attest", "--target", stack.address, "--policy", str(out), "--report"]) == 0
    printed = capsys.readouterr().out
    assert "PASS  model_digest" in printed
    assert "verified: all checks passed" in printed


@pytest.mark.engine
def test_policy_from_manifest_computes_the_runtime_event_locally(stack, tmp_path) -> None:
    out = tmp_path / "policy.json"
    args = ["policy", "from-manifest", str(stack.model_dir), "--compute-runtime"]
    args += ["--ak-pin", str(_ak_pem(stack, tmp_path)), "-o", str(out)]
    assert main(args) == 0
    assert load_policy(out).allowed_runtime_events == stack.policy.allowed_runtime_events


def test_policy_init_is_dev_only_and_warns(stack, tmp_path, capsys) -> None:
    out = tmp_path / "dev.json"
    assert main(["policy", "init", "--target", stack.address, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "DEV-ONLY POLICY" in captured.err
    policy = load_policy(out)
    assert policy.dev_only
    assert policy.pinned_public_keys == stack.policy.pinned_public_keys
    assert main(["policy", "check", str(out)]) == 0
    assert "dev_only" in capsys.readouterr().err


def test_policy_init_writes_the_runtime_event_a_from_image_policy_pins(stack, tmp_path) -> None:
    """A publisher's reference boot: the runtime event of the running start-up, as a file that
    `policy from-image --runtime-event` (and from-manifest) read back to the same pin."""
    event = tmp_path / "runtime-event.json"
    args = ["policy", "init", "--target", stack.address, "-o", str(tmp_path / "dev.json")]
    assert main([*args, "--runtime-event-out", str(event)]) == 0
    out = tmp_path / "policy.json"
    args = ["policy", "from-manifest", str(stack.model_dir), "--runtime-event", str(event)]
    args += ["--ak-pin", str(_ak_pem(stack, tmp_path)), "-o", str(out)]
    assert main(args) == 0
    assert load_policy(out).allowed_runtime_events == stack.policy.allowed_runtime_events


@pytest.mark.unit
def test_policy_check_names_the_bad_field(tmp_path, capsys) -> None:
    path = tmp_path / "bad.json"
    from test_policy import valid_obj

    obj = valid_obj()
    obj["workload_pcr"] = "15"
    path.write_text(json.dumps(obj))
    assert main(["policy", "check", str(path)]) == 1
    assert "policy field 'workload_pcr'" in capsys.readouterr().err


@pytest.mark.unit
def test_policy_check_lists_every_gap_of_a_bare_production_policy(tmp_path) -> None:
    # As a user runs it: the installed command, its exit status and what it prints.
    import subprocess
    import sys

    path = tmp_path / "bare.json"
    path.write_text('{"version": 1, "platform": {"kind": "sev-snp", "production": true}}')
    run = subprocess.run(
        [sys.executable, "-m", "encloud.cli.main", "policy", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr + run.stdout
    for item in (
        "pcr_selection: missing",
        "ak: missing",
        "ak: no pinned key and no certificate root",
        "platform.amd_roots:",
        "platform.measurements:",
        "platform.min_tcb:",
        "platform.vmpl:",
        *(f"PCR {i} (" for i in (0, 2, 4, 7, 8, 9, 11, 12)),
    ):
        assert item in run.stderr, item


@pytest.mark.unit
def test_policy_check_refuses_a_bank_the_server_never_extends(tmp_path, capsys) -> None:
    from test_policy import valid_obj

    obj = valid_obj()
    obj["pcr_bank"] = "sha384"
    obj["pcr_values"] = {}
    path = tmp_path / "sha384.json"
    path.write_text(json.dumps(obj))
    assert main(["policy", "check", str(path)]) == 1
    assert "pcr_bank: sha384 is never extended by the server" in capsys.readouterr().err


def test_attest_save_and_verify_offline(stack, tmp_path, capsys) -> None:
    policy = tmp_path / "policy.json"
    policy.write_bytes(stack.server.policy_path.read_bytes())
    bundle = tmp_path / "evidence.json"
    log = tmp_path / "audit.jsonl"
    args = ["attest", "--target", stack.address, "--policy", str(policy), "--save", str(bundle)]
    assert main([*args, "--audit-log", str(log)]) == 0
    capsys.readouterr()

    # No server needed from here on: a closed port proves it.
    assert main(["verify", str(bundle), "--policy", str(policy)]) == 0
    printed = capsys.readouterr().out
    assert "freshness (the client's nonce inside the quote) was checked at attestation time" in (
        printed
    )
    assert "verified: all checks passed" in printed
    saved = json.loads(bundle.read_text())
    assert saved["policy_sha256"] == sha256(load_policy(policy).to_json()).hex()
    assert "key" not in json.dumps({k: v for k, v in saved.items() if k != "session_public_key"})


def test_the_default_audit_log_is_written_and_its_path_printed(
    stack, tmp_path, capsys, monkeypatch
) -> None:
    """Without --audit-log every outcome goes to .encloud/audit.jsonl where the command
    runs, and the command says where (pass or fail); --no-audit says none was kept."""
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "policy.json"
    good.write_bytes(stack.server.policy_path.read_bytes())
    wrong = json.loads(good.read_text())
    wrong["allowed_model_digests"] = ["00" * 32]
    bad = tmp_path / "wrong-model.json"
    bad.write_text(json.dumps(wrong))
    default = (tmp_path / ".encloud" / "audit.jsonl").resolve()

    assert main(["attest", "--target", stack.address, "--policy", str(good)]) == 0
    assert f"appended to {default}" in capsys.readouterr().err
    assert main(["attest", "--target", stack.address, "--policy", str(bad)]) == 1
    assert f"appended to {default}" in capsys.readouterr().err
    assert _outcomes(default) == [("pass", None), ("fail", "model_digest")]

    args = ["attest", "--target", stack.address, "--policy", str(good), "--no-audit"]
    assert main(args) == 0
    assert "not kept (--no-audit)" in capsys.readouterr().err
    assert len(_outcomes(default)) == 2


def _outcomes(log: Path) -> list[tuple[str, str | None]]:
    entries = map(json.loads, log.read_text().splitlines())
    return [(e["outcome"], e["failed_check"]) for e in entries if e.get("event") == "attestation"]


def test_verify_offline_refuses_a_bundle_edited_after_saving(
    stack, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    policy = tmp_path / "policy.json"
    policy.write_bytes(stack.server.policy_path.read_bytes())
    bundle = tmp_path / "evidence.json"
    assert (
        main(["attest", "--target", stack.address, "--policy", str(policy), "--save", str(bundle)])
        == 0
    )
    saved = json.loads(bundle.read_text())
    saved["nonce"] = "00" * 32
    bundle.write_text(json.dumps(saved))
    assert main(["verify", str(bundle), "--policy", str(policy)]) == 1
    assert "FAIL  qualifying_data" in capsys.readouterr().out


def test_audit_log_with_checkpoints_from_the_cli(stack, tmp_path, capsys) -> None:
    key, pub = tmp_path / "cp.key", tmp_path / "cp.pub"
    assert main(["audit", "keygen", "--private", str(key), "--public", str(pub)]) == 0
    log, cps = tmp_path / "audit.jsonl", tmp_path / "elsewhere" / "audit.checkpoints"
    policy = str(stack.server.policy_path)
    for _ in range(2):
        args = ["attest", "--target", stack.address, "--policy", policy, "--audit-log", str(log)]
        args += ["--audit-checkpoint-key", str(key), "--audit-checkpoints", str(cps)]
        assert main(args) == 0
    capsys.readouterr()
    verify = ["audit", "verify", str(log), "--checkpoints", str(cps), "--public-key", str(pub)]
    assert main(verify) == 0
    assert "anchored through entry 2" in capsys.readouterr().out

    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["outcome"] for e in entries[1:]] == ["pass", "pass"]
    for field in ("server", "nonce_sha256", "ak_fingerprint", "model_digest", "policy_sha256"):
        assert entries[1][field]

    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"pass"', '"fail"')
    log.write_text("".join(lines))
    assert main(verify) == 1
    assert "entry 1 was edited" in capsys.readouterr().err


@pytest.mark.tpm
def test_tpm_ak_reads_before_start_up_the_ak_a_server_on_that_tpm_quotes_with(
    model_dir, tmp_path
) -> None:
    """`encloud tpm ak` on a TPM state nobody serves yet (a VM's, before it boots) gives the
    key the server later quotes with: a pin known in advance, as a cloud's AK API gives it."""
    from stack import running_stack

    from encloud.cli.reference import read_pinned_key

    state = tmp_path / "swtpm"  # where running_stack keeps its swtpm state
    state.mkdir(mode=0o700)
    first, again = tmp_path / "ak.pem", tmp_path / "ak-again.pem"
    assert main(["tpm", "ak", "--state", str(state), "-o", str(first)]) == 0
    assert main(["tpm", "ak", "--state", str(state), "-o", str(again)]) == 0
    assert first.read_bytes() == again.read_bytes()
    with running_stack(tmp_path, model_dir) as stack:
        assert stack.policy.pinned_public_keys == (read_pinned_key(first),)
    # A TPM with another endorsement seed has another AK: the pin names this TPM.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    assert main(["tpm", "ak", "--state", str(other), "-o", str(tmp_path / "other.pem")]) == 0
    assert read_pinned_key(tmp_path / "other.pem") != read_pinned_key(first)
