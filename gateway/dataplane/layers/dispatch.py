"""The innermost service: hand the call to the chosen variant's backend adapter.

Each try is bounded by the backend's per-try timeout and by what is left of the caller's
deadline, whichever is shorter. The adapter builds the backend's request from the caller's (which
nobody edits), so retries, hedges, fallbacks and shadows can share it freely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc

from adapters.base import Adapter
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, blame
from gateway.errors import GatewayError
from gateway.observability import tracing
from gateway.observability.metrics import GatewayMetrics


def dispatch(
    adapters: Callable[[], Mapping[str, Adapter]],
    per_try_timeout: Callable[[str], float],
    metrics: GatewayMetrics,
) -> InferService:
    async def call_backend(call: InferCall) -> InferResult:
        target = call.target
        adapter = adapters()[target.backend]
        timeout = per_try_timeout(target.backend)
        remaining = call.remaining()
        budget_bound = False
        if remaining is not None:
            if remaining <= 0:
                raise blame(
                    GatewayError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "deadline exceeded before the backend call",
                    ),
                    target,
                )
            budget_bound = remaining < timeout
            timeout = min(timeout, remaining)
        gauge = metrics.backend_in_flight_for(target.backend)
        gauge.inc()
        with tracing.attempt_span(target) as span:
            try:
                response = await adapter.infer(call.request, timeout=timeout, target=target)
            except GatewayError as err:
                if budget_bound and err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    err.budget_ran_out = True
                blame(err, target)
                tracing.finish(span, code=err.code.name, message=err.message)
                raise
            finally:
                gauge.dec()
            tracing.finish(span, code="OK")
        if target.output_names:  # the response is ours (the adapter's): renamed in place
            public = {b: p for p, b in target.output_names}
            for tensor in response.outputs:
                tensor.name = public.get(tensor.name, tensor.name)
        return InferResult(response, target)

    return call_backend
