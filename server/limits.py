"""Admission control and rate limits. All state lives on the event loop's thread."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from encloud.protocol.faults import ResourceExhaustedError

MAX_TRACKED_PEERS = 10_000


class RateLimitedError(ResourceExhaustedError):
    reason = "RATE_LIMITED"


class ServerBusyError(ResourceExhaustedError):
    reason = "SERVER_BUSY"


class PeerRateLimiter:
    """A token bucket per peer: `burst` calls at once, then `rate` per second.

    The peer is `peer_key` of the caller (its IP address; an IPv6 address by its /64), so
    one client cannot exhaust the pending-session quota for everyone; many clients behind
    one NAT share a bucket (docs/OPERATIONS.md). Buckets are kept least recently used
    first: past MAX_TRACKED_PEERS the oldest goes (O(1) per call), and `sweep` forgets
    refilled buckets from the old end until it meets one still draining.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, peer: str) -> None:
        now = self._clock()
        tokens, last = self._buckets.get(peer, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._remember(peer, tokens, now)
            error = RateLimitedError("too many Attest calls from this peer")
            error.retry_after_seconds = round((1.0 - tokens) / self._rate, 3)
            raise error
        self._remember(peer, tokens - 1.0, now)

    def _remember(self, peer: str, tokens: float, now: float) -> None:
        self._buckets[peer] = (tokens, now)
        self._buckets.move_to_end(peer)
        while len(self._buckets) > MAX_TRACKED_PEERS:
            self._buckets.popitem(last=False)

    def sweep(self) -> None:
        """Forget refilled buckets (indistinguishable from new ones), oldest first."""
        now = self._clock()
        while self._buckets:
            peer, (tokens, last) = next(iter(self._buckets.items()))
            if tokens + (now - last) * self._rate < self._burst:
                break
            del self._buckets[peer]

    def __len__(self) -> int:
        return len(self._buckets)
