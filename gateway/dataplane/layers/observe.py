"""Count and time every call by the variant that answered and the status it got."""

from __future__ import annotations

import asyncio
import time

import grpc

from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.errors import GatewayError
from gateway.observability.metrics import UNROUTED, GatewayMetrics
from gateway.observability.stats import RecentStats

_OK = grpc.StatusCode.OK.name


def observe(metrics: GatewayMetrics, known_model, recent: RecentStats | None = None) -> Layer:
    """`known_model(name)` says whether a public model name may be used as a label value;
    `recent` keeps the last minutes per variant for rollout analysis."""

    def layer(inner: InferService) -> InferService:
        async def observed(call: InferCall) -> InferResult:
            model = call.model if known_model(call.model) else UNROUTED
            gauge = metrics.in_flight_for(model)
            gauge.inc()
            start = time.perf_counter()
            result = None
            target = None
            code = _OK
            try:
                result = await inner(call)
                target = result.target
                return result
            except GatewayError as err:
                code = err.code.name
                target = err.target
                raise
            except asyncio.CancelledError:  # the caller went away or the server is stopping
                code = grpc.StatusCode.CANCELLED.name
                raise
            except Exception:  # a bug of ours: the servicer answers INTERNAL
                code = grpc.StatusCode.INTERNAL.name
                raise
            finally:
                gauge.dec()
                seconds = time.perf_counter() - start
                variant = target.variant if target else ""
                backend = target.backend if target else ""
                metrics.observe(model, variant, backend, code, seconds, call.protocol)
                if recent is not None and model != UNROUTED:
                    recent.record_call(
                        model,
                        target.version if target is not None else call.version,
                        code == _OK,
                        seconds,
                        result.attempts if result is not None else 1,
                        result is not None and result.cached,
                    )
                if recent is not None and target is not None:
                    failure = result.primary_failure if result is not None else None
                    if failure is not None:
                        # The variant that was meant to answer failed; rollouts must see that.
                        primary = failure.target
                        recent.record(
                            model, primary.variant, primary.backend, failure.code, seconds
                        )
                    else:
                        recent.record(model, variant, backend, code, seconds)

        return observed

    return layer
