"""The innermost service: hand the call to the chosen variant's backend adapter.

Each try is bounded by the backend's per-try timeout and by what is left of the caller's
deadline, whichever is shorter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc
from tritonclient.grpc import service_pb2 as oip

from adapters.base import Adapter
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.pipeline import InferCall, InferService


def dispatch(
    adapters: Callable[[], Mapping[str, Adapter]],
    per_try_timeout: Callable[[str], float],
    metrics: GatewayMetrics,
) -> InferService:
    async def call_backend(call: InferCall) -> oip.ModelInferResponse:
        target = call.target
        adapter = adapters()[target.backend]
        timeout = per_try_timeout(target.backend)
        remaining = call.remaining()
        budget_bound = False
        if remaining is not None:
            if remaining <= 0:
                raise GatewayError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the backend call"
                )
            budget_bound = remaining < timeout
            timeout = min(timeout, remaining)
        request = call.request
        request.model_name = target.backend_model
        request.model_version = target.backend_version
        renamed = target.input_names or target.output_names
        if renamed:
            _rename(request.inputs, dict(target.input_names))
            _rename(request.outputs, dict(target.output_names))
        gauge = metrics.backend_in_flight_for(target.backend)
        gauge.inc()
        try:
            response = await adapter.infer(request, timeout=timeout, target=target)
        except GatewayError as err:
            if budget_bound and err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                err.budget_ran_out = True
            raise
        finally:
            gauge.dec()
            if renamed:  # a retry or fallback may go to a variant with other names
                _rename(request.inputs, {b: p for p, b in target.input_names})
                _rename(request.outputs, {b: p for p, b in target.output_names})
        if target.output_names:
            _rename(response.outputs, {b: p for p, b in target.output_names})
        return response

    return call_backend


def _rename(tensors, names: dict[str, str]) -> None:
    for tensor in tensors:
        tensor.name = names.get(tensor.name, tensor.name)
