"""Hedged requests: if the first try has not answered after a delay, send a second try to
another variant and take whichever answers first, cancelling the other ("The Tail at Scale").

The delay is fixed, or the primary variant's observed p95 (so only the slowest ~5% hedge).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import prometheus_client as prom

from gateway.dataplane.layers.contract import NOT_ON_DECOUPLED, RouteLayer, hands_over
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.durations import seconds
from gateway.errors import GatewayError
from gateway.observability import tracing
from tensorgate.config.v1 import config_pb2


class LatencyTracker:
    """Recent latencies per variant, for the p95 hedge delay (last 512 answers)."""

    def __init__(self, size: int = 512) -> None:
        self._size = size
        self._samples: dict[tuple[str, str], deque] = {}
        self._p95: dict[tuple[str, str], tuple[int, float]] = {}

    def record(self, key: tuple[str, str], seconds: float) -> None:
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self._size)
        samples.append(seconds)

    def p95(self, key: tuple[str, str]) -> float | None:
        samples = self._samples.get(key)
        if not samples or len(samples) < 20:
            return None
        count, value = self._p95.get(key, (-1, 0.0))
        if count != len(samples) or len(samples) == self._size:
            ordered = sorted(samples)
            value = ordered[int(0.95 * (len(ordered) - 1))]
            self._p95[key] = (len(samples), value)
        return value


@dataclass(frozen=True, slots=True)
class HedgeSettings:
    delay: float = 0.0
    use_p95: bool = False

    @property
    def enabled(self) -> bool:
        return self.delay > 0 or self.use_p95


def settings(policy: config_pb2.RoutePolicy, route=None) -> HedgeSettings:
    return HedgeSettings(delay=seconds(policy.hedge.delay), use_p95=policy.hedge.use_p95)


def check(policy: config_pb2.RoutePolicy, at: str, route, models) -> Iterator[tuple[str, str]]:
    if policy.hedge.HasField("delay") and seconds(policy.hedge.delay) < 0:
        yield f"{at}.hedge.delay", "must not be negative"


class HedgeMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.hedges = prom.Counter(
            "tensorgate_hedges",
            "Hedged second tries sent, and which try won.",
            ("model", "winner"),
            registry=registry,
        )


@dataclass(slots=True)
class HedgeState:
    tracker: LatencyTracker
    metrics: HedgeMetrics


def hedge(policy: HedgeSettings, tracker: LatencyTracker, metrics: HedgeMetrics) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def timed(call: InferCall) -> InferResult:
            start = time.perf_counter()
            result = await inner(call)
            target = result.target
            tracker.record((target.model, target.variant), time.perf_counter() - start)
            return result

        async def hedged(call: InferCall) -> InferResult:
            other = call.plan.alternative(call.version, exclude=[call.target])
            if other is None:
                return await timed(call)
            delay = policy.delay
            if policy.use_p95:
                observed = tracker.p95((call.target.model, call.target.variant))
                if observed is not None:
                    delay = max(delay, observed)
            first = asyncio.ensure_future(timed(call))
            done, _ = await asyncio.wait({first}, timeout=delay or None)
            if done:
                return first.result()
            # Both tries read the same caller's request: nothing on the path edits it.
            with tracing.step("hedge"):  # the task takes the context it is created in
                second = asyncio.ensure_future(timed(call.to(other)))
            pending = {first, second}
            errors: list[GatewayError] = []
            try:
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        error = task.exception()
                        if error is None:
                            winner = "first" if task is first else "second"
                            metrics.hedges.labels(call.model, winner).inc()
                            result = task.result()
                            return result.replace(attempts=result.attempts + 1)
                        if not isinstance(error, GatewayError):
                            raise error
                        errors.append(error)
            finally:
                for task in pending:
                    task.cancel()
            metrics.hedges.labels(call.model, "none").inc()
            raise errors[0]

        return hedged

    return layer


LAYER = RouteLayer(
    "hedge",
    settings=settings,
    active=lambda s: s.enabled,
    state=lambda env: HedgeState(LatencyTracker(), HedgeMetrics(env.registry)),
    build=lambda s, shared, plan: hedge(s, shared.tracker, shared.metrics),
    envoy=hands_over("hedge: Envoy hedges only on a per-try timeout, to the same variant"),
    fields=("RoutePolicy.hedge",),
    decoupled=NOT_ON_DECOUPLED,
    check=check,
)
