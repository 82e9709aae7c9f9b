"""Every mistake a new user makes with the client commands is one line on stderr and a
non-zero exit, run as users run it (the installed `encloud` command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ENCLOUD = str(Path(sys.executable).with_name("encloud"))


def _run(*args: str, cwd: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [ENCLOUD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stderr


_SIGN = ["job", "sign", "--input", "p.json", "--key", "k", "--output-name", "a", "--signing-key",
         "c.pem", "-o", "m.json"]  # fmt: skip
_RUN = ["job", "run", "--manifest", "p.json", "--input", "p.json", "-o", "o.sealed"]


@pytest.mark.parametrize(
    ("args", "code", "wanted"),
    [
        (["chat", "--target", "127.0.0.1", "--policy", "p.json"], 2, "the port is required"),
        (["attest", "--target", "host:notaport", "--policy", "p.json"], 2, "not host:port"),
        (["chat", "--policy", "missing.json", "hi"], 1, "No such file or directory: missing.json"),
        (["chat", "--policy", "p.json", "--max-new-tokens", "-3", "hi"], 2, "-3 is not positive"),
        (["attest", "--policy", "p.json", "--ca", "missing-ca.pem"], 1, "missing-ca.pem"),
        (["attest", "--policy", "p.json", "--cert", "c.pem"], 2, "--cert and --key together"),
        (["policy", "init", "--target", "h:1"], 2, "required: -o/--output"),
        (["loadgen", "--target", "h", "--policy", "p.json", "--no-audit"], 2, "not host:port"),
        (["nonsense"], 2, "invalid choice"),
        (["tpm", "ak", "--state", "no-such-folder", "-o", "ak.pem"], 1, "is not a folder"),
        (["embed", "--target", "h:1", "--policy", "p.json"], 2, "encloud embed: no texts"),
        (["embed", "--policy", "p.json", "--dimensions", "0", "x"], 2, "0 is not positive"),
        ([*_SIGN, "--model-digest", "zz"], 2, "--model-digest is 64 hex digits"),
        ([*_SIGN, "--model-digest", "00" * 32, "--params", "{"], 2, "--params is a JSON"),
        ([*_SIGN, "--model-digest", "00" * 32, "--params", '{"seed": 1}'], 2, "unknown"),
        ([*_RUN, "--target", "h"], 2, "not host:port"),
        ([*_RUN[:2], "--manifest", "missing.json", *_RUN[4:]], 1, "missing.json"),
        ([*_RUN, "--target", "127.0.0.1:1"], 1, "UNAVAILABLE"),
        (["open", "p.json", "-o", "o", "--key", "k", "--manifest", "p.json"], 1, "manifest"),
    ],
    ids=[
        "no-port",
        "bad-port",
        "missing-policy",
        "negative-tokens",
        "missing-ca",
        "cert-without-key",
        "missing-option",
        "loadgen-no-port",
        "unknown-command",
        "tpm-ak-no-state",
        "embed-no-texts",
        "embed-zero-dimensions",
        "job-sign-bad-model",
        "job-sign-bad-params-json",
        "job-sign-unknown-param",
        "job-run-no-port",
        "job-run-missing-manifest",
        "job-run-no-server",
        "open-manifest-not-a-manifest",
    ],
)
def test_a_mistake_is_one_line(args, code, wanted, tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("{}")  # present; most cases fail before reading it
    (tmp_path / "c.pem").write_text("")
    (tmp_path / "k").write_text("11" * 32)
    got, stderr = _run(*args, cwd=tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert got == code, stderr
    assert len(lines) == 1 and wanted in lines[0], stderr
    assert "Traceback" not in stderr


def test_version(tmp_path: Path) -> None:
    proc = subprocess.run([ENCLOUD, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("encloud ")
