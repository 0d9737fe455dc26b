"""Per-backend concurrency limits with a small bounded queue (a bulkhead).

A slow or hung backend can then hold at most its own slots; calls beyond slots + queue are
rejected at once with RESOURCE_EXHAUSTED (which the route's fallback may rescue), and calls to
other backends never wait behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import prometheus_client as prom

from gateway.dataplane.pipeline import Layer, per_backend
from gateway.errors import GatewayError
from tensorgate.config.v1 import config_pb2


@dataclass(frozen=True, slots=True)
class BulkheadSettings:
    max_concurrency: int = 64
    max_queue: int = 16
    disabled: bool = False


def bulkhead_settings(
    backend: config_pb2.Backend, defaults: config_pb2.Bulkhead
) -> BulkheadSettings:
    b = backend.bulkhead if backend.HasField("bulkhead") else defaults
    base = BulkheadSettings()
    return BulkheadSettings(
        max_concurrency=b.max_concurrency or base.max_concurrency,
        max_queue=0 if b.no_queue else (b.max_queue or base.max_queue),
        disabled=b.disabled,
    )


class BulkheadMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.bulkhead_rejections = prom.Counter(
            "tensorgate_bulkhead_rejections",
            "Calls rejected because the backend's concurrency limit and queue were full.",
            ("backend",),
            registry=registry,
        )
        self.bulkhead_queued = prom.Gauge(
            "tensorgate_bulkhead_queued",
            "Calls waiting for a backend concurrency slot.",
            ("backend",),
            registry=registry,
        )


class Bulkhead:
    def __init__(self, backend: str, settings: BulkheadSettings, metrics: BulkheadMetrics) -> None:
        self.backend = backend
        self.settings = settings
        self._free = asyncio.Semaphore(settings.max_concurrency)
        self._queued = 0
        self._running = 0  # counted here: asyncio.Semaphore exposes no count
        self._rejections = metrics.bulkhead_rejections.labels(backend)
        self._queue_gauge = metrics.bulkhead_queued.labels(backend)

    @property
    def in_flight(self) -> int:
        return self._running

    async def call(self, fn: Callable[[], object]):
        if self._free.locked():
            if self._queued >= self.settings.max_queue:
                self._rejections.inc()
                raise GatewayError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"backend {self.backend!r} is at its concurrency limit "
                    f"({self.settings.max_concurrency} in flight, {self._queued} queued)",
                )
            self._queued += 1
            self._queue_gauge.inc()
            try:
                await self._free.acquire()  # bounded by the caller's deadline (deadline layer)
            finally:
                self._queued -= 1
                self._queue_gauge.dec()
        else:
            await self._free.acquire()
        self._running += 1
        try:
            return await fn()
        finally:
            self._running -= 1
            self._free.release()


def bulkhead(bulkheads: Callable[[], Mapping[str, Bulkhead]]) -> Layer:
    return per_backend(bulkheads)
