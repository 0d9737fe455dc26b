"""Who may call which model, and how much (docs/security.md): each route's `authorization` rules
and `rate_limits`, applied to the call's Caller (gateway/dataplane/identity.py) before routing.

Before routing, not in the route's chain: a caller must learn nothing about a model it may not
call. An unknown model and a model the caller may not call get the same answer
(PERMISSION_DENIED "caller C may not call model M"), so neither its existence nor its versions
leak; and a refused call never reaches the cache, a fallback, a shadow or a batch. The rule that
refused it is named in the gateway's log, not in the answer.

Rate limits: token buckets for calls/s (with a burst) and request bytes/s, per caller or for the
route, in this process or in Redis (limits.py); calls in flight per process. A refusal is
RESOURCE_EXHAUSTED naming the limit, with `x-tensorgate-retry-after-ms` in the trailers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import prometheus_client as prom

from gateway.dataplane.identity import ANONYMOUS_ID, Caller
from gateway.dataplane.layers.access.limits import (
    InFlight,
    LimiterUnavailable,
    LocalBuckets,
    RedisBuckets,
    capacity,
)
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.durations import seconds
from gateway.errors import GatewayError, shown
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)

RETRY_AFTER_TRAILER = "x-tensorgate-retry-after-ms"
OTHER = "other"  # the caller label of callers not in callers.metric_labels
UNKNOWN_MODEL = ""  # the model label of calls for models no route serves
DEFAULT_REDIS_TIMEOUT_S = 0.05
DEFAULT_REDIS_PREFIX = "tensorgate:rl"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    callers: frozenset[str]
    groups: frozenset[str]
    versions: frozenset[str]
    route_key: bool

    def matches(self, caller: Caller) -> bool:
        return (
            "*" in self.callers
            or caller.id in self.callers
            or not self.groups.isdisjoint(caller.groups)
        )


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    per_caller: bool
    callers: frozenset[str]  # empty: every caller
    rate: float
    burst: float
    bytes_per_second: int
    max_concurrent: int

    def applies(self, caller: Caller) -> bool:
        return not self.callers or caller.id in self.callers


@dataclass(frozen=True, slots=True)
class RouteAccess:
    rules: tuple[Rule, ...]
    limits: tuple[Limit, ...]


def route_access(route: config_pb2.Route) -> RouteAccess:
    rules = tuple(
        Rule(r.name, frozenset(r.callers), frozenset(r.groups), frozenset(r.versions), r.route_key)
        for r in route.authorization.rules
    )
    limits = tuple(
        Limit(
            name=limit.name,
            per_caller=limit.per != config_pb2.RateLimit.PER_ROUTE,
            callers=frozenset(limit.callers),
            rate=limit.calls_per_second,
            burst=capacity(limit.calls_per_second, limit.burst) if limit.calls_per_second else 0.0,
            bytes_per_second=limit.bytes_per_second,
            max_concurrent=limit.max_concurrent,
        )
        for limit in route.rate_limits
    )
    return RouteAccess(rules, limits)


def access_of(plan) -> RouteAccess:
    """A route's rules and limits, compiled on first use and kept on its plan (a new route
    table compiles afresh)."""
    if plan.access is None:
        plan.access = route_access(plan.route)
    return plan.access


class AccessMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.calls = prom.Counter(
            "tensorgate_caller_requests",
            "ModelInfer calls by caller (callers.metric_labels; others 'other'), model and code.",
            ["caller", "model", "code"],
            registry=registry,
        )
        self.denied = prom.Counter(
            "tensorgate_access_denied",
            "Calls refused PERMISSION_DENIED by the routes' authorization, by caller.",
            ["caller"],
            registry=registry,
        )
        self.limited = prom.Counter(
            "tensorgate_rate_limited",
            "Calls refused RESOURCE_EXHAUSTED by a route's rate limit, by caller, model, limit.",
            ["caller", "model", "limit"],
            registry=registry,
        )
        self.limiter_errors = prom.Counter(
            "tensorgate_rate_limiter_errors",
            "Checks the shared (Redis) rate limiter did not answer in time, by what was done "
            "(allowed: fail open; refused: fail closed).",
            ["outcome"],
            registry=registry,
        )


class Gate:
    """The gateway-wide part: the limiter's counters and the metrics (built once per runtime)."""

    def __init__(self, callers: config_pb2.Callers, registry: prom.CollectorRegistry) -> None:
        self.enabled = callers.ByteSize() > 0
        self._labels = frozenset(callers.metric_labels) | {ANONYMOUS_ID}
        limiter = callers.rate_limiter
        if limiter.HasField("redis"):
            redis = limiter.redis
            self.buckets = RedisBuckets(
                redis.address,
                redis.key_prefix or DEFAULT_REDIS_PREFIX,
                seconds(redis.timeout, DEFAULT_REDIS_TIMEOUT_S),
            )
            self._fail_closed = redis.fail_closed
        else:
            self.buckets = LocalBuckets()
            self._fail_closed = False
        self.in_flight = InFlight()
        self.metrics = AccessMetrics(registry)

    def label(self, caller: Caller) -> str:
        return caller.id if caller.id in self._labels else OTHER

    def deny(self, caller: Caller, model: str, why: str = "", rule: str = "") -> GatewayError:
        self.metrics.denied.labels(self.label(caller)).inc()
        log.info(
            "refused caller %s on model %s: %s", shown(caller.id), shown(model), rule or "no rule"
        )
        return GatewayError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"caller {shown(caller.id)} may not {why or 'call model'} {shown(model)}",
        )

    def authorize(self, access: RouteAccess, call: InferCall) -> None:
        if not access.rules:
            return
        caller = call.caller
        matched = [r for r in access.rules if r.matches(caller)]
        if not matched:
            raise self.deny(caller, call.model)
        if call.version and not any(not r.versions or call.version in r.versions for r in matched):
            raise self.deny(
                caller, call.model, f"pin version {shown(call.version)} of model", matched[0].name
            )
        if call.route_key is not None and not any(r.route_key for r in matched):
            raise self.deny(
                caller, call.model, "choose a variant by route key on model", matched[0].name
            )

    def authorized(self, plan, call: InferCall) -> RouteAccess:
        """`plan`'s rules once `call` passes them; for no plan (an unknown model) the same
        refusal as for a forbidden one."""
        if plan is None:
            raise self.deny(call.caller, call.model)
        access = access_of(plan)
        self.authorize(access, call)
        return access

    def may_call(self, plan, call: InferCall) -> bool:
        """Whether the call's caller may call `plan`'s model unpinned (a fallback to it)."""
        if not self.enabled:
            return True
        try:
            self.authorized(plan, InferCall(call.request, plan.model, "", caller=call.caller))
        except GatewayError:
            return False
        return True

    async def admit(self, access: RouteAccess, call: InferCall) -> list[tuple]:
        """Takes the call's tokens and in-flight places; the places to give back after it."""
        caller = call.caller
        entered: list[tuple] = []
        size = None
        try:
            for limit in access.limits:
                if not limit.applies(caller):
                    continue
                key = (call.model, limit.name, caller.id if limit.per_caller else "")
                if limit.rate:
                    await self._take(call, limit, (*key, "calls"), limit.rate, limit.burst, 1.0)
                if limit.bytes_per_second:
                    if size is None:
                        size = call.request.ByteSize()
                    if size > limit.bytes_per_second:
                        raise self._limited(
                            call, limit, 0.0,
                            f"a request of {size} bytes is over its {limit.bytes_per_second} "
                            "bytes/s: it can never pass",
                        )  # fmt: skip
                    rate = float(limit.bytes_per_second)
                    await self._take(call, limit, (*key, "bytes"), rate, rate, float(size))
                if limit.max_concurrent:
                    if not self.in_flight.enter(key, limit.max_concurrent):
                        raise self._limited(
                            call, limit, 0.0, f"{limit.max_concurrent} calls in flight at once"
                        )
                    entered.append(key)
        except BaseException:
            self.leave(entered)
            raise
        return entered

    def leave(self, entered: list[tuple]) -> None:
        for key in entered:
            self.in_flight.leave(key)

    async def _take(self, call, limit: Limit, key, rate, burst, cost) -> None:
        try:
            wait = await self.buckets.take(key, rate, burst, cost)
        except LimiterUnavailable as err:
            outcome = "refused" if self._fail_closed else "allowed"
            self.metrics.limiter_errors.labels(outcome).inc()
            if self._fail_closed:
                raise GatewayError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the shared rate limiter (Redis) did not answer ({err}); this gateway "
                    "refuses calls it cannot count (callers.rate_limiter.redis.fail_closed)",
                ) from None
            return
        if wait:
            what = "calls/s" if key[-1] == "calls" else "bytes/s"
            amount = (
                f"{limit.rate:g} calls/s (burst {limit.burst:g})"
                if what == "calls/s"
                else (f"{limit.bytes_per_second} bytes/s")
            )
            raise self._limited(call, limit, wait, amount)

    def _limited(self, call: InferCall, limit: Limit, wait: float, what: str) -> GatewayError:
        self.metrics.limited.labels(self.label(call.caller), call.model, limit.name).inc()
        scope = "per caller" if limit.per_caller else "for the route, every caller together"
        retry = f"; retry after {wait * 1000:.0f} ms" if wait else ""
        err = GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"rate limit {shown(limit.name)} of model {shown(call.model)}: {what} {scope}{retry}",
        )
        if wait:
            err.trailers = ((RETRY_AFTER_TRAILER, str(max(1, round(wait * 1000)))),)
        return err

    async def close(self) -> None:
        await self.buckets.close()


def access(gate: Gate, table: Callable[[], object]) -> Layer:
    """The layer between the structure checks and routing (gateway/app.py installs it only when
    `callers` is configured)."""

    def layer(inner: InferService) -> InferService:
        async def admitted(call: InferCall) -> InferResult:
            plan = table().get(call.model)
            caller_label = gate.label(call.caller)
            if plan is None:
                gate.metrics.calls.labels(caller_label, UNKNOWN_MODEL, "PERMISSION_DENIED").inc()
                raise gate.deny(call.caller, call.model)
            rules = access_of(plan)
            try:
                gate.authorize(rules, call)
                entered = await gate.admit(rules, call) if rules.limits else ()
            except GatewayError as err:
                gate.metrics.calls.labels(caller_label, plan.model, err.code.name).inc()
                raise
            code = "OK"
            try:
                return await inner(call)
            except GatewayError as err:
                code = err.code.name
                raise
            except BaseException:
                code = "INTERNAL"
                raise
            finally:
                if entered:
                    gate.leave(entered)
                gate.metrics.calls.labels(caller_label, plan.model, code).inc()

        return admitted

    return layer
