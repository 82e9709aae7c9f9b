"""A bounded pool of attested sessions, one encloud AsyncClient each.

Each client attests, verifies under the policy, writes the outcome to the shared audit log
and releases a fresh key on first use, and attests again on expiry or a lost session (the
client library's retry rules). Requests go to the least-busy client, at most
`streams_per_session` at once on each (the server's max_streams_per_session), so the pool
never asks one session for more than the server allows; beyond that they wait.

Every verification the pool's clients make is kept (a bounded record by evidence digest) for
GET /v1/encloud/attestation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from encloud.client import AsyncClient
from encloud.protocol.attest import Attempt
from encloud.protocol.audit import AuditLog
from encloud.protocol.policy import Policy

MAX_RECORDS = 256


@dataclass
class _Member:
    client: AsyncClient
    busy: int = 0


class SessionPool:
    def __init__(
        self,
        target: str,
        policy: Policy,
        audit: AuditLog | Any,
        *,
        sessions: int,
        streams_per_session: int,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 300.0,
    ) -> None:
        self.policy = policy
        self._members = [
            _Member(
                AsyncClient(
                    target, policy, audit_log=audit, credentials=credentials, timeout=timeout
                )
            )
            for _ in range(sessions)
        ]
        self._slots = asyncio.Semaphore(sessions * streams_per_session)
        self._per_session = streams_per_session
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._free = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[AsyncClient]:
        """The least-busy client, held for one request."""
        async with self._slots, self._free:
            await self._free.wait_for(
                lambda: any(m.busy < self._per_session for m in self._members)
            )
            member = min(self._members, key=lambda m: m.busy)
            member.busy += 1
        try:
            yield member.client
        finally:
            async with self._free:
                member.busy -= 1
                self._free.notify()
            self.record(member.client.last_attempt)

    def record(self, attempt: Attempt | None) -> None:
        """Keep the verification report of an attestation (pass or fail)."""
        if attempt is None:
            return
        key = (
            attempt.attestation.attest_digest.hex()
            if attempt.attestation is not None
            else f"failed-{attempt.nonce.hex()[:16]}"
        )
        if key in self._records:
            self._records.move_to_end(key)
            return
        verified = attempt.attestation
        self._records[key] = {
            "evidence_digest": verified.attest_digest.hex() if verified else None,
            "outcome": "pass" if attempt.failure is None else "fail",
            "failed_check": attempt.failure.check if attempt.failure is not None else None,
            "checks": [
                {"check": r.name, "passed": r.passed, "detail": r.detail} for r in attempt.report
            ],
            "ak_fingerprint": verified.ak_fingerprint if verified else None,
            "model_digest": (
                verified.model_digest.hex() if verified and verified.model_digest else None
            ),
            "embedding_model_digest": (
                verified.models["embeddings"].hex()
                if verified and "embeddings" in verified.models
                else None
            ),
            "policy_sha256": attempt.policy_sha256.hex(),
            "server": attempt.target,
            "verified_at": datetime.datetime.fromtimestamp(
                attempt.verified_at, datetime.UTC
            ).isoformat(),
            "nonce": base64.b64encode(attempt.nonce).decode(),
        }
        while len(self._records) > MAX_RECORDS:
            self._records.popitem(last=False)

    def report(self, evidence_digest: str | None) -> dict[str, Any] | None:
        if evidence_digest is None:
            return next(reversed(self._records.values()), None)
        return self._records.get(evidence_digest)

    @property
    def sessions(self) -> int:
        return sum(1 for m in self._members if m.client.session_id is not None)

    async def close(self) -> None:
        """End every session (the server wipes its keys) and wipe ours."""
        await asyncio.gather(*(m.client.close() for m in self._members), return_exceptions=True)
