"""Effective resilience settings: the config's messages merged with defaults, as plain values.

Computed once per config revision so the hot path reads attributes, not protobuf presence checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tensorgate.config.v1 import config_pb2

# Outcomes that say the backend (not the request) is in trouble: they count against breakers and
# are what fallback rescues. Caller errors (INVALID_ARGUMENT, NOT_FOUND, ...) never are.
BACKEND_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
    }
)
# Codes a route may never retry: retrying cannot change the answer.
NEVER_RETRY = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.OK,
    }
)


def _s(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 2
    base_delay: float = 0.025
    max_delay: float = 0.25
    retry_on: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE})
    budget_ratio: float = 0.2
    budget_min_per_second: float = 5.0
    budget_window: float = 10.0
    other_variant: bool = False


@dataclass(frozen=True, slots=True)
class HedgeSettings:
    delay: float = 0.0
    use_p95: bool = False

    @property
    def enabled(self) -> bool:
        return self.delay > 0 or self.use_p95


@dataclass(frozen=True, slots=True)
class ShadowSettings:
    variant: str
    fraction: float
    max_concurrency: int = 8


@dataclass(frozen=True, slots=True)
class RouteSettings:
    timeout: float | None = None
    retry: RetrySettings = RetrySettings()
    hedge: HedgeSettings = HedgeSettings()
    fallback: tuple = ()  # tuple[config_pb2.FallbackStep, ...]
    shadow: ShadowSettings | None = None


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    consecutive_failures: int = 5
    failure_ratio: float = 0.0
    window: float = 10.0
    minimum_calls: int = 20
    open_duration: float = 5.0
    half_open_max_calls: int = 1
    half_open_successes: int = 1
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class BulkheadSettings:
    max_concurrency: int = 64
    max_queue: int = 16
    disabled: bool = False


def _pick(route: config_pb2.RoutePolicy, defaults: config_pb2.RoutePolicy, field: str):
    return getattr(route if route.HasField(field) else defaults, field)


def route_settings(route: config_pb2.Route, defaults: config_pb2.RoutePolicy) -> RouteSettings:
    policy = route.policy
    timeout = _pick(policy, defaults, "timeout")
    r = _pick(policy, defaults, "retry")
    base = RetrySettings()
    retry = RetrySettings(
        max_attempts=r.max_attempts or base.max_attempts,
        base_delay=_s(r.base_delay) if r.HasField("base_delay") else base.base_delay,
        max_delay=_s(r.max_delay) if r.HasField("max_delay") else base.max_delay,
        retry_on=frozenset(grpc.StatusCode[c] for c in r.retry_on) or base.retry_on,
        budget_ratio=r.budget_ratio or base.budget_ratio,
        budget_min_per_second=r.budget_min_per_second or base.budget_min_per_second,
        budget_window=_s(r.budget_window) if r.HasField("budget_window") else base.budget_window,
        other_variant=r.other_variant,
    )
    h = _pick(policy, defaults, "hedge")
    hedge = HedgeSettings(delay=_s(h.delay), use_p95=h.use_p95)
    fallback = tuple(policy.fallback) if policy.fallback else tuple(defaults.fallback)
    shadow = None
    if policy.HasField("shadow") and policy.shadow.variant:
        sh = policy.shadow
        shadow = ShadowSettings(sh.variant, sh.fraction, sh.max_concurrency or 8)
    return RouteSettings(
        timeout=_s(timeout) if _s(timeout) > 0 else None,
        retry=retry,
        hedge=hedge,
        fallback=fallback,
        shadow=shadow,
    )


def breaker_settings(
    backend: config_pb2.Backend, defaults: config_pb2.CircuitBreaker
) -> BreakerSettings:
    b = backend.circuit_breaker if backend.HasField("circuit_breaker") else defaults
    base = BreakerSettings()
    return BreakerSettings(
        consecutive_failures=b.consecutive_failures or base.consecutive_failures,
        failure_ratio=b.failure_ratio,
        window=_s(b.window) if b.HasField("window") else base.window,
        minimum_calls=b.minimum_calls or base.minimum_calls,
        open_duration=_s(b.open_duration) if b.HasField("open_duration") else base.open_duration,
        half_open_max_calls=b.half_open_max_calls or base.half_open_max_calls,
        half_open_successes=b.half_open_successes or base.half_open_successes,
        disabled=b.disabled,
    )


def bulkhead_settings(
    backend: config_pb2.Backend, defaults: config_pb2.Bulkhead
) -> BulkheadSettings:
    b = backend.bulkhead if backend.HasField("bulkhead") else defaults
    base = BulkheadSettings()
    return BulkheadSettings(
        max_concurrency=b.max_concurrency or base.max_concurrency,
        max_queue=0 if b.no_queue else (b.max_queue or base.max_queue),
        disabled=b.disabled,
    )
