"""When a failed call may be sent again, and when not.

A call is retried only when its status proves the server processed nothing:

- RESOURCE_EXHAUSTED with a RetryInfo delay (the server refused before doing any work:
  rate limit, quota, queue full): after that delay;
- UNAVAILABLE that the server itself sent with reason UNAVAILABLE or TPM_UNAVAILABLE
  (starting, draining, TPM down: refused before any work), or that gRPC raised because it
  could not connect at all (the request was never sent): after a doubling backoff;
- a lost or expired session (NOT_FOUND, SESSION_NOT_FOUND or SESSION_EXPIRED, answered
  before anything is opened): after attesting again.

Streams are retried only before their first frame. Every retry seals the request again
under a new request id. Per call: at most `max_retries` retries and `max_reattests`
re-attestations, all within the call's deadline.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from encloud.protocol.errors import ServiceError

NOTHING_PROCESSED_UNAVAILABLE = frozenset({"UNAVAILABLE", "TPM_UNAVAILABLE"})
LOST_SESSION = frozenset({"SESSION_NOT_FOUND", "SESSION_EXPIRED"})
_CONNECT_FAILURE = "failed to connect"  # gRPC core's message when no connection was made


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a call tries. The defaults are the documented ones (docs/CLIENT.md)."""

    max_retries: int = 3
    max_reattests: int = 1
    backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0
    max_retry_after_seconds: float = 30.0
    """A server that asks for a longer wait than this gets its error back instead."""


class Verdict(enum.Enum):
    RETRY = "retry"
    REATTEST = "reattest"
    RAISE = "raise"


def classify(error: ServiceError) -> Verdict:
    """What a failed call's status allows (before any answer was received)."""
    if error.code == "RESOURCE_EXHAUSTED" and error.retry_after_seconds is not None:
        return Verdict.RETRY
    if error.code == "UNAVAILABLE" and (
        error.reason in NOTHING_PROCESSED_UNAVAILABLE
        or (not error.reason and _CONNECT_FAILURE in str(error).lower())
    ):
        return Verdict.RETRY
    if error.code == "NOT_FOUND" and error.reason in LOST_SESSION:
        return Verdict.REATTEST
    return Verdict.RAISE


class CallBudget:
    """One call's deadline and what is left of its retries."""

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.retries = 0
        self.reattests = 0

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline); a DEADLINE_EXCEEDED
        ServiceError once it has passed."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise ServiceError("DEADLINE_EXCEEDED", "the call's deadline passed")
        return left

    def next_step(self, error: ServiceError, *, reattest_allowed: bool) -> tuple[Verdict, float]:
        """RETRY (after the returned delay) or REATTEST; re-raises `error` when the status
        allows neither, the budget is spent, or the wait would pass the deadline."""
        verdict = classify(error)
        if verdict is Verdict.RAISE or self.retries >= self._policy.max_retries:
            raise error
        if verdict is Verdict.REATTEST:
            if not reattest_allowed or self.reattests >= self._policy.max_reattests:
                raise error
            self.reattests += 1
        delay = 0.0
        if verdict is Verdict.RETRY:
            delay = (
                error.retry_after_seconds
                if error.retry_after_seconds is not None
                else min(
                    self._policy.backoff_seconds * 2**self.retries,
                    self._policy.max_backoff_seconds,
                )
            )
        left = self.remaining()
        if delay > self._policy.max_retry_after_seconds or (left is not None and delay >= left):
            raise error
        self.retries += 1
        return verdict, delay

    def use_reattest(self) -> bool:
        """Spend this call's re-attestation (False when it was already spent)."""
        if self.reattests >= self._policy.max_reattests:
            return False
        self.reattests += 1
        return True

    def end_timeout(self, ceiling: float) -> float | None:
        """A timeout for a best-effort call: at most `ceiling`, never past the deadline
        (None when the deadline has passed: skip the call)."""
        try:
            left = self.remaining()
        except ServiceError:
            return None
        return ceiling if left is None else min(ceiling, left)
