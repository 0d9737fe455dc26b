"""Failure classes shared by the layers, and each backend's guard settings (breaker, bulkhead),
computed once per config revision so the hot path reads attributes, not protobuf presence checks.
Per-route settings are each layer's own (gateway/layers/)."""

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


def seconds(duration) -> float:
    """A google.protobuf.Duration in seconds."""
    return duration.seconds + duration.nanos / 1e9


def route_settings(
    route: config_pb2.Route, defaults: config_pb2.RoutePolicy, memo: dict | None = None
):
    """A route's settings per layer (gateway.layers.RouteSettings: `.retry`, `.hedge`, ...)."""
    from gateway.layers import route_settings as per_layer

    return per_layer(route, defaults, memo)


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


def breaker_settings(
    backend: config_pb2.Backend, defaults: config_pb2.CircuitBreaker
) -> BreakerSettings:
    b = backend.circuit_breaker if backend.HasField("circuit_breaker") else defaults
    base = BreakerSettings()
    return BreakerSettings(
        consecutive_failures=b.consecutive_failures or base.consecutive_failures,
        failure_ratio=b.failure_ratio,
        window=seconds(b.window) if b.HasField("window") else base.window,
        minimum_calls=b.minimum_calls or base.minimum_calls,
        open_duration=(
            seconds(b.open_duration) if b.HasField("open_duration") else base.open_duration
        ),
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
