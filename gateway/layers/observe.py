"""Count and time every call by the variant that answered and the status it got."""

from __future__ import annotations

import time

import grpc
from tritonclient.grpc import service_pb2 as oip

from gateway.errors import GatewayError
from gateway.metrics import UNROUTED, GatewayMetrics
from gateway.pipeline import InferCall, InferService, Layer

_OK = grpc.StatusCode.OK.name


def observe(metrics: GatewayMetrics, known_model) -> Layer:
    """`known_model(name)` says whether a public model name may be used as a label value."""

    def layer(inner: InferService) -> InferService:
        async def observed(call: InferCall) -> oip.ModelInferResponse:
            model = call.model if known_model(call.model) else UNROUTED
            gauge = metrics.in_flight.labels(model)
            gauge.inc()
            start = time.perf_counter()
            code = _OK
            try:
                return await inner(call)
            except GatewayError as err:
                code = err.code.name
                raise
            except BaseException:
                code = grpc.StatusCode.CANCELLED.name
                raise
            finally:
                gauge.dec()
                target = call.target
                metrics.observe(
                    model,
                    target.variant if target else "",
                    target.backend if target else "",
                    code,
                    time.perf_counter() - start,
                )

        return observed

    return layer
