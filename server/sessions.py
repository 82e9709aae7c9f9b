"""Sessions: the per-client key material and state, and the store that bounds them.

A session is created by Attest (PENDING), bound by the first valid ReleaseKey
(BOUND) and dropped on EndSession, on expiry, on a fault or at shutdown. On
drop every key is overwritten where Python allows and every reference is
released (docs/THREAT_MODEL.md states the limits of memory hygiene in Python).
"""

from __future__ import annotations

import asyncio
import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from encloud.protocol.envelope import MessageType, OpeningKey, Sealed, SealingKey
from encloud.protocol.errors import DecryptError
from encloud.protocol.faults import (
    EnvelopeRejectedError,
    InvalidArgumentError,
    InvalidRequestPayloadError,
    KeyReleaseError,
    ReplayedRequestError,
    ResourceExhaustedError,
    SessionExpiredError,
    SessionNotFoundError,
    SessionStateError,
)
from encloud.protocol.handshake import (
    SESSION_ID_LENGTH,
    HpkeSuiteId,
    KeyOpenError,
    derive_traffic_keys,
    generate_session_key,
    handshake_hash,
    open_key,
    opens_commitment,
    release_info,
    split_enc,
)
from encloud.server.metrics import Metrics
from encloud.server.settings import Settings

REQUEST_ID_WINDOW = 1024
# Ids of sessions that expired, remembered so their owner learns "expired" (and re-attests)
# rather than "unknown". Session ids are random and not secret.
MAX_EXPIRED_TOMBSTONES = 4096


class SessionState(enum.Enum):
    PENDING = "pending"
    BOUND = "bound"
    ENDED = "ended"


class RequestIdWindow:
    """Request ids of one session: each accepted once, out of order within a window.

    An id is accepted if it is above the highest seen, or not seen before and
    less than REQUEST_ID_WINDOW below it. An id counts as seen only after its
    tag verified (mark), so a forged id uses up nothing.
    """

    def __init__(self) -> None:
        self.highest = 0
        self._seen: set[int] = set()

    def check(self, request_id: int) -> None:
        if request_id < 1:
            raise ReplayedRequestError("request ids start at 1")
        if request_id > self.highest:
            return
        if self.highest - request_id >= REQUEST_ID_WINDOW or request_id in self._seen:
            raise ReplayedRequestError("request id already used or too old")

    def mark(self, request_id: int) -> None:
        self._seen.add(request_id)
        if request_id > self.highest:
            self.highest = request_id
            floor = self.highest - REQUEST_ID_WINDOW
            self._seen = {seen for seen in self._seen if seen > floor}


