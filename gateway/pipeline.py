"""The request path as a function: InferCall -> awaitable ModelInferResponse.

Every policy on the path is a layer: a function that takes the next service and returns a service
with the same signature (Finagle's filters, Tower's layers). `compose` stacks them so the request
path reads top to bottom in one place (gateway/app.py) instead of hiding in one long method.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from tritonclient.grpc import service_pb2 as oip

from gateway.routing import RoutePlan, Target


@dataclass(slots=True)
class InferCall:
    """One ModelInfer call as it travels through the layers."""

    request: oip.ModelInferRequest
    model: str  # public model name, as the caller sent it
    version: str  # public version, as the caller sent it ("" = unpinned)
    route_key: str | None = None
    deadline: float | None = None  # time.monotonic() by which the caller stops waiting
    target: Target | None = None  # set by routing; retry/fallback/hedge set the one that answered
    plan: RoutePlan | None = None  # the route, set by the routing layer
    degraded: str = ""  # the fallback step that answered, "" for a normal answer
    primary: Target | None = None  # the variant routing chose first
    primary_error: str = ""  # its failure's code name, when fallback answered instead

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None when it set none."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()


InferService = Callable[[InferCall], Awaitable[oip.ModelInferResponse]]
Layer = Callable[[InferService], InferService]


def compose(*layers: Layer, service: InferService) -> InferService:
    """compose(a, b, c, service=s) is a(b(c(s))): the first layer sees the call first."""
    for layer in reversed(layers):
        service = layer(service)
    return service


def per_backend(guards: Callable[[], Mapping[str, object]]) -> Layer:
    """A layer running each call through its backend's guard (a breaker, a bulkhead): any
    object with `async call(fn)`. Backends without a guard pass straight through."""

    def layer(inner: InferService) -> InferService:
        async def guarded(call: InferCall) -> oip.ModelInferResponse:
            guard = guards().get(call.target.backend)
            if guard is None:
                return await inner(call)
            return await guard.call(lambda: inner(call))

        return guarded

    return layer
