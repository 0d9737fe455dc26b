"""The innermost service: hand the call to the chosen variant's backend adapter.

Each try is bounded by the backend's per-try timeout and by what is left of the caller's
deadline, whichever is shorter. The adapter builds the backend's request from the caller's (which
nobody edits), so retries, hedges, fallbacks and shadows can share it freely.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import grpc

from adapters.base import Adapter
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, blame
from gateway.errors import GatewayError, shown
from gateway.observability import tracing
from gateway.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)
_LOGGED: dict[tuple[str, str], float] = {}  # (route, variant) misrouted -> when last logged


def misrouted(err: GatewayError, target) -> GatewayError:
    """A backend's NOT_FOUND names a model or version the route table chose, not the caller: a
    gateway fault. The caller gets UNAVAILABLE (so fallback takes over) without the backend's
    private model name; the operator gets a WARNING (at most one per variant per 10 s). The
    backend answered, so its breaker does not count it (budget_ran_out), and retrying the same
    variant can only fail the same way (fail_fast)."""
    now = time.monotonic()
    key = (target.model, target.variant)
    if now - _LOGGED.get(key, -10.0) >= 10.0:
        _LOGGED[key] = now
        log.warning(
            "route %r variant %r is misrouted: backend %s has no model %r version %r (it "
            "answered NOT_FOUND: %s); its calls fail over to the route's fallback until the "
            "route table names a model the backend has",
            target.model, target.variant, target.backend, target.backend_model,
            target.backend_version, err.message,
        )  # fmt: skip
    fault = GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        f"model {shown(target.model)}: variant {shown(target.variant)} cannot answer: the "
        "gateway's route table names a model its backend does not have (a gateway "
        "configuration fault, reported in the gateway's log)",
    )
    fault.budget_ran_out = True
    fault.fail_fast = True
    return fault


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
                if err.code is grpc.StatusCode.NOT_FOUND:
                    fault = blame(misrouted(err, target), target)
                    tracing.finish(span, code=fault.code.name, message=fault.message)
                    raise fault from None
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
