"""Choose the variant for a call, and answer in the public model's names.

The adapter call (dispatch) speaks the backend's model name and version; the response is
rewritten here to the public ones, so callers never see backend names (only the variant, in
response metadata).
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.dataplane.pipeline import InferCall, InferResult, InferService, blame
from gateway.dataplane.routing import RoutePlan, RouteTable
from gateway.errors import GatewayError


def route(
    table: Callable[[], RouteTable],
    down: Callable[[], frozenset[tuple[str, str, str]]],
    compiled: Callable[[RoutePlan], InferService],
) -> InferService:
    """`table` returns the live route table; it is read once per call, so a swap is atomic.
    `down` returns the variants health checks currently find unable to answer. `compiled`
    returns the chosen route's own chain of layers."""

    async def routed(call: InferCall) -> InferResult:
        plan = table().plan(call.model)
        target = plan.resolve(call.version, call.route_key, down())
        service = compiled(plan)
        try:
            result = await service(call.to(target, plan))
        except GatewayError as err:
            blame(err, target)
            raise
        response = result.response
        response.model_name = call.model
        answered = result.target
        response.model_version = answered.version if answered.model == call.model else ""
        return result

    return routed
