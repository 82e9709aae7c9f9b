"""Admission control and rate limits. All state lives on the event loop's thread."""

from __future__ import annotations

import time
from collections.abc import Callable

from encloud.protocol.faults import ResourceExhaustedError

MAX_TRACKED_PEERS = 10_000


class RateLimitedError(ResourceExhaustedError):
    reason = "RATE_LIMITED"


class ServerBusyError(ResourceExhaustedError):
    reason = "SERVER_BUSY"


class PeerRateLimiter:
    """A token bucket per peer address: `burst` calls at once, then `rate` per second.

    The peer is the caller's IP address as gRPC reports it (without the port),
    so one client cannot exhaust the pending-session quota for everyone; many
    clients behind one NAT or proxy share a bucket (docs/OPERATIONS.md).
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, peer: str) -> None:
        now = self._clock()
        tokens, last = self._buckets.get(peer, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            error = RateLimitedError("too many Attest calls from this peer")
            error.retry_after_seconds = round((1.0 - tokens) / self._rate, 3)
            raise error
        self._buckets[peer] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED_PEERS:
            self.sweep()

    def sweep(self) -> None:
        """Forget peers whose bucket has refilled: they are indistinguishable from new ones."""
        now = self._clock()
        full = [
            peer
            for peer, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self._rate >= self._burst
        ]
        for peer in full:
            del self._buckets[peer]


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' -> 'ipv4:127.0.0.1'; '[::1]' forms keep their brackets."""
    if peer.startswith(("ipv4:", "ipv6:")):
        head, _, _port = peer.rpartition(":")
        return head or peer
    return peer
