"""Who a call is from, for quotas and rate limits: one rule for every encloud service (the
inference server's fair shares, Sentinel's challenge quota), from the gRPC peer string and,
behind a trusted proxy, the address it appended to x-forwarded-for."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable, Sequence


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


def caller_key(
    peer: str,
    metadata: Iterable[tuple[str, str | bytes]] | None,
    trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str:
    """`peer_key` of a call from its gRPC peer and its metadata (x-forwarded-for is read only
    when some proxy is trusted)."""
    forwarded = None
    if trusted_proxies:
        for key, value in metadata or ():
            if key == "x-forwarded-for":
                forwarded = value if isinstance(value, str) else value.decode("latin-1")
    return peer_key(peer, forwarded, trusted_proxies)
