"""The network an address is in, for limits that count networks rather than keys: a key costs
nothing to make, an address in another network does."""

from __future__ import annotations

import ipaddress

IPV4_PREFIX = 24  # one site, or one cloud subnet: what one operator easily holds many addresses of
IPV6_PREFIX = 48  # what a site is given


def network_of(host: str | None) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) of `host`, an IP address as a connection saw it; None when
    it is not one (unknown, or a name)."""
    ip = _ip(host)
    if ip is None:
        return None
    bits = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def is_public(host: str | None) -> bool:
    """Whether `host` is a global (internet) address: not loopback, private or link-local."""
    ip = _ip(host)
    return ip is not None and ip.is_global


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return ip
