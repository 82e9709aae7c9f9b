"""`encloud serve` as a new user runs it: flags over ENCLOUD_* over a config file, `--help`
naming every setting, and every foreseeable mistake one line on stderr with a non-zero exit
(no traceback, no "Event loop is closed" noise)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import running_stack
from waiting import wait_for

from encloud.client import NO_AUDIT, Client
from encloud.protocol.policy import load_policy
from encloud.server import config
from encloud.server.settings import Settings

ENCLOUD = str(Path(sys.executable).with_name("encloud"))


def _serve(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run `encloud serve ARGS` to its end; (exit code, stderr)."""
    proc = subprocess.run(
        [ENCLOUD, "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ENCLOUD_METRICS_PORT": "0", "ENCLOUD_PORT": "0", **(env or {})},
    )
    return proc.returncode, proc.stderr


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr
    return lines[0]


@pytest.mark.unit
def test_help_lists_every_setting_with_its_variable_and_default(capsys) -> None:
    with pytest.raises(SystemExit):
        config.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in Settings.model_fields:
        assert config.flag(name) in text, name
        assert f"env {config.env_name(name)};" in text, name
    assert "--model" in text and "--tpm" in text and "--tls-cert" in text


@pytest.mark.unit
def test_flags_beat_variables_which_beat_the_config_file(tmp_path, monkeypatch) -> None:
    file = tmp_path / "encloud.toml"
    file.write_text('port = 1111\nthreads = 3\nlog_level = "DEBUG"\npcr_selection = [7, 15]\n')
    monkeypatch.setenv("ENCLOUD_THREADS", "5")
    monkeypatch.setenv("ENCLOUD_LOG_LEVEL", "WARNING")
    settings, debug = config.parse(["--config", str(file), "--log-level", "ERROR"])
    assert (settings.port, settings.threads, settings.log_level) == (1111, 5, "ERROR")
    assert settings.pcr_selection == [7, 15] and not debug
    settings, _ = config.parse(["--pcr-selection", "0,7,15", "--reflection", "--model", "/m"])
    assert settings.pcr_selection == [0, 7, 15] and settings.reflection
    assert settings.model_dir == Path("/m")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--port", "99999"], {}, "--port / ENCLOUD_PORT"),
        (["--threads", "many"], {}, "--threads / ENCLOUD_THREADS"),
        ([], {"ENCLOUD_MAX_BATCH": "0"}, "--max-batch / ENCLOUD_MAX_BATCH"),
        (["--workload-pcr", "16", "--pcr-selection", "16"], {}, "PCR 16 can be reset"),
        (["--config", "/no/such.toml"], {}, "config file not found"),
    ],
    ids=["port-range", "not-a-number", "variable", "cross-field", "config-missing"],
)
def test_a_bad_setting_is_one_line_naming_the_flag_and_variable(
    args, env, names, monkeypatch, capsys
) -> None:
    from encloud.server.app import run

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert names in line and line.startswith("encloud serve: ")


@pytest.mark.unit
def test_an_unknown_key_in_the_config_file_is_named(tmp_path) -> None:
    file = tmp_path / "encloud.toml"
    file.write_text("prot = 1\n")
    with pytest.raises(config.SettingsError, match=r"unknown setting.*prot"):
        config.parse(["--config", str(file)])


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["--model", "/no/such/model"], r"no exported model at /no/such/model \(--model"),
        (["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], r"tls_cert_file .*no file"),
        (["--provider", "cuda"], r"provider cuda .*no usable CUDA"),
        (["--no-serve-chat"], r"nothing to serve: --no-serve-chat .* needs --embeddings-model"),
        (
            ["--embeddings-model", "/no/such/dir"],
            r"no exported embedding model at /no/such/dir \(--embeddings-model",
        ),
        (
            ["--embeddings-model", "EMBED", "--embed-max-texts", "1024"],
            r"embed_max_texts 1024 .* above max_message_bytes 1048576",
        ),
    ],
    ids=[
        "no-model",
        "no-tls-file",
        "no-cuda",
        "nothing-to-serve",
        "no-embedding-model",
        "embed-response-too-big",
    ],
)
def test_a_start_up_mistake_is_one_line(
    args, wanted, model_dir: Path, embeddings_model_dir: Path
) -> None:
    args = [str(embeddings_model_dir) if a == "EMBED" else a for a in args]
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    code, stderr = _serve(*args)
    assert code == 1
    assert re.search(wanted, _one_line(stderr)), stderr


@pytest.mark.e2e
def test_an_unreachable_tpm_names_the_tcti_and_stops_cleanly(
    model_dir: Path, tmp_path: Path
) -> None:
    tcti = f"swtpm:path={tmp_path}/absent.sock"
    code, stderr = _serve("--model", str(model_dir), "--tpm", tcti, "--platform", "swtpm")
    assert code == 1
    line = _one_line(stderr)
    assert tcti in line and "encloud tpm start" in line


@pytest.mark.e2e
def test_a_taken_port_fails_the_second_server(model_dir: Path, tmp_path: Path) -> None:
    with running_stack(tmp_path / "first", model_dir) as stack:
        port = stack.address.rsplit(":", 1)[1]
        code, stderr = _serve("--model", str(model_dir), "--port", port, "--tpm", stack.swtpm.tcti)
        assert code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in _one_line(stderr)


@pytest.fixture
def tpm_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [ENCLOUD, "tpm", "start", "--state", str(tmp_path / "tpm")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        tcti = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("TCTI:"))
        yield proc, tcti
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.e2e
def test_the_documented_way_tpm_start_then_serve_with_flags(
    tpm_process, model_dir: Path, tmp_path: Path
) -> None:
    """docs/DEPLOY.md's first steps: a simulator, then the server from flags alone."""
    _, tcti = tpm_process
    ready, policy = tmp_path / "ready", tmp_path / "dev-policy.json"
    args = ["--model", str(model_dir), "--tpm", tcti, "--platform", "swtpm", "--port", "0"]
    args += ["--state-dir", str(tmp_path / "state"), "--ready-file", str(ready)]
    args += ["--dev-policy-path", str(policy), "--metrics-port", "0"]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([ENCLOUD, "serve", *args], stderr=out)
    try:
        wait_for(lambda: ready.exists() or server.poll() is not None, "the server's ready file")
        assert server.poll() is None, log.read_text()
        address = ready.read_text().split()[0]
        with Client(address, load_policy(policy), audit_log=NO_AUDIT) as client:
            assert client.infer([("user", "Say hi.")], max_new_tokens=4).text
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.unit
def test_debug_keeps_the_traceback(tmp_path: Path) -> None:
    from encloud.server.app import StartupError, run

    with pytest.raises(StartupError, match="no exported model"):
        run(["--debug", "--model", str(tmp_path / "absent"), "--metrics-port", "0"])
