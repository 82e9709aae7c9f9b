"""A software TPM (swtpm) process for development and tests.

`Swtpm` runs `swtpm socket --tpm2` on a Unix socket in a state folder and gives the TCTI
string that `encloud.server.attestation.tpm.Tpm.open` takes. It needs no root. The state
folder is a private temporary folder (mode 0700, removed on stop) unless one is given, in
which case it is kept, so that the TPM's NV (and its seeds, hence its primary keys) survive a
restart of the process. PCRs do not survive a restart: every start is a TPM reset
(`--flags not-need-init,startup-clear`).

    with Swtpm() as sw:
        tpm = Tpm.open(sw.tcti)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

SOCKET_NAME = "swtpm.sock"
CTRL_SOCKET_NAME = "swtpm.sock.ctrl"
DEFAULT_START_TIMEOUT = 10.0


class SwtpmError(RuntimeError):
    """swtpm is not installed, did not start, or did not answer in time."""


class Swtpm:
    """One swtpm process serving a TPM 2.0 on a Unix socket in `state_dir`."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        binary: str = "swtpm",
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        if state_dir is None:
            # mkdtemp makes the folder with mode 0700.
            self._state_dir = Path(tempfile.mkdtemp(prefix="encloud-swtpm-"))
            self._owns_state_dir = True
        else:
            self._state_dir = Path(state_dir)
            self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owns_state_dir = False
        self._binary = binary
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    # --- properties ---------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def socket_path(self) -> Path:
        return self._state_dir / SOCKET_NAME

    @property
    def log_path(self) -> Path:
        """swtpm's own stderr (not secret: it never sees plaintext)."""
        return self._state_dir / "swtpm.log"

    @property
    def ctrl_socket_path(self) -> Path:
        return self._state_dir / CTRL_SOCKET_NAME

    @property
    def tcti(self) -> str:
        """The TCTI configuration string, e.g. `swtpm:path=/tmp/x/swtpm.sock`."""
        return f"swtpm:path={self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> Swtpm:
        if self.running:
            return self
        binary = shutil.which(self._binary)
        if binary is None:
            raise SwtpmError(f"{self._binary!r} is not installed (apt-get install swtpm)")
        for path in (self.socket_path, self.ctrl_socket_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        d = self._state_dir
        argv = [
            binary,
            "socket",
            "--tpm2",
            "--server",
            f"type=unixio,path={d / SOCKET_NAME}",
            "--ctrl",
            f"type=unixio,path={d / CTRL_SOCKET_NAME}",
            "--tpmstate",
            f"dir={d}",
            "--flags",
            "not-need-init,startup-clear",
        ]
        # swtpm writes to stderr as it serves; a pipe nobody drains fills up after
        # ~2000 commands and blocks swtpm mid-command, so it goes to a file instead.
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, resolved binary
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout
        delay = 0.001
        while True:
            if self._process.poll() is not None:
                self._process = None
                err = self.log_path.read_bytes()[-2000:] if self.log_path.exists() else b""
                raise SwtpmError(f"swtpm exited during start-up: {err.decode(errors='replace')}")
            if self._socket_answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise SwtpmError(f"swtpm did not answer within {self._start_timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _socket_answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop swtpm gracefully (SIGTERM, then SIGKILL after `timeout`); keep the state."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """SIGKILL swtpm (fault injection). The state folder stays."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self) -> Swtpm:
        """Stop and start on the same state folder: a TPM reset (PCRs reset, NV survives)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop swtpm and remove the state folder if this object created it."""
        self.stop()
        if self._owns_state_dir:
            shutil.rmtree(self._state_dir, ignore_errors=True)

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
