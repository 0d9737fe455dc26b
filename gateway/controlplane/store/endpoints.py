"""store.etcd.endpoints: the one reading of them, for `check-config` (gateway/controlplane/
checks.py) and for the etcd store's channel (gateway/controlplane/store/etcd.py), so that
whatever `serve` would refuse, `check-config` refuses first, with the same words.

gRPC makes one channel over every endpoint: one entry is a target as it is (a host name goes
through DNS, e.g. a Kubernetes Service); several become one `ipv4:`/`ipv6:` address list, which
gRPC only accepts for IP addresses. Host names are not resolved here on purpose: a TLS
certificate names the host, and a list of resolved IPs would be checked against IPs.
"""

from __future__ import annotations

import ipaddress

from gateway.addresses import address_problem


def endpoint_problems(endpoints: list[str]) -> list[tuple[int | None, str]]:
    """(index or None for the list, reason) for every endpoint gRPC could not use."""
    if not endpoints:
        return [(None, "name at least one host:port")]
    problems: list[tuple[int | None, str]] = []
    for i, endpoint in enumerate(endpoints):
        _scheme, sep, rest = endpoint.partition("://")
        if sep:
            problems.append(
                (
                    i,
                    f"{endpoint!r}: drop the scheme and give host:port ({rest.rstrip('/')!r}); "
                    "etcdctl takes URLs, the gateway takes host:port (TLS is store.etcd.ca_file)",
                )
            )
            continue
        reason = address_problem(endpoint)
        if reason:
            problems.append((i, reason))
        elif len(endpoints) > 1 and _ip_version(endpoint) is None:
            problems.append(
                (
                    i,
                    f"{endpoint!r} is a host name; with several endpoints each must be an IP "
                    "address (gRPC fails over within one list of addresses): give the "
                    "members' IPs, e.g. 127.0.0.1 for localhost, or one host name alone (a "
                    "Service or load balancer in front of the members)",
                )
            )
    return problems


def _ip_version(endpoint: str) -> int | None:
    host = endpoint.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def grpc_target(endpoints: list[str]) -> str:
    """One gRPC target for the endpoints; ValueError (naming the field) for what
    `endpoint_problems` refuses, which check-config has refused already."""
    problems = endpoint_problems(endpoints)
    if problems:
        index, reason = problems[0]
        field = "store.etcd.endpoints" + (f"[{index}]" if index is not None else "")
        raise ValueError(f"{field}: {reason}")
    if len(endpoints) == 1:
        return endpoints[0]
    versions = {_ip_version(e) for e in endpoints}
    scheme = "ipv6" if 6 in versions else "ipv4"
    return f"{scheme}:" + ",".join(endpoints)
