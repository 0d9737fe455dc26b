"""Honour the caller's deadline end to end, capped further by the route's timeout.

Everything below runs inside one asyncio timeout, so retries, backoff sleeps, queueing and
fallback can never outlive the budget, and the caller gets DEADLINE_EXCEEDED as soon as it is
spent rather than when some inner wait happens to end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc

from gateway.dataplane.layers.contract import RouteLayer, translated
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.durations import seconds
from gateway.errors import GatewayError, shown
from tensorgate.config.v1 import config_pb2


def deadline(route_timeout: float | None) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def bounded(call: InferCall) -> InferResult:
            if route_timeout is not None:
                capped = time.monotonic() + route_timeout
                if call.deadline is None or capped < call.deadline:
                    call = call.until(capped)
            remaining = call.remaining()
            if remaining is None:
                return await inner(call)
            if remaining <= 0:
                raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline already passed")
            try:
                async with asyncio.timeout(remaining):
                    return await inner(call)
            except TimeoutError:
                raise GatewayError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline exceeded after {remaining * 1000:.0f} ms "
                    f"(caller deadline or route timeout of model {shown(call.model)})",
                ) from None

        return bounded

    return layer


def settings(policy: config_pb2.RoutePolicy, route=None) -> float | None:
    """The route's timeout in seconds, None when unset or 0."""
    timeout = seconds(policy.timeout)
    return timeout if timeout > 0 else None


def check(policy: config_pb2.RoutePolicy, at: str, route, models) -> Iterator[tuple[str, str]]:
    if policy.HasField("timeout") and seconds(policy.timeout) < 0:
        yield f"{at}.timeout", "must not be negative"


# Always on: the caller's own deadline applies on every route, timeout or not.
LAYER = RouteLayer(
    "timeout",
    settings=settings,
    active=lambda timeout: True,
    state=lambda env: None,
    build=lambda timeout, shared, plan: deadline(timeout),
    envoy=translated,  # the route's timeout
    fields=("RoutePolicy.timeout",),
    decoupled="the caller's deadline bounds the backend stream; the route's timeout is not applied",
    check=check,
)
