"""When the primary fails with a backend-side error (or its breaker is open, or its bulkhead is
full), walk the route's fallback chain: another variant, another model, a static answer.

The caller gets a degraded answer instead of an error, and learns it was degraded from the
x-tensorgate-degraded trailer and the tensorgate_fallbacks metric. A request the backend rejected
as invalid is never "rescued": caller errors pass straight through.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import prometheus_client as prom
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from gateway.dataplane.layers.contract import NOT_ON_DECOUPLED, LayerEnv, OnEnvoy, RouteLayer
from gateway.dataplane.pipeline import (
    InferCall,
    InferResult,
    InferService,
    Layer,
    PrimaryFailure,
    blame,
)
from gateway.errors import BACKEND_FAILURES, GatewayError
from gateway.observability import tracing
from tensorgate.config.v1 import config_pb2

if TYPE_CHECKING:
    from gateway.dataplane.routing import RoutePlan, RouteTable

# StaticTensor datatypes (BF16 has no value field to declare it with).
_STATIC_DATATYPES = frozenset(oip_codec.NUMPY_DTYPE) - {"BF16"}

log = logging.getLogger(__name__)


def static_response(step) -> oip.ModelInferResponse:
    """Build the OIP response a StaticResponse declares (raw_output_contents, like Triton)."""
    response = oip.ModelInferResponse()
    for tensor in step.outputs:
        if tensor.datatype == "BYTES":
            values = np.empty(len(tensor.bytes_values), dtype=np.object_)
            values[:] = list(tensor.bytes_values)
        else:
            values = list(tensor.fp_values or tensor.int_values or tensor.bool_values)
            values = np.asarray(values, dtype=oip_codec.NUMPY_DTYPE[tensor.datatype])
        shape = tuple(tensor.shape)
        oip_codec.add_output(response, tensor.name, values.reshape(shape), tensor.datatype)
    return response


def _step_label(step) -> str:
    kind = step.WhichOneof("step")
    if kind == "static_response":
        return "static"
    return f"{kind}:{getattr(step, kind)}"


def check(
    policy: config_pb2.RoutePolicy, at: str, route: config_pb2.Route | None, models: set[str]
) -> Iterator[tuple[str, str]]:
    variants = {v.name for v in route.variants} if route else set()
    for k, step in enumerate(policy.fallback):
        sat = f"{at}.fallback[{k}]"
        kind = step.WhichOneof("step")
        if kind is None:
            yield sat, "set one of variant, model, static_response"
        elif kind == "variant":
            if route is None:
                yield f"{sat}.variant", "only valid in a route's own policy"
            elif step.variant not in variants:
                yield f"{sat}.variant", f"unknown variant {step.variant!r} in this route"
        elif kind == "model":
            if step.model not in models:
                yield f"{sat}.model", f"no route for model {step.model!r}"
            elif route is not None and step.model == route.model:
                yield f"{sat}.model", "a route cannot fall back to itself"
        else:
            for m, tensor in enumerate(step.static_response.outputs):
                tat = f"{sat}.static_response.outputs[{m}]"
                if not tensor.name:
                    yield f"{tat}.name", "required"
                if tensor.datatype not in _STATIC_DATATYPES:
                    yield f"{tat}.datatype", f"{tensor.datatype!r} is not an OIP datatype"
                    continue
                count = 1
                for d in tensor.shape:
                    count *= d
                values = (
                    tensor.bytes_values if tensor.datatype == "BYTES"
                    else tensor.bool_values if tensor.datatype == "BOOL"
                    else tensor.fp_values if tensor.datatype.startswith("FP")
                    else tensor.int_values
                )  # fmt: skip
                if any(d < 0 for d in tensor.shape) or len(values) != count:
                    yield tat, f"shape {list(tensor.shape)} needs {count} values, has {len(values)}"
            if k != len(policy.fallback) - 1:
                yield sat, "static_response must be the last fallback step"


class FallbackMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.fallbacks = prom.Counter(
            "tensorgate_fallbacks",
            "Degraded answers: the fallback step that answered (or 'exhausted').",
            ("model", "step"),
            registry=registry,
        )


@dataclass(slots=True)
class FallbackState:
    table: Callable[[], RouteTable]
    metrics: FallbackMetrics
    down: Callable[[], frozenset]
    route_service: Callable[[RoutePlan], InferService]
    # Whether the caller may call a model it would fall back to (layers/access).
    may_call: Callable[[RoutePlan, InferCall], bool] = lambda plan, call: True


def state(env: LayerEnv) -> FallbackState:
    return FallbackState(
        env.table, FallbackMetrics(env.registry), env.down, env.route_service, env.may_call
    )


# The models whose fallback chains the current call is in: a fallback to another model runs that
# model's whole chain, its own fallbacks included, and must not come back to one of these.
_FALLING_BACK: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "tensorgate_falling_back", default=()
)


def fallback(steps: tuple, shared: FallbackState) -> Layer:
    table, metrics = shared.table, shared.metrics

    def layer(inner: InferService) -> InferService:
        async def rescued(call: InferCall) -> InferResult:
            try:
                return await inner(call)
            except GatewayError as err:
                if err.code not in BACKEND_FAILURES:
                    raise
                primary_error = blame(err, call.target)
            failed = PrimaryFailure(call.target, primary_error.code.name)
            for step in steps:
                label = _step_label(step)
                kind = step.WhichOneof("step")
                if kind == "static_response":
                    metrics.fallbacks.labels(call.model, label).inc()
                    return InferResult(
                        static_response(step.static_response),
                        call.target,
                        degraded=label,
                        primary_failure=failed,
                    )
                visited = _FALLING_BACK.get()
                if kind == "variant":
                    service, plan = inner, call.plan
                    target = plan.variant(step.variant)
                else:
                    # Another model: its own route's chain (its retries, batching, cache, ...
                    # read its plan), routed as the routing layer routes, drains included.
                    plan = table().get(step.model)
                    if plan is None or plan.model in visited or not shared.may_call(plan, call):
                        continue  # (a model the caller may not call is not its fallback either)
                    service = shared.route_service(plan)
                    target = plan.resolve("", call.route_key, shared.down())
                if target is None or target == call.target:
                    continue
                token = _FALLING_BACK.set((*visited, call.plan.model))
                try:
                    with tracing.step("fallback"):
                        result = await service(call.to(target, plan))
                except GatewayError as err:
                    if err.code not in BACKEND_FAILURES:
                        raise
                    log.debug("fallback %s for %s failed: %s", label, call.model, err)
                    continue
                finally:
                    _FALLING_BACK.reset(token)
                metrics.fallbacks.labels(call.model, label).inc()
                return result.replace(
                    degraded=label, attempts=result.attempts + 1, primary_failure=failed
                )
            metrics.fallbacks.labels(call.model, "exhausted").inc()
            raise primary_error

        return rescued

    return layer


def on_envoy(steps: tuple[config_pb2.FallbackStep, ...], route: config_pb2.Route) -> OnEnvoy:
    """translated for variants asking the backend what the primary asks (aggregate cluster);
    hands the route to the gateway for another model, a static answer, or other names"""
    reasons = []
    variants = {v.name: v for v in route.variants}
    for step in steps:
        kind = step.WhichOneof("step")
        if kind == "static_response":
            reasons.append("fallback static_response: the gateway builds the answer")
        elif kind == "model":
            reasons.append(f"fallback to model {step.model!r}: another route's table")
        elif kind == "variant":
            # Envoy's aggregate cluster runs the upstream filters of the cluster the route
            # named (the primary's): a fallback can only ask the backend the same thing.
            other = variants.get(step.variant)
            if other is not None and any(
                (v.backend_model, v.backend_version) != (other.backend_model, other.backend_version)
                for v in route.variants
                if v.weight > 0 or v.version
            ):
                reasons.append(
                    f"fallback to variant {step.variant!r}: another backend model or "
                    "version than the primary (Envoy renames per route, not per fallback)"
                )
    return OnEnvoy(
        hand_over=tuple(reasons),
        notes=("fallback variants: aggregate cluster, taken on retry or ejection",),
    )


LAYER = RouteLayer(
    "fallback",
    settings=lambda policy, route: tuple(policy.fallback),
    active=bool,
    state=state,
    build=lambda steps, shared, plan: fallback(steps, shared),
    envoy=on_envoy,
    fields=("RoutePolicy.fallback",),
    decoupled=NOT_ON_DECOUPLED,
    check=check,
)
