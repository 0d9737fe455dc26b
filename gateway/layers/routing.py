"""Choose the variant for a call and speak to the backend in the backend's names.

The request is rewritten in place to the backend's model name and version, and the response back
to the public ones, so callers never see backend names (only the variant, in response metadata).
"""

from __future__ import annotations

from collections.abc import Callable

from tritonclient.grpc import service_pb2 as oip

from gateway.pipeline import InferCall, InferService, Layer
from gateway.routing import RouteTable


def route(table: Callable[[], RouteTable]) -> Layer:
    """`table` returns the live route table; it is read once per call, so a swap is atomic."""

    def layer(inner: InferService) -> InferService:
        async def routed(call: InferCall) -> oip.ModelInferResponse:
            target = table().resolve(call.model, call.version, call.route_key)
            call.target = target
            request = call.request
            request.model_name = target.backend_model
            request.model_version = target.backend_version
            response = await inner(call)
            response.model_name = call.model
            response.model_version = target.version
            return response

        return routed

    return layer
