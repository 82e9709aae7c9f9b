"""The container image as an operator runs it: built by deploy/image/build.sh with Debian's
tools, run by podman read-only as a non-root user with a TPM socket mounted, answering an
attested, encrypted stream. Never skipped: without podman or mmdebstrap it fails (./dev
installs both)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from waiting import wait_for

from encloud.client import NO_AUDIT, Client
from encloud.protocol.policy import load_policy
from encloud.server.devstack import start_swtpm
from encloud.server.inference.manifest import verify_model_folder

pytestmark = pytest.mark.image

ROOT = Path(__file__).parent.parent
UID = 10001


def _podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=600, check=check, env=_env()
    )


def _env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}


@pytest.fixture(scope="module")
def image(model_dir: Path, embeddings_model_dir: Path) -> Iterator[str]:
    """The image as a deployment that serves chat and embeddings builds it."""
    for tool in ("podman", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is not installed (./dev installs it)"
    tag = f"localhost/encloud-server-test:{uuid.uuid4().hex[:12]}"
    build = str(ROOT / "deploy" / "image" / "build.sh")
    built = subprocess.run(
        [build, "--embeddings-model", str(embeddings_model_dir), str(model_dir), tag],
        capture_output=True,
        text=True,
        timeout=1200,
        env=_env(),
        cwd=ROOT,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.strip() == tag
    yield tag
    _podman("rmi", "--force", tag, check=False)


@dataclass
class Running:
    name: str
    address: str
    state: Path


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[Running]:
    swtpm = start_swtpm(tmp_path / "swtpm")
    # The container's user reaches the simulator's sockets through the mounted folder.
    (tmp_path / "swtpm").chmod(0o755)
    for name in ("swtpm.sock", "swtpm.sock.ctrl"):
        (tmp_path / "swtpm" / name).chmod(0o666)
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, UID, UID)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"encloud-test-{uuid.uuid4().hex[:8]}"
    args = ["run", "--detach", "--name", name, "--network", "host", "--read-only"]
    args += ["--tmpfs", "/tmp", "-v", f"{tmp_path / 'swtpm'}:/run/swtpm"]
    args += ["-v", f"{state}:/var/lib/encloud", image]
    args += ["--tpm", "swtpm:path=/run/swtpm/swtpm.sock", "--platform", "swtpm"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    args += ["--ready-file", "/var/lib/encloud/ready"]
    args += ["--dev-policy-path", "/var/lib/encloud/dev-policy.json"]
    try:
        _podman(*args)
        wait_for(
            lambda: (state / "ready").exists() or not _running(name),
            "the container's ready file",
            seconds=300,
        )
        assert (state / "ready").exists(), _podman("logs", name, check=False).stderr[-3000:]
        yield Running(name, f"127.0.0.1:{port}", state)
    finally:
        _podman("rm", "--force", "--time", "5", name, check=False)
        swtpm.stop()


def _running(name: str) -> bool:
    out = _podman("inspect", name, "--format", "{{.State.Running}}", check=False)
    return out.stdout.strip() == "true"


def test_the_image_is_non_root_and_labelled_with_its_models(
    image: str, model_dir: Path, embeddings_model_dir: Path
) -> None:
    inspected = json.loads(_podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == str(UID)
    digest = verify_model_folder(model_dir).model_digest.hex()
    assert config["Labels"]["dev.encloud.model-digest"] == digest
    embeddings = verify_model_folder(embeddings_model_dir).model_digest.hex()
    assert config["Labels"]["dev.encloud.embedding-model-digest"] == embeddings
    assert "ENCLOUD_EMBEDDINGS_MODEL_DIR=/opt/encloud/embeddings-model" in config["Env"]
    assert config["Entrypoint"][-1] == "encloud.server.app"


def test_the_container_serves_read_only_and_stops_cleanly(container: Running) -> None:
    inspected = json.loads(_podman("inspect", container.name).stdout)[0]
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    assert inspected["Config"]["User"] == str(UID)
    policy = load_policy(container.state / "dev-policy.json")
    with Client(container.address, policy, audit_log=NO_AUDIT) as client:
        assert "".join(client.stream([("user", "Say hi.")], max_new_tokens=8))
        assert client.attestation is not None
        assert set(client.attestation.models) == {"chat", "embeddings"}
        assert len(client.embed(["Say hi."]).vectors[0]) == 384
    # Nothing but the state volume is writable: the root filesystem refuses a write.
    refused = _podman(
        "exec",
        container.name,
        "/usr/bin/python3.11",
        "-c",
        "open('/opt/encloud/x', 'w')",
        check=False,
    )
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    _podman("stop", "--time", "30", container.name)
    exit_code = _podman("inspect", container.name, "--format", "{{.State.ExitCode}}").stdout
    assert exit_code.strip() == "0"
    assert "stopped; session keys wiped" in _podman("logs", container.name).stderr
