"""When the primary fails with a backend-side error (or its breaker is open, or its bulkhead is
full), walk the route's fallback chain: another variant, another model, a static answer.

The caller gets a degraded answer instead of an error, and learns it was degraded from the
x-tensorgate-degraded trailer and the tensorgate_fallbacks metric. A request the backend rejected
as invalid is never "rescued": caller errors pass straight through.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.pipeline import InferCall, InferResult, InferService, Layer, PrimaryFailure, blame
from gateway.policy import BACKEND_FAILURES
from gateway.routing import RouteTable

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


def fallback(table: Callable[[], RouteTable], metrics: GatewayMetrics) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def rescued(call: InferCall) -> InferResult:
            steps = call.plan.settings.fallback
            if not steps:
                return await inner(call)
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
                if kind == "variant":
                    target = call.plan.variant(step.variant)
                else:
                    plan = table().get(step.model)
                    if plan is None:
                        continue
                    target = plan.resolve("", call.route_key)
                if target is None or target == call.target:
                    continue
                try:
                    result = await inner(call.to(target))
                except GatewayError as err:
                    if err.code not in BACKEND_FAILURES:
                        raise
                    log.debug("fallback %s for %s failed: %s", label, call.model, err)
                    continue
                metrics.fallbacks.labels(call.model, label).inc()
                return dataclasses.replace(
                    result,
                    degraded=label,
                    attempts=result.attempts + 1,
                    primary_failure=failed,
                )
            metrics.fallbacks.labels(call.model, "exhausted").inc()
            raise primary_error

        return rescued

    return layer
