"""host:port addresses as the config names them: the one reading of an address for the config
checks, the adapters and the store (a leaf module)."""

from __future__ import annotations

import ipaddress
import re

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def address_problem(address: str) -> str | None:
    """Why `address` is not a usable host:port, or None."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return f"{address!r} is not host:port"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"{address!r}: port must be 1-65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{address!r}: {host} is not an IPv6 address"
        return None
    if not _HOST.match(host) or ".." in host:
        return f"{address!r}: {host!r} is not a valid host name or IPv4 address"
    return None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also as [::1] or ::ffff:127.x.y.z) and localhost. Anything else,
    0.0.0.0, [::] and every other host name included, may be reached from the network."""
    host = host.removeprefix("[").removesuffix("]")
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: whatever it resolves to today, it is not pinned to loopback
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def same_listener(address: str, listener: str) -> bool:
    """Whether `address` reaches `listener` on this host (same port, its host or loopback)."""
    if address_problem(address) or address_problem(listener):
        return False
    host, _, port = address.rpartition(":")
    listen_host, _, listen_port = listener.rpartition(":")
    return port == listen_port and (host == listen_host or is_loopback(host) or host == "localhost")
