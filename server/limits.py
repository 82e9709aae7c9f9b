"""Admission control and rate limits. All state lives on the event loop's thread."""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence

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


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = urllib.parse.unquote(text.strip()).strip("[]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _transport_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a gRPC peer string ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5', 'ipv6:%5B::1%5D:5')."""
    if not peer.startswith(("ipv4:", "ipv6:")):
        return None
    host = urllib.parse.unquote(peer.split(":", 1)[1])
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    return _address(host)


def _key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return f"ipv6:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ipv4:{address}"


def peer_key(
    peer: str,
    forwarded_for: str | None = None,
    trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str:
    """Who a call is from, for quotas and rate limits.

    The TCP peer's address (an IPv6 one by its /64: one host gets a whole /64). When that
    peer is one of the trusted proxies, the last address the proxy appended to
    `x-forwarded-for` instead; the header is ignored from anyone else (it is the caller's
    to write). gRPC cannot read a PROXY-protocol header."""
    address = _transport_address(peer)
    if address is None:
        return peer
    if forwarded_for and any(address in network for network in trusted_proxies):
        forwarded = _address(forwarded_for.split(",")[-1])
        if forwarded is not None:
            return _key(forwarded)
    return _key(address)


def trusted_networks(
    entries: Sequence[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)
