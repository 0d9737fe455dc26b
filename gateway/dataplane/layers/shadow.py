"""Shadow traffic: mirror a sampled fraction of requests to a shadow variant and compare.

Fire and forget: the mirror starts after the primary has answered, runs as its own task with its
own concurrency cap (excess copies are dropped and counted), and whatever happens to it never
reaches the caller. The comparison (per output: max absolute difference, argmax agreement) is
what makes a shadow useful before a canary.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import prometheus_client as prom
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from gateway.dataplane.layers.contract import NOT_ON_DECOUPLED, LayerEnv, OnEnvoy, RouteLayer
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.errors import GatewayError
from gateway.observability import tracing
from tensorgate.config.v1 import config_pb2


@dataclass(frozen=True, slots=True)
class ShadowSettings:
    variant: str
    fraction: float
    max_concurrency: int = 8


def settings(policy: config_pb2.RoutePolicy, route=None) -> ShadowSettings | None:
    if not (policy.HasField("shadow") and policy.shadow.variant):
        return None
    sh = policy.shadow
    return ShadowSettings(sh.variant, sh.fraction, sh.max_concurrency or 8)


def check(
    policy: config_pb2.RoutePolicy, at: str, route: config_pb2.Route | None, models
) -> Iterator[tuple[str, str]]:
    shadow = policy.shadow
    if not (policy.HasField("shadow") and shadow.variant):
        return
    variants = {v.name: v for v in route.variants} if route else {}
    if route is None:
        yield f"{at}.shadow", "only valid in a route's own policy"
    elif shadow.variant not in variants:
        yield f"{at}.shadow.variant", f"unknown variant {shadow.variant!r}"
    elif variants[shadow.variant].weight > 0:
        yield (
            f"{at}.shadow.variant",
            f"{shadow.variant!r} takes live traffic (weight > 0); a shadow needs weight 0",
        )
    if not 0 <= shadow.fraction <= 1:
        yield f"{at}.shadow.fraction", "must be between 0 and 1"


class ShadowMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.shadow_requests = prom.Counter(
            "tensorgate_shadow_requests",
            "Mirrored requests by outcome: ok, error, dropped (shadow concurrency full).",
            ("model", "variant", "outcome"),
            registry=registry,
        )
        self.shadow_max_abs_diff = prom.Histogram(
            "tensorgate_shadow_max_abs_diff",
            "Per output: largest absolute difference between shadow and primary values.",
            ("model", "variant", "output"),
            buckets=(0.0, 1e-6, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0),
            registry=registry,
        )
        self.shadow_argmax = prom.Counter(
            "tensorgate_shadow_argmax",
            "Per output row: whether shadow and primary agree on the argmax (classifiers).",
            ("model", "variant", "output", "agree"),
            registry=registry,
        )
        self.shadow_mismatch = prom.Counter(
            "tensorgate_shadow_mismatch",
            "Shadow answers whose outputs differ in name, datatype or shape from the primary's.",
            ("model", "variant"),
            registry=registry,
        )


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


def compare(metrics: ShadowMetrics, model: str, variant: str, primary, shadow) -> None:
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
    def __init__(
        self, metrics: ShadowMetrics, per_try_timeout: Callable[[str], float], drift=None
    ) -> None:
        self._metrics = metrics
        self._timeout = per_try_timeout
        self._drift = drift  # gateway.dataplane.layers.drift.monitor.DriftMonitor, or None
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    def maybe_mirror(
        self, policy: ShadowSettings, call: InferCall, primary: InferResult, send: InferService
    ) -> None:
        if random.random() >= policy.fraction:
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
        mirror = call.to(target).until(None)
        with tracing.step("shadow"):  # the task takes the context it is created in
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
            if self._drift is not None:
                # The shadow's predictions against the route's reference: a shadow that
                # answers differently from the primary drifts on the prediction features.
                route = self._drift.existing(mirror.model)
                if route is not None and self._drift.sampled(route):
                    self._drift.observe(route, variant, mirror.request, shadow, shadow=True)
        finally:
            self._in_flight[mirror.model] -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def shadow(policy: ShadowSettings, runner: ShadowRunner, send: Callable[[], InferService]) -> Layer:
    """`send` returns the path a mirror takes: breaker, bulkhead and dispatch, no retries."""

    def layer(inner: InferService) -> InferService:
        async def mirrored(call: InferCall) -> InferResult:
            result = await inner(call)
            if not result.degraded:
                runner.maybe_mirror(policy, call, result, send())
            return result

        return mirrored

    return layer


@dataclass(slots=True)
class ShadowState:
    runner: ShadowRunner
    send: Callable[[], InferService]

    async def close(self) -> None:
        await self.runner.close()


def state(env: LayerEnv) -> ShadowState:
    return ShadowState(
        ShadowRunner(ShadowMetrics(env.registry), env.per_try_timeout, env.drift),
        env.backend_call,
    )


def on_envoy(s: ShadowSettings, route) -> OnEnvoy:
    """translated (a request mirror); outputs are not compared"""
    return OnEnvoy(
        notes=(
            f"shadow: {s.fraction:g} of requests mirrored to {s.variant!r}; outputs are not "
            "compared (the gateway compares)",
        )
    )


LAYER = RouteLayer(
    "shadow",
    settings=settings,
    active=lambda s: s is not None,
    state=state,
    build=lambda s, shared, plan: shadow(s, shared.runner, shared.send),
    envoy=on_envoy,
    fields=("RoutePolicy.shadow",),
    decoupled=NOT_ON_DECOUPLED,
    check=check,
)
