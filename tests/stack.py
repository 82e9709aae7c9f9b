"""A real server stack for tests: swtpm plus a server process and its dev policy."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encloud.protocol.policy import Policy, load_policy


@dataclass
class Stack:
    """swtpm plus a running server process, and the dev policy it wrote."""

    workdir: Path
    swtpm: Any
    server: Any
    policy: Policy
    address: str
    model_dir: Path

    def restart_server(self, **settings: Any) -> None:
        """SIGTERM the server and start a new one on the same TPM and folder (with these
        settings instead of the first server's)."""
        from encloud.server.devstack import ServerProcess

        assert self.server.terminate() == 0
        self.server = ServerProcess(
            self.workdir, self.swtpm.tcti, self.model_dir, **{**ONE_PEER_IS_EVERYONE, **settings}
        )
        self.address = self.server.start()


def free_port() -> int:
    """A loopback port nothing listens on now (for a process the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Every test client dials from 127.0.0.1: one peer. Its per-peer quotas are the global ones
# here, so that tests of other things are not refused as one greedy caller; the per-peer
# quotas themselves are tested with two peers (tests/test_fairness_service.py).
ONE_PEER_IS_EVERYONE = {
    "max_pending_sessions_per_peer": 64,
    "max_sessions_per_peer": 256,
    "max_queued_requests_per_peer": 128,
}


@contextlib.contextmanager
def running_stack(workdir: Path, model_dir: Path, **settings: Any) -> Iterator[Stack]:
    """swtpm and a server in `workdir` with extra server settings (and `extra_env`),
    killed on exit. Fixtures that need a server of their own build on this."""
    from encloud.server.devstack import ServerProcess, start_swtpm

    settings = {**ONE_PEER_IS_EVERYONE, **settings}
    swtpm = start_swtpm(workdir / "swtpm")
    server = ServerProcess(workdir, swtpm.tcti, model_dir, **settings)
    stack: Stack | None = None
    try:
        address = server.start()
        stack = Stack(workdir, swtpm, server, load_policy(server.policy_path), address, model_dir)
        yield stack
    finally:
        # The server running now: a test may have restarted it (Stack.restart_server).
        (stack.server if stack is not None else server).kill()
        swtpm.stop()
