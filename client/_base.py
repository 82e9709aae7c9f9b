"""What the blocking and the asyncio client share: arguments, the session, sealing.

Neither class makes an RPC here; each drives the protocol's generators
(encloud.protocol.attest) with its own stub and applies the retry rules of _retry.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from encloud.protocol import attest
from encloud.protocol.audit import AuditLog
from encloud.protocol.embedding import embedding_request
from encloud.protocol.envelope import MessageType, Sealed, transcript_start
from encloud.protocol.errors import RoleNotAttestedError, SessionError, SessionExpiredError
from encloud.protocol.eventlog import ROLE_CHAT, ROLE_EMBEDDINGS
from encloud.protocol.generation import Message, generation_request
from encloud.protocol.policy import Policy, load_policy
from encloud.protocol.verifier import CheckResult, VerifiedAttestation
from encloud.protocol.wire import ROUTE_HEADER

from ._retry import RetryPolicy

log = logging.getLogger("encloud.client")

DEFAULT_TIMEOUT_SECONDS = 60.0


def route_metadata(route: str) -> tuple[tuple[str, str], ...] | None:
    """The metadata of a call in a session: its replica's routing token, when it has one."""
    return ((ROUTE_HEADER, route),) if route else None


def route_from(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The routing token in an Attest reply's initial metadata ("" when there is none)."""
    for key, value in metadata or ():
        if key == ROUTE_HEADER:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""


def _require_role(session: attest.Session, role: str) -> None:
    """Send a request only to a server whose verified running start-up measured a model of
    the role it needs: nothing the attestation does not cover gets the plaintext."""
    if role not in session.attestation.models:
        raise RoleNotAttestedError(
            f"the attested server serves no {role} model (its models: "
            f"{', '.join(session.attestation.models) or 'none'}); nothing was sent"
        )


class NoAudit:
    """The explicit choice to keep no audit log (pass `NO_AUDIT` as `audit_log`)."""

    _instance: NoAudit | None = None

    def __new__(cls) -> NoAudit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_AUDIT"


NO_AUDIT: Final = NoAudit()

PolicyArg = Policy | str | os.PathLike[str]
AuditArg = str | os.PathLike[str] | AuditLog | NoAudit


def as_policy(policy: object) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str | os.PathLike):
        return load_policy(policy)
    raise TypeError(
        f"policy must be a Policy or the path of a policy file, not {type(policy).__name__}"
    )


def as_audit_log(audit_log: object) -> AuditLog | None:
    if isinstance(audit_log, NoAudit):
        return None
    if isinstance(audit_log, AuditLog):
        return audit_log
    if isinstance(audit_log, str | os.PathLike):
        return AuditLog(Path(audit_log))
    raise TypeError(
        "audit_log must be a path, an AuditLog or NO_AUDIT (to keep no log), "
        f"not {type(audit_log).__name__}"
    )


