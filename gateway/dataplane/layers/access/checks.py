"""check-config's part for callers, authorization and rate limits: (field path, problem)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from gateway.addresses import address_problem
from gateway.dataplane.identity import REFUSED_ALGORITHMS, load_issuer
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2

MAX_CLOCK_SKEW_S = 300.0


def access_problems(config: config_pb2.GatewayConfig) -> Iterator[tuple[str, str]]:
    callers = config.callers
    enabled = config.HasField("callers")
    if enabled:
        yield from _callers(config, callers)
    for i, route in enumerate(config.routes):
        at = f"routes[{i}]"
        if (route.authorization.rules or route.rate_limits) and not enabled:
            yield (
                f"{at}.authorization" if route.authorization.rules else f"{at}.rate_limits",
                "needs `callers` (who is calling): set callers.jwt, callers.client_cert or "
                "callers.allow_anonymous",
            )
        yield from _rules(route, at)
        yield from _limits(route, at)


def _callers(config: config_pb2.GatewayConfig, callers: config_pb2.Callers):
    if not callers.jwt and not callers.HasField("client_cert") and not callers.allow_anonymous:
        yield "callers", "no way to identify a caller: set jwt, client_cert or allow_anonymous"
    issuers = set()
    for i, issuer in enumerate(callers.jwt):
        at = f"callers.jwt[{i}]"
        if not issuer.issuer:
            yield f"{at}.issuer", "required: the tokens' `iss`"
        elif issuer.issuer in issuers:
            yield f"{at}.issuer", f"{issuer.issuer!r} is listed twice"
        issuers.add(issuer.issuer)
        if not issuer.audiences:
            yield f"{at}.audiences", "at least one: a token for another service must not pass"
        for k, algorithm in enumerate(issuer.algorithms):
            if algorithm in REFUSED_ALGORITHMS:
                yield f"{at}.algorithms[{k}]", f"{algorithm} is never accepted (none or HMAC)"
        skew = seconds(issuer.clock_skew)
        if not 0 <= skew <= MAX_CLOCK_SKEW_S:
            yield f"{at}.clock_skew", f"must be within [0, {MAX_CLOCK_SKEW_S:g}s]"
        if not issuer.jwks_file:
            yield f"{at}.jwks_file", "required: the issuer's public keys (JWKS JSON)"
        else:
            try:
                load_issuer(issuer)
            except ValueError as err:
                yield f"{at}.jwks_file", str(err)
    if callers.HasField("client_cert"):
        if not config.listeners.data_plane_tls.client_ca_file:
            yield (
                "callers.client_cert",
                "needs listeners.data_plane_tls.client_ca_file: only a certificate the data "
                "plane's TLS verified may name a caller",
            )
        if config.listeners.xds not in ("", "off"):
            yield (
                "callers.client_cert",
                "Envoy mode: Envoy's listener does not pass callers' certificates to the gateway; "
                "identify callers by JWT there (docs/security.md)",
            )
    limiter = callers.rate_limiter
    if limiter.HasField("redis"):
        reason = address_problem(limiter.redis.address)
        if reason:
            yield "callers.rate_limiter.redis.address", reason
        if not 0 <= seconds(limiter.redis.timeout) <= 5:
            yield "callers.rate_limiter.redis.timeout", "must be within [0, 5s]"


def _rules(route: config_pb2.Route, at: str):
    names = set()
    versions = {v.version for v in route.variants if v.version}
    for k, rule in enumerate(route.authorization.rules):
        where = f"{at}.authorization.rules[{k}]"
        if not rule.name:
            yield f"{where}.name", "required: it is logged when the rule refuses a call"
        elif rule.name in names:
            yield f"{where}.name", f"{rule.name!r} is used twice in this route"
        names.add(rule.name)
        if not rule.callers and not rule.groups:
            yield where, "matches nobody: list callers (ids, or '*') or groups"
        for j, version in enumerate(rule.versions):
            if version not in versions:
                yield f"{where}.versions[{j}]", f"the route has no version {version!r}"


def _limits(route: config_pb2.Route, at: str):
    names = set()
    for k, limit in enumerate(route.rate_limits):
        where = f"{at}.rate_limits[{k}]"
        if not limit.name:
            yield f"{where}.name", "required: it names the limit in refusals and metrics"
        elif limit.name in names:
            yield f"{where}.name", f"{limit.name!r} is used twice in this route"
        names.add(limit.name)
        rate = limit.calls_per_second
        if not math.isfinite(rate) or rate < 0:
            yield f"{where}.calls_per_second", "must be a finite number >= 0"
        if limit.burst and not rate:
            yield f"{where}.burst", "needs calls_per_second"
        if not (rate or limit.bytes_per_second or limit.max_concurrent):
            yield where, "limits nothing: set calls_per_second, bytes_per_second or max_concurrent"
