"""The client's audit log of attestation outcomes: append-only JSON lines.

Each line is canonical JSON (sorted keys, no whitespace) with a sequence
number `seq` and `prev`, the SHA-256 of the exact bytes of the previous line
without its newline (32 zero bytes before the first). Entries hold digests
and outcomes only, never a key or a plaintext.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

GENESIS = bytes(32)


class AuditLog:
    def __init__(self, path: Path, *, sync: bool = True) -> None:
        self.path = path
        self.sync = sync
        self._lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            seq, prev = self._tail()
            record = {**entry, "seq": seq, "prev": prev.hex(), "time": int(time.time())}
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as handle:
                handle.write(line.encode("ascii") + b"\n")
                handle.flush()
                if self.sync:
                    os.fsync(handle.fileno())
            return record

    def _tail(self) -> tuple[int, bytes]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        last = self.path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return json.loads(last)["seq"] + 1, hashlib.sha256(last).digest()


def verify_chain(path: Path) -> int:
    """Check sequence numbers and hash links; return the number of entries.

    Raises ValueError naming the first entry that breaks the chain.
    """
    prev, count = GENESIS, 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise ValueError("the last entry is incomplete")
    for index, line in enumerate(data.splitlines()):
        record = json.loads(line)
        if record.get("seq") != index or record.get("prev") != prev.hex():
            raise ValueError(f"entry {index} breaks the chain")
        prev, count = hashlib.sha256(line).digest(), count + 1
    return count
