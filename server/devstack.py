"""A local stack for the demo and the tests: swtpm plus a real server process.

The server runs as its own process (`python -m encloud.server.app`) with its
settings in ENCLOUD_* variables, exactly as in a deployment; only the TPM is a
simulator and the policy is written by the server (dev only).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from encloud.server.attestation.swtpm import Swtpm


class ServerProcess:
    def __init__(
        self,
        workdir: Path,
        tcti: str,
        model_dir: Path,
        extra_env: dict[str, str] | None = None,
        module: str = "encloud.server.app",
        **settings: object,
    ) -> None:
        self.workdir = workdir
        self.module = module
        self.ready_file = workdir / "ready"
        self.log_path = workdir / "server.log"
        self.policy_path = workdir / "dev-policy.json"
        self.env = {
            **os.environ,
            "ENCLOUD_PORT": "0",
            "ENCLOUD_TCTI": tcti,
            "ENCLOUD_STATE_DIR": str(workdir / "state"),
            "ENCLOUD_MODEL_DIR": str(model_dir),
            "ENCLOUD_READY_FILE": str(self.ready_file),
            "ENCLOUD_DEV_POLICY_PATH": str(self.policy_path),
            "TSS2_LOG": "all+NONE",
            "ENCLOUD_METRICS_PORT": "0",
        }
        self.env.update(extra_env or {})
        for name, value in settings.items():
            self.env[f"ENCLOUD_{name.upper()}"] = str(value)
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.metrics_address = ""

    def start(self, timeout: float = 300.0) -> str:
        """Start the server and wait until it serves; returns its host:port."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting (it listens, NOT_SERVING, before it is ready)."""
        self.ready_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - this interpreter, a module we name
            [sys.executable, "-m", self.module],
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=self.workdir,
        )
        log.close()

    def listening_address(self, timeout: float = 60.0) -> str:
        """The address from the "listening, not serving yet" log line (before ready)."""
        import json

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("message") == "listening, not serving yet":
                    return str(entry["address"])
            time.sleep(0.02)
        raise TimeoutError("the server did not log its address")

    def wait_ready(self, timeout: float = 300.0) -> str:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"server exited with {self.process.returncode}; log: {self.log_path}\n{tail}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"server not ready after {timeout:.0f} s; log: {self.log_path}")
            time.sleep(0.05)
        lines = self.ready_file.read_text().split()
        self.address = lines[0]
        for line in lines[1:]:
            if line.startswith("metrics="):
                self.metrics_address = line.removeprefix("metrics=")
        return self.address

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, as an orchestrator would; returns the exit code."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_swtpm(state_dir: Path) -> Swtpm:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    swtpm = Swtpm(state_dir)
    swtpm.start()
    return swtpm
