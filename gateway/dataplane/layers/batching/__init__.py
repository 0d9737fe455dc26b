"""Dynamic batching at the gateway: calls to one variant are merged on the batch dimension into
one backend call, and the answer is sliced back to each caller
(gateway/dataplane/layers/batching/batcher.py queues,
adapters/codecs/batch.py merges and splits, byte-exact).

Configured per variant (`Variant.batching`), and only used for a model that has a batch
dimension: Triton's max_batch_size > 0, or a route schema's `max_batch_size`. Other calls pass
through untouched. The layer sits below retry and hedge and above the breaker: a batch is one
backend call to the breaker and bulkhead, and when it fails each member gets the backend's status
and goes through retry and fallback on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import prometheus_client as prom

from gateway.dataplane.layers.batching.batcher import Batcher
from gateway.dataplane.layers.contract import NOT_ON_DECOUPLED, LayerEnv, RouteLayer, hands_over
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2

if TYPE_CHECKING:
    from gateway.dataplane.routing import RoutePlan

DEFAULT_MAX_QUEUE_DELAY_S = 0.001
DEFAULT_MAX_QUEUED = 1024
_UNKNOWN = object()


@dataclass(frozen=True, slots=True)
class BatchSettings:
    max_batch_size: int
    max_queue_delay: float
    preferred_sizes: tuple[int, ...]
    max_queued: int
    max_in_flight: (
        int | None
    )  # None: every batch waits for its delay (BATCH_DISPATCH_WAIT_FOR_DELAY)


def settings(policy: config_pb2.RoutePolicy, route: config_pb2.Route) -> dict[str, BatchSettings]:
    """Per variant name, for the variants that batch."""
    by_variant = {}
    for variant in route.variants:
        b = variant.batching
        if b.max_batch_size > 0:
            by_variant[variant.name] = BatchSettings(
                max_batch_size=b.max_batch_size,
                max_queue_delay=(
                    seconds(b.max_queue_delay)
                    if b.HasField("max_queue_delay")
                    else DEFAULT_MAX_QUEUE_DELAY_S
                ),
                preferred_sizes=tuple(sorted(set(b.preferred_batch_sizes))),
                max_queued=b.max_queued or DEFAULT_MAX_QUEUED,
                max_in_flight=(
                    None
                    if b.dispatch == config_pb2.BATCH_DISPATCH_WAIT_FOR_DELAY
                    else b.max_concurrent_batches or 1
                ),
            )
    return by_variant


def check(
    policy: config_pb2.RoutePolicy, at: str, route: config_pb2.Route | None, models
) -> Iterator[tuple[str, str]]:
    if route is None:
        return
    route_at = at.removesuffix(".policy")
    for k, variant in enumerate(route.variants):
        b, vat = variant.batching, f"{route_at}.variants[{k}].batching"
        if b.HasField("max_queue_delay") and not 0 <= seconds(b.max_queue_delay) <= 1:
            yield f"{vat}.max_queue_delay", "must be between 0s and 1s"
        if b.max_concurrent_batches and b.dispatch == config_pb2.BATCH_DISPATCH_WAIT_FOR_DELAY:
            yield (
                f"{vat}.max_concurrent_batches",
                "only applies with dispatch BATCH_DISPATCH_SEND_WHEN_IDLE (the default)",
            )
        for m, size in enumerate(b.preferred_batch_sizes):
            if not 0 < size <= b.max_batch_size:
                yield (
                    f"{vat}.preferred_batch_sizes[{m}]",
                    f"{size} must be between 1 and max_batch_size ({b.max_batch_size})",
                )


class BatchingMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.batch_size = prom.Histogram(
            "tensorgate_batch_size",
            "Batch size (sum of the merged calls' first dimensions) of each batched backend call.",
            ("model", "variant"),
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.queue_delay = prom.Histogram(
            "tensorgate_batch_queue_delay_seconds",
            "How long each batched call waited in its variant's queue before the batch was sent.",
            ("model", "variant"),
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=registry,
        )


@dataclass(slots=True)
class BatchingState:
    env: LayerEnv
    metrics: BatchingMetrics


def batching(by_variant: dict[str, BatchSettings], shared: BatchingState, plan: RoutePlan) -> Layer:
    specs = shared.env.specs
    adapters = shared.env.adapters

    def layer(inner: InferService) -> InferService:
        # Per variant: its Batcher, or None once its model is known not to batch.
        batchers: dict[str, Batcher | None] = {}

        def make(target, config: BatchSettings, model_max: int) -> Batcher:
            size = shared.metrics.batch_size.labels(plan.model, target.variant)
            delay = shared.metrics.queue_delay.labels(plan.model, target.variant)

            async def send(request, deadline: float | None):
                call = InferCall(request, plan.model, "", deadline=deadline, plan=plan)
                return (await inner(call.to(target))).response

            def on_batch(total: int, delays: list[float]) -> None:
                size.observe(total)
                for waited in delays:
                    delay.observe(waited)

            return Batcher(
                send,
                max_batch_size=min(config.max_batch_size, model_max),
                max_queue_delay=config.max_queue_delay,
                preferred_sizes=config.preferred_sizes,
                max_queued=config.max_queued,
                max_in_flight=config.max_in_flight,
                on_batch=on_batch,
            )

        async def batched(call: InferCall) -> InferResult:
            target = call.target
            config = by_variant.get(target.variant)
            if config is None:
                return await inner(call)
            batcher = batchers.get(target.variant, _UNKNOWN)
            if batcher is _UNKNOWN:
                spec = await specs.get(adapters()[target.backend], target, call.remaining())
                if spec is None:  # not described (yet): unbatched, asked again next call
                    return await inner(call)
                # Calls that waited for the same description together (a burst of fallbacks
                # to this variant, say) must share one Batcher: the first to resume makes it.
                batcher = batchers.get(target.variant, _UNKNOWN)
                if batcher is _UNKNOWN:
                    batcher = batchers[target.variant] = (
                        make(target, config, spec.max_batch_size)
                        if spec.max_batch_size > 0
                        else None
                    )
            if batcher is None:
                return await inner(call)
            response = await batcher.submit(call.request, call.deadline)
            return InferResult(response, target)

        return batched

    return layer


LAYER = RouteLayer(
    "batching",
    settings=settings,
    active=bool,
    state=lambda env: BatchingState(env, BatchingMetrics(env.registry)),
    build=batching,
    envoy=hands_over("batching: the gateway gathers calls into batches"),
    fields=("Variant.batching",),
    decoupled=NOT_ON_DECOUPLED,
    check=check,
    reads_route=True,
)