class StepCounter:
    """Counts a generation's decode steps through the engine's `should_stop` hook.

    The engine calls `should_stop` before every decode step. The counter answers
    it and remembers, when the generation is cancelled (from any thread), how
    many steps had started by then, counting a step still in flight as not yet
    done; `steps_after_cancel` is then the number of decode steps that ran after
    the cancel, the figure cancellation is measured by (one decode step at most).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._in_step = False
        self.started = False
        self.steps = 0
        self.steps_at_cancel: int | None = None

    def should_stop(self) -> bool:
        with self._lock:
            self.started = True
            if self._cancelled:
                self._in_step = False
                return True
            self.steps += 1
            self._in_step = True
            return False

    def cancel(self) -> None:
        with self._lock:
            if not self._cancelled:
                self._cancelled = True
                self.steps_at_cancel = self.steps - (1 if self._in_step else 0)

    @property
    def steps_after_cancel(self) -> int | None:
        if self.steps_at_cancel is None:
            return None
        return self.steps - self.steps_at_cancel


class CancelSignal(threading.Event):
    """A threading.Event that also tells the step counter the moment it is set, and runs
    the callbacks registered with `when_set` (once, from the thread that sets it)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = StepCounter()
        self._callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    def set(self) -> None:
        self.steps.cancel()
        super().set()
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def when_set(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the signal is set (now, if it already is)."""
        with self._callbacks_lock:
            if not self.is_set():
                self._callbacks.append(callback)
                return
        callback()


@dataclass
class ActiveCall:
    """A running Infer or StreamInfer, so EndSession and shutdown can end it cleanly."""

    cancel: CancelSignal = field(default_factory=CancelSignal)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    peer: str = ""
    """Whose call it is (the session's peer): the engine shares its batch by peer."""


class Session:
    def __init__(
        self,
        session_id: bytes,
        suite: HpkeSuiteId,
        nonce: bytes,
        commitment: bytes,
        ttl_seconds: int,
        pending_deadline: float,
        expires_at: float,
        now: float = 0.0,
    ) -> None:
        self.session_id = session_id
        self.suite = suite
        self.nonce = nonce
        self.commitment = commitment
        self.ttl_seconds = ttl_seconds
        self.pending_deadline = pending_deadline
        self.expires_at = expires_at
        self.last_used = now
        self.peer = ""
        self.state = SessionState.PENDING
        key, self.public_key = generate_session_key(suite)
        self._private_key: Any = key
        self.attest_digest: bytes | None = None
        self.requests = RequestIdWindow()
        self.calls: dict[int, ActiveCall] = {}
        self._c2s: OpeningKey | None = None
        self._s2c: SealingKey | None = None

    # --- key release ---------------------------------------------------------------

    def bind(self, sealed_key: bytes) -> Sealed:
        """Open the released key, derive the traffic keys, return the key confirmation.

        Only a sealed key whose client secret opens this session's commitment binds it;
        any other attempt is refused without changing the session."""
        if self.state is not SessionState.PENDING or self._private_key is None:
            raise SessionStateError("the session already has a key")
        if self.attest_digest is None:
            raise SessionStateError("the session has no evidence yet")
        try:
            info = release_info(self.suite, self.session_id, self.attest_digest)
            enc = split_enc(self.suite, sealed_key)
            dek, secret, client_secret = open_key(self.suite, self._private_key, sealed_key, info)
        except KeyOpenError:
            raise KeyReleaseError("the sealed key was refused") from None
        if not opens_commitment(self.commitment, client_secret):
            for value in (dek, secret, client_secret):
                value[:] = bytes(len(value))
            raise KeyReleaseError("the sealed key was refused")
        client_secret[:] = bytes(len(client_secret))
        h_hs = handshake_hash(
            self.suite,
            self.nonce,
            self.public_key,
            self.session_id,
            self.ttl_seconds,
            self.attest_digest,
            enc,
        )
        keys = derive_traffic_keys(dek, secret, h_hs)
        dek[:] = bytes(len(dek))
        secret[:] = bytes(len(secret))
        key_confirm = SealingKey(keys.kc, self.session_id)
        confirmation = key_confirm.seal(MessageType.KEY_CONFIRM, 0, 0, h_hs)
        key_confirm.wipe()
        self._c2s = OpeningKey(keys.c2s, self.session_id)
        self._s2c = SealingKey(keys.s2c, self.session_id)
        self._private_key = None  # the session key pair has done its one job
        self.state = SessionState.BOUND
        return confirmation

    # --- sealed traffic --------------------------------------------------------------

    def open_from_client(self, sealed: Sealed, expected_type: MessageType) -> bytes:
        """Check the header and the request id, open, then mark the id as used."""
        opener = self._bound_keys()[0]
        if sealed.type != expected_type or sealed.seq != 0:
            raise EnvelopeRejectedError("sealed message rejected")
        self.requests.check(sealed.request_id)
        try:
            payload = opener.open_unchecked_header(sealed)
        except DecryptError:
            raise EnvelopeRejectedError("sealed message rejected") from None
        self.requests.mark(sealed.request_id)
        return payload

    def open_end(self, sealed: Sealed) -> None:
        """Open an END (its id is then used); an END with a payload is refused, the session
        kept (docs/PROTOCOL.md, "EndSession")."""
        if self.open_from_client(sealed, MessageType.END):
            raise InvalidRequestPayloadError("an END carries no payload")

    def sealer(self) -> SealingKey:
        return self._bound_keys()[1]

    def _bound_keys(self) -> tuple[OpeningKey, SealingKey]:
        if self.state is not SessionState.BOUND or self._c2s is None or self._s2c is None:
            raise SessionStateError("the session has no released key")
        return self._c2s, self._s2c

    # --- end -----------------------------------------------------------------------

    def wipe(self) -> None:
        """Drop every key of the session; idempotent.

        The traffic keys' bytearrays are overwritten; the AESGCM objects (which
        hold their own copy inside OpenSSL) and the X25519 private key can only
        be released (docs/OPERATIONS.md, memory hygiene).
        """
        self.state = SessionState.ENDED
        for call in self.calls.values():
            call.cancel.set()
        if self._c2s is not None:
            self._c2s.wipe()
        if self._s2c is not None:
            self._s2c.wipe()
        self._c2s = None
        self._s2c = None
        self._private_key = None
        self.nonce = b""
        self.attest_digest = None


class SessionStore:
    """All live sessions, bounded, with pending and bound quotas and expiry."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._sessions: dict[bytes, Session] = {}
        self._expired_ids: dict[bytes, None] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(
        self, suite: HpkeSuiteId, nonce: bytes, commitment: bytes, peer: str = ""
    ) -> Session:
        self.sweep()
        pending = [s for s in self._sessions.values() if s.state is SessionState.PENDING]
        # The peer's own quota first: one caller must not take the global one from the others.
        if (
            sum(1 for s in pending if s.peer == peer)
            >= self._settings.max_pending_sessions_per_peer
        ):
            self._rejected("pending_sessions_per_peer")
            raise ResourceExhaustedError(
                "too many of this peer's sessions are waiting for their key"
            )
        if len(pending) >= self._settings.max_pending_sessions:
            self._rejected("pending_sessions")
            raise ResourceExhaustedError("too many sessions are waiting for their key")
        now = self._clock()
        ttl = self._settings.session_ttl_seconds
        session = Session(
            session_id=os.urandom(SESSION_ID_LENGTH),
            suite=suite,
            nonce=nonce,
            commitment=commitment,
            ttl_seconds=ttl,
            pending_deadline=now + min(ttl, self._settings.pending_session_ttl_seconds),
            expires_at=now + ttl,
            now=now,
        )
        session.peer = peer
        self._sessions[session.session_id] = session
        self._update_gauges()
        return session

    def get(self, session_id: bytes) -> Session:
        """The live session; NOT_FOUND if unknown, ended or expired. Naming a session does not
        move its idle timer: only a message that authenticates does (`touch`)."""
        if len(session_id) != SESSION_ID_LENGTH:
            raise InvalidArgumentError(f"a session id is {SESSION_ID_LENGTH} bytes")
        session = self._sessions.get(session_id)
        if session is None:
            if session_id in self._expired_ids:
                raise SessionExpiredError("the session expired; attest again")
            raise SessionNotFoundError("unknown or expired session")
        now = self._clock()
        if self._expired(session, now):
            self._expire(session)
            raise SessionExpiredError("the session expired; attest again")
        return session

    def touch(self, session: Session) -> None:
        """The session was used now (a call ended): its idle time starts again."""
        session.last_used = self._clock()

    def admit_bound(self, session: Session) -> None:
        """Called before binding: refuse when too many sessions hold keys."""
        bound = [s for s in self._sessions.values() if s.state is SessionState.BOUND]
        if sum(1 for s in bound if s.peer == session.peer) >= self._settings.max_sessions_per_peer:
            self._rejected("sessions_per_peer")
            raise ResourceExhaustedError("too many of this peer's sessions hold a key")
        if len(bound) >= self._settings.max_sessions:
            self._rejected("sessions")
            raise ResourceExhaustedError("too many sessions")

    def drop(self, session: Session, cause: str = "ended") -> None:
        known = self._sessions.pop(session.session_id, None) is not None
        session.wipe()
        if known and self._metrics is not None:
            self._metrics.sessions_ended.labels(cause).inc()
        self._update_gauges()

    def sweep(self) -> None:
        """Drop expired sessions. One with running calls is cancelled first and
        dropped on a later sweep, so its streams can seal their final frame."""
        now = self._clock()
        for session in [s for s in self._sessions.values() if self._expired(s, now)]:
            self._expire(session)

    def drop_all(self, cause: str = "shutdown") -> None:
        for session in list(self._sessions.values()):
            self.drop(session, cause)

    def cancel_all_calls(self) -> int:
        """Ask every running generation to stop; returns how many were running."""
        running = 0
        for session in self._sessions.values():
            for call in session.calls.values():
                call.cancel.set()
                running += 1
        return running

    def counts(self) -> dict[SessionState, int]:
        counts = dict.fromkeys(SessionState, 0)
        for session in self._sessions.values():
            counts[session.state] += 1
        return counts

    def _expire(self, session: Session) -> None:
        if session.calls:
            for call in session.calls.values():
                call.cancel.set()
            return
        if session.state is SessionState.BOUND:
            self._expired_ids[session.session_id] = None
            while len(self._expired_ids) > MAX_EXPIRED_TOMBSTONES:
                del self._expired_ids[next(iter(self._expired_ids))]
        self.drop(session, "expired")

    def _expired(self, session: Session, now: float) -> bool:
        if session.state is SessionState.ENDED:
            return True
        if session.state is SessionState.PENDING and now >= session.pending_deadline:
            return True
        if (
            session.state is SessionState.BOUND
            and not session.calls
            and now - session.last_used >= self._settings.session_idle_ttl_seconds
        ):
            return True
        return now >= session.expires_at

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        counts = self.counts()
        self._metrics.active_sessions.labels("pending").set(counts[SessionState.PENDING])
        self._metrics.active_sessions.labels("bound").set(counts[SessionState.BOUND])

    def _rejected(self, limit: str) -> None:
        if self._metrics is not None:
            self._metrics.admission_rejected.labels(limit).inc()
