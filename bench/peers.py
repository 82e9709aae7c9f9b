"""Client side of the llama.cpp peer (bench.llama_worker), with bounded waits."""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install -r bench/requirements.txt"


class PeerUnavailable(Exception):
    """The peer cannot be measured; the message is the reason shown beside its null figures."""


def llama_cpp_missing_reason() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed ({INSTALL_HINT})"
    return None


class LlamaPeer:
    """A running bench.llama_worker process; every reply is awaited with a deadline."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, log_path: Path) -> None:
        self._log = log_path.open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "bench.llama_worker", str(gguf), str(threads), str(n_ctx)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            bufsize=0,
        )
        self._buffer = b""
        self._log_path = log_path
        self.pid = self._proc.pid
        ready = self._read(timeout=180.0)
        self.versions: dict[str, str] = ready.get("versions", {})

    def call(self, command: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(command) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise PeerUnavailable(self._died()) from None
        reply = self._read(timeout)
        if "error" in reply:
            raise PeerUnavailable(f"llama.cpp worker: {reply['error']}")
        return reply

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise PeerUnavailable(f"llama.cpp worker gave no answer in {timeout:.0f} s")
                if not sel.select(left):
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise PeerUnavailable(self._died())
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return dict(json.loads(line))

    def _died(self) -> str:
        code = self._proc.wait(timeout=10)
        what = f"signal {-code}" if code < 0 else f"exit code {code}"
        return (
            f"llama.cpp worker died ({what}; log {self._log_path}); a native build can crash "
            'in an AMX kernel here: rebuild with CMAKE_ARGS="-DGGML_NATIVE=OFF"'
        )

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(b'{"op": "quit"}\n')
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()
