"""The request path as a function: InferCall -> awaitable InferResult.

Every policy on the path is a layer: a function that takes the next service and returns a service
with the same signature (Finagle's filters, Tower's layers). `compose` stacks them so the request
path reads top to bottom in one place instead of hiding in one long method.

Information flows one way in each direction. Down: a layer that changes what is asked (routing
picks a variant, the deadline layer tightens the deadline, retry or fallback try another
variant) passes a new InferCall; the caller's request inside it is never edited (dispatch builds
the backend's request from it). Up: each layer returns an InferResult (the response, the variant
that answered, the fallback step that answered, how many backend tries it took) that outer layers
read; a failure travels as GatewayError, whose `target` names the variant that failed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tritonclient.grpc import service_pb2 as oip

from gateway.dataplane.identity import ANONYMOUS, Caller
from gateway.dataplane.target import Target
from gateway.errors import GatewayError

if TYPE_CHECKING:  # annotations only: the route table's module imports the layers
    from gateway.dataplane.routing import RoutePlan


class InferCall:
    """One ModelInfer call as it travels down the layers. Never changed once built: a layer that
    asks something else passes a new one (`to`, `replace`). A plain slotted class rather than a
    frozen dataclass: it is built several times per call, and a frozen dataclass's __init__
    (object.__setattr__ per field) costs about four times as much."""

    __slots__ = (
        "caller",
        "deadline",
        "model",
        "plan",
        "protocol",
        "request",
        "route_key",
        "target",
        "version",
    )

    def __init__(
        self,
        request: oip.ModelInferRequest,  # the caller's request, in public names; never edited
        model: str,  # public model name, as the caller sent it
        version: str,  # public version, as the caller sent it ("" = unpinned)
        route_key: str | None = None,
        deadline: float | None = None,  # time.monotonic() by which the caller stops waiting
        plan: RoutePlan | None = None,  # the route, set by the routing layer
        target: Target | None = None,  # the variant this call is for (routing, retry, ...)
        caller: Caller = ANONYMOUS,  # who is calling (gateway/dataplane/identity.py)
        protocol: str = "grpc",  # the front door it came through: "grpc" or "rest" (metrics)
    ) -> None:
        self.request = request
        self.model = model
        self.version = version
        self.route_key = route_key
        self.deadline = deadline
        self.plan = plan
        self.target = target
        self.caller = caller
        self.protocol = protocol

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None when it set none."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    def to(self, target: Target, plan: RoutePlan | None = None) -> InferCall:
        """The same call, for another variant (of this route, or of `plan`)."""
        return InferCall(
            self.request,
            self.model,
            self.version,
            self.route_key,
            self.deadline,
            plan or self.plan,
            target,
            self.caller,
            self.protocol,
        )

    def until(self, deadline: float | None) -> InferCall:
        """The same call with another deadline."""
        return InferCall(
            self.request,
            self.model,
            self.version,
            self.route_key,
            deadline,
            self.plan,
            self.target,
            self.caller,
            self.protocol,
        )


@dataclass(frozen=True, slots=True)
class PrimaryFailure:
    """The variant routing chose, and how it failed, when a fallback answered instead."""

    target: Target
    code: str  # grpc.StatusCode name


class InferResult:
    """What a service answers: the response and how it came about. Never changed once built
    (`replace` gives a new one); slotted, not a frozen dataclass, for the same reason as
    InferCall: one is built per backend answer."""

    __slots__ = (
        "attempts",
        "cached",
        "degraded",
        "primary_failure",
        "response",
        "target",
        "trailers",
    )

    def __init__(
        self,
        response: oip.ModelInferResponse,
        target: Target,  # the variant that answered
        degraded: str = "",  # the fallback step that answered, "" for a normal answer
        attempts: int = 1,  # backend tries behind this answer (retries, hedges)
        primary_failure: PrimaryFailure | None = None,  # set when `degraded`
        cached: bool = False,  # answered from the response cache
        # What a layer tells the caller about this answer, sent as trailers with it
        # (the cache's x-tensorgate-cache: hit): the transport adds them, whatever the layer.
        trailers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.response = response
        self.target = target
        self.degraded = degraded
        self.attempts = attempts
        self.primary_failure = primary_failure
        self.cached = cached
        self.trailers = trailers

    def replace(self, **changes) -> InferResult:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return InferResult(**(fields | changes))


InferService = Callable[[InferCall], Awaitable[InferResult]]
Layer = Callable[[InferService], InferService]


def compose(*layers: Layer, service: InferService) -> InferService:
    """compose(a, b, c, service=s) is a(b(c(s))): the first layer sees the call first."""
    for layer in reversed(layers):
        service = layer(service)
    return service


def blame(err: GatewayError, target: Target | None) -> GatewayError:
    """Name `target` as the variant that failed, unless a layer nearer the backend already did."""
    if err.target is None:
        err.target = target
    return err


def per_backend(guards: Callable[[], Mapping[str, object]]) -> Layer:
    """A layer running each call through its backend's guard (a breaker, a bulkhead): any
    object with `async call(fn)`. Backends without a guard pass straight through."""

    def layer(inner: InferService) -> InferService:
        async def guarded(call: InferCall) -> InferResult:
            guard = guards().get(call.target.backend)
            if guard is None:
                return await inner(call)
            try:
                return await guard.call(lambda: inner(call))
            except GatewayError as err:
                blame(err, call.target)
                raise

        return guarded

    return layer
