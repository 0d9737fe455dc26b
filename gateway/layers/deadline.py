"""Honour the caller's deadline end to end, capped further by the route's timeout.

Everything below runs inside one asyncio timeout, so retries, backoff sleeps, queueing and
fallback can never outlive the budget, and the caller gets DEADLINE_EXCEEDED as soon as it is
spent rather than when some inner wait happens to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc

from gateway.errors import GatewayError
from gateway.pipeline import InferCall, InferResult, InferService, Layer


def deadline() -> Layer:
    def layer(inner: InferService) -> InferService:
        async def bounded(call: InferCall) -> InferResult:
            route_timeout = call.plan.settings.timeout
            if route_timeout is not None:
                capped = time.monotonic() + route_timeout
                if call.deadline is None or capped < call.deadline:
                    call = dataclasses.replace(call, deadline=capped)
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
                    f"(caller deadline or route timeout of model {call.model!r})",
                ) from None

        return bounded

    return layer