class ClientState:
    """The arguments, the current session and what the last attestation showed.

    Sessions are shared by concurrent calls: each call marks the session it uses, and a
    session that is replaced (re-attestation, expiry, a new attest) is wiped only once the
    last call using it is done."""

    def __init__(
        self,
        target: str,
        policy: PolicyArg,
        audit_log: AuditArg,
        timeout: float | None,
        retry: RetryPolicy,
        auto_reattest: bool,
        on_reattest: Callable[[VerifiedAttestation], None] | None,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise TypeError("target must be 'host:port'")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise TypeError("timeout must be positive seconds, or None for no deadline")
        self.target = target
        self.policy = as_policy(policy)
        self._audit = as_audit_log(audit_log)
        self.timeout = timeout
        self.retry = retry
        self.auto_reattest = auto_reattest
        self.on_reattest = on_reattest
        self.reattest_count = 0
        self.retry_count = 0
        self.last_attempt: attest.Attempt | None = None
        self._attested: attest.Attempt | None = None  # verified, key not released yet
        self._session: attest.Session | None = None
        self._bound_before = False  # a key was released once: a new session is a re-attest
        self._caller_dek: bytearray | None = None

    # --- what callers see -------------------------------------------------------------

    @property
    def attestation(self) -> VerifiedAttestation | None:
        """The verified attestation of the current session (None before one)."""
        if self._session is not None:
            return self._session.attestation
        return self._attested.attestation if self._attested is not None else None

    @property
    def session_id(self) -> bytes | None:
        """The id of the session the key was released to (None before that)."""
        return self._session.session_id if self._session is not None else None

    @property
    def last_report(self) -> list[CheckResult]:
        """Every check of the last attestation, passed or not (`encloud attest --report`)."""
        return list(self.last_attempt.report) if self.last_attempt is not None else []

    # --- the handshake ----------------------------------------------------------------

    def _handshake(self, *, release: bool) -> Generator[attest.Call, Any, attest.Handshake]:
        # Looked up on the module at call time: the one attest path, patched in tests.
        return attest.attest_and_release(
            self.policy,
            target=self.target,
            audit=self._audit,
            release=release,
            dek=self._caller_dek,
        )

    def _take(self, handshake: attest.Handshake) -> VerifiedAttestation:
        self.last_attempt = handshake.attempt
        if handshake.attempt.failure is not None:
            raise handshake.attempt.failure
        self._drop_session()
        attestation = handshake.attempt.attestation
        assert attestation is not None
        if handshake.session is None:
            self._attested = handshake.attempt
        else:
            self._bind(handshake.session)
        return attestation

    def _bind(self, session: attest.Session) -> None:
        self._attested = None
        self._session = session
        self._bound_before = True

    def _set_caller_dek(self, dek: bytes | bytearray | None) -> None:
        """Keep the caller's DEK to release again on re-attestation (only then); without
        one, forget any earlier one, so the next release is a fresh key."""
        if dek is not None and (not isinstance(dek, bytes | bytearray) or len(dek) != 32):
            raise TypeError("dek must be 32 bytes (an AES-256 key)")
        self._wipe_caller_dek()
        if dek is not None and self.auto_reattest:
            self._caller_dek = bytearray(dek)

    def _live_session(self) -> attest.Session | None:
        """The bound session, or None when there is none or it expired on our clock."""
        session = self._session
        if session is not None and time.monotonic() >= session.expires_at:
            self._drop_session()
            if not self.auto_reattest:
                raise SessionExpiredError("the session expired; attest again")
            return None
        return session

    def _reattested(self, why: str) -> None:
        self.reattest_count += 1
        log.info("re-attested: %s", why)
        if self.on_reattest is not None and self._session is not None:
            self.on_reattest(self._session.attestation)

    def _seal(
        self, session: attest.Session, messages: Sequence[Message], params: Mapping[str, Any]
    ) -> tuple[int, Sealed, bytes]:
        """(request id, sealed REQUEST, T_0): a new request id for every attempt."""
        _require_role(session, ROLE_CHAT)
        payload = generation_request(messages, params)
        request_id = session.take_request_id()
        sealed = session.c2s.seal(MessageType.REQUEST, request_id, 0, payload)
        return request_id, sealed, transcript_start(session.session_id, request_id, sealed.data)

    def _seal_embed(
        self, session: attest.Session, texts: Sequence[str], options: Mapping[str, Any]
    ) -> tuple[int, Sealed, bytes]:
        """(request id, sealed EMBED_REQUEST, T_0): a new request id for every attempt."""
        _require_role(session, ROLE_EMBEDDINGS)
        payload = embedding_request(texts, **options)
        request_id = session.take_request_id()
        sealed = session.c2s.seal(MessageType.EMBED_REQUEST, request_id, 0, payload)
        return request_id, sealed, transcript_start(session.session_id, request_id, sealed.data)

    def _seal_end(self, session: attest.Session) -> Sealed:
        return session.c2s.seal(MessageType.END, session.take_request_id(), 0, b"")

    def _require_key(self) -> None:
        if self._session is None and self._attested is None and not self.auto_reattest:
            raise SessionError("attest and release the key first")

    # --- sessions in use ----------------------------------------------------------------

    @staticmethod
    def _use(session: attest.Session) -> None:
        session.users += 1

    @staticmethod
    def _done(session: attest.Session) -> None:
        session.users -= 1
        if session.retired and session.users == 0:
            session.wipe()

    @staticmethod
    def _retire(session: attest.Session) -> None:
        session.retired = True
        if session.users == 0:
            session.wipe()

    def _drop_session(self) -> None:
        if self._session is not None:
            self._retire(self._session)
        self._session = None
        self._attested = None

    def _wipe_caller_dek(self) -> None:
        if self._caller_dek is not None:
            self._caller_dek[:] = bytes(len(self._caller_dek))
        self._caller_dek = None
