"""Choose the variant for a call, and answer in the public model's names.

The adapter call (dispatch) speaks the backend's model name and version; the response is
rewritten here to the public ones, so callers never see backend names (only the variant, in
response metadata).
"""

from __future__ import annotations

from collections.abc import Callable

from tritonclient.grpc import service_pb2 as oip

from gateway.pipeline import InferCall, InferService, Layer
from gateway.routing import RouteTable


def route(
    table: Callable[[], RouteTable], down: Callable[[], frozenset[tuple[str, str, str]]]
) -> Layer:
    """`table` returns the live route table; it is read once per call, so a swap is atomic.
    `down` returns the variants health checks currently find unable to answer."""

    def layer(inner: InferService) -> InferService:
        async def routed(call: InferCall) -> oip.ModelInferResponse:
            plan = table().plan(call.model)
            call.plan = plan
            call.target = call.primary = plan.resolve(call.version, call.route_key, down())
            response = await inner(call)
            response.model_name = call.model
            answered = call.target
            response.model_version = answered.version if answered.model == call.model else ""
            return response

        return routed

    return layer
