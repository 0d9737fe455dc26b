"""Shadow traffic: mirror a sampled fraction of requests to a shadow variant and compare.

Fire and forget: the mirror starts after the primary has answered, runs as its own task with its
own concurrency cap (excess copies are dropped and counted), and whatever happens to it never
reaches the caller. The comparison (per output: max absolute difference, argmax agreement) is
what makes a shadow useful before a canary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable

import numpy as np
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.pipeline import InferCall, InferResult, InferService, Layer

log = logging.getLogger(__name__)


def _outputs(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    arrays = {}
    for i, tensor in enumerate(response.outputs):
        if tensor.datatype == "BYTES":
            continue  # no numeric difference to measure
        try:
            arrays[tensor.name] = oip_codec.output_array(response, i)
        except GatewayError:
            continue  # a malformed output is counted as a mismatch by the caller
    return arrays


def compare(metrics: GatewayMetrics, model: str, variant: str, primary, shadow) -> None:
    mine, theirs = _outputs(primary), _outputs(shadow)
    for name, expected in mine.items():
        got = theirs.get(name)
        if got is None or got.shape != expected.shape:
            metrics.shadow_mismatch.labels(model, variant).inc()
            continue
        if expected.size == 0:
            continue
        diff = np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))
        metrics.shadow_max_abs_diff.labels(model, variant, name).observe(float(diff))
        if expected.ndim >= 1 and expected.shape[-1] > 1:
            rows = expected.reshape(-1, expected.shape[-1])
            agree = np.argmax(rows, axis=-1) == np.argmax(got.reshape(rows.shape), axis=-1)
            same = int(agree.sum())
            if same:
                metrics.shadow_argmax.labels(model, variant, name, "true").inc(same)
            if len(agree) - same:
                metrics.shadow_argmax.labels(model, variant, name, "false").inc(len(agree) - same)


class ShadowRunner:
    def __init__(self, metrics: GatewayMetrics, per_try_timeout: Callable[[str], float]) -> None:
        self._metrics = metrics
        self._timeout = per_try_timeout
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    def maybe_mirror(self, call: InferCall, primary: InferResult, send: InferService) -> None:
        policy = call.plan.settings.shadow
        if policy is None or random.random() >= policy.fraction:
            return
        target = call.plan.variant(policy.variant)
        if target is None or target == primary.target:
            return
        model = call.model
        busy = self._in_flight.get(model, 0)
        if busy >= policy.max_concurrency:
            self._metrics.shadow_requests.labels(model, target.variant, "dropped").inc()
            return
        self._in_flight[model] = busy + 1
        # The mirror reads the caller's request as the primary did: nothing edits it.
        mirror = dataclasses.replace(call, target=target, deadline=None)
        task = asyncio.ensure_future(self._run(mirror, primary.response, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, mirror: InferCall, primary, send: InferService) -> None:
        variant = mirror.target.variant
        try:
            async with asyncio.timeout(self._timeout(mirror.target.backend)):
                shadow = (await send(mirror)).response
        except Exception as err:
            self._metrics.shadow_requests.labels(mirror.model, variant, "error").inc()
            log.debug("shadow %s/%s failed: %s", mirror.model, variant, err)
        else:
            self._metrics.shadow_requests.labels(mirror.model, variant, "ok").inc()
            compare(self._metrics, mirror.model, variant, primary, shadow)
        finally:
            self._in_flight[mirror.model] -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def shadow(runner: ShadowRunner, send: Callable[[], InferService]) -> Layer:
    """`send` returns the path a mirror takes: breaker, bulkhead and dispatch, no retries."""

    def layer(inner: InferService) -> InferService:
        async def mirrored(call: InferCall) -> InferResult:
            result = await inner(call)
            if call.plan.settings.shadow is not None and not result.degraded:
                runner.maybe_mirror(call, result, send())
            return result

        return mirrored

    return layer
