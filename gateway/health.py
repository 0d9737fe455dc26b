"""Backend readiness probing and the gateway's own readiness.

The gateway is ready when it is not draining and every route has at least one variant on a
backend whose last probe succeeded: a load balancer should not send traffic to an instance that
would answer some model with UNAVAILABLE for certain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from adapters.base import Adapter
from gateway.metrics import GatewayMetrics
from gateway.routing import RouteTable

log = logging.getLogger(__name__)

OIP_SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    def __init__(
        self,
        adapters: Callable[[], Mapping[str, Adapter]],
        table: Callable[[], RouteTable],
        metrics: GatewayMetrics,
        interval: float,
    ) -> None:
        self.servicer = HealthServicer()
        self._adapters = adapters
        self._table = table
        self._metrics = metrics
        self._interval = interval
        self.backend_up: dict[str, bool] = {}
        self.draining = False
        self.ready = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._publish()  # NOT_SERVING until the first probe round says otherwise
        await self.probe()
        self._task = asyncio.create_task(self._loop(), name="backend-probe")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def drain(self) -> None:
        self.draining = True
        await self._publish()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.probe()
            except Exception:  # a probe bug must not stop probing for good
                log.exception("backend probe round failed")

    async def probe(self) -> None:
        adapters = self._adapters()
        names = list(adapters)
        timeout = min(self._interval, 2.0)
        results = await asyncio.gather(*(adapters[n].ready(timeout=timeout) for n in names))
        for name, up in zip(names, results, strict=True):
            if self.backend_up.get(name) != up:
                log.info("backend %s is %s", name, "up" if up else "DOWN")
            self.backend_up[name] = up
            self._metrics.backend_up.labels(name).set(1 if up else 0)
        await self._publish()

    def route_ready(self, model: str) -> bool:
        plan = self._table().get(model)
        return plan is not None and any(self.backend_up.get(t.backend) for t in plan.targets)

    async def _publish(self) -> None:
        all_routes = True
        for plan in self._table():
            up = any(self.backend_up.get(t.backend) for t in plan.targets)
            self._metrics.route_ready.labels(plan.model).set(1 if up else 0)
            all_routes = all_routes and up
        ready = all_routes and not self.draining
        if ready != self.ready:
            log.info("gateway readiness: %s", "SERVING" if ready else "NOT_SERVING")
        self.ready = ready
        self._metrics.ready.set(1 if ready else 0)
        status = SERVING if ready else NOT_SERVING
        await self.servicer.set("", status)
        await self.servicer.set(OIP_SERVICE, status)
