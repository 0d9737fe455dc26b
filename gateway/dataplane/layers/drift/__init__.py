"""Drift monitoring per route (gateway/dataplane/layers/drift/monitor.py does the work): a sample
of the answers this
route gives, with the variant that gave them, goes to the route's drift monitor. Placed right
after schema validation: every answer the caller gets is seen (cached and fallback ones too,
under the variant that gave them); refused requests are not."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.dataplane.layers.contract import NOT_ON_DECOUPLED, RouteLayer, hands_over
from gateway.dataplane.layers.drift.monitor import DriftMonitor, check
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from tensorgate.config.v1 import config_pb2

if TYPE_CHECKING:
    from gateway.dataplane.routing import RoutePlan


def settings(policy: config_pb2.RoutePolicy, route=None) -> config_pb2.DriftPolicy | None:
    return policy.drift if policy.HasField("drift") else None


def drift(policy: config_pb2.DriftPolicy, monitor: DriftMonitor, plan: RoutePlan) -> Layer:
    route = monitor.route(plan.model, policy)

    def layer(inner: InferService) -> InferService:
        async def watched(call: InferCall) -> InferResult:
            result = await inner(call)
            if monitor.sampled(route):
                monitor.observe(route, result.target.variant, call.request, result.response)
            return result

        return watched

    return layer


LAYER = RouteLayer(
    "drift",
    settings=settings,
    active=lambda s: s is not None,
    state=lambda env: env.drift,
    build=drift,
    envoy=hands_over("drift: the gateway samples inputs and outputs for the drift gauges"),
    fields=("RoutePolicy.drift",),
    decoupled=NOT_ON_DECOUPLED,
    check=check,
)
