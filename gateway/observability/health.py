"""Backend readiness probing and the gateway's own readiness.

The gateway is ready once it has started (route table loaded, first probe round done) and until
it drains. Per-model health is ModelReady's, the route_ready gauge's and `tensorgate admin
backends`': one model whose backends are down must not take the instance, and with it every
healthy model, out of the load balancer (blast radius). lifecycle.readiness:
READINESS_ALL_ROUTES restores the stricter rule (ready only while every route can answer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from adapters.base import Adapter
from gateway.dataplane.routing import RouteTable
from gateway.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

OIP_SERVICE = "inference.GRPCInferenceService"
# SERVING while the process runs and its event loop answers, whatever the backends do: for
# liveness probes, which must not restart gateways because a backend is down.
LIVENESS_SERVICE = "tensorgate.liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    """Active health checks of backends and of every variant's model, and the gateway's own
    readiness derived from them.

    A backend that fails its probe is probed again with exponential backoff (up to 4x the
    interval) so a dead backend is not hammered, but a restarted one is noticed within seconds.
    """

    def __init__(
        self,
        adapters: Callable[[], Mapping[str, Adapter]],
        table: Callable[[], RouteTable],
        metrics: GatewayMetrics,
        interval: float,
        all_routes: bool = False,
    ) -> None:
        self.servicer = HealthServicer()
        self._adapters = adapters
        self._table = table
        self._metrics = metrics
        self._interval = interval
        self._all_routes = all_routes
        self.started = False
        self.backend_up: dict[str, bool] = {}
        self._failures: dict[str, int] = {}
        self._next_probe: dict[str, float] = {}
        self.down: frozenset[tuple[str, str, str]] = frozenset()  # probed down, or drained
        self._probed_down: frozenset[tuple[str, str, str]] = frozenset()
        self.drained: set[str] = set()  # backends an operator drained
        self.draining = False
        self.ready = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        await self._publish()  # NOT_SERVING until the first probe round is done
        await self.probe()
        self.started = True
        await self._publish()
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
            await asyncio.sleep(self._interval / 4)
            try:
                await self.probe(only_due=True)
            except Exception:  # a probe bug must not stop probing for good
                log.exception("health probe round failed")

    async def probe(self, *, only_due: bool = False) -> None:
        adapters = self._adapters()
        now = asyncio.get_running_loop().time()
        due = [n for n in adapters if not only_due or now >= self._next_probe.get(n, 0.0)]
        if not due:
            return
        timeout = min(self._interval, 2.0)
        results = await asyncio.gather(*(adapters[n].ready(timeout=timeout) for n in due))
        for name, up in zip(due, results, strict=True):
            if self.backend_up.get(name) != up:
                if up:
                    log.info("backend %s is up", name)
                else:
                    log.warning("backend %s is DOWN: it did not answer its readiness probe", name)
            self.backend_up[name] = up
            self._failures[name] = 0 if up else self._failures.get(name, 0) + 1
            backoff = min(2 ** max(0, self._failures[name] - 1), 4) if not up else 1
            self._next_probe[name] = now + self._interval * backoff
            self._metrics.backend_up.labels(name).set(1 if up else 0)
        await self._probe_models(adapters)
        await self._publish()

    async def _probe_models(self, adapters: Mapping[str, Adapter]) -> None:
        keys = {t.key for plan in self._table() for t in plan.targets}
        limit = asyncio.Semaphore(16)

        async def model_ready(key: tuple[str, str, str]) -> bool:
            backend, model, version = key
            if not self.backend_up.get(backend):
                return False
            async with limit:
                return await adapters[backend].ready(model, version, timeout=2.0)

        ordered = sorted(keys)
        results = await asyncio.gather(*(model_ready(k) for k in ordered))
        down = frozenset(k for k, ok in zip(ordered, results, strict=True) if not ok)
        if down != self._probed_down:
            self._log_changes(down)
        self._probed_down = down
        self._combine()

    def _log_changes(self, down: frozenset[tuple[str, str, str]]) -> None:
        """One readable line per variant that became unable to answer (WARNING) or able again."""
        for plan in self._table():
            for t in plan.targets:
                if t.key in down and t.key not in self._probed_down:
                    if self.backend_up.get(t.backend):
                        why = (
                            f"backend {t.backend} has no ready model {t.backend_model!r}"
                            + (f" version {t.backend_version}" if t.backend_version else "")
                            + " (not there, or not loaded)"
                        )
                    else:
                        why = f"backend {t.backend} is down"
                    log.warning(
                        "route %r variant %r is unable to answer: %s; its calls go to a sibling "
                        "variant or the route's fallback", plan.model, t.variant, why,
                    )  # fmt: skip
                elif t.key not in down and t.key in self._probed_down:
                    log.info("route %r variant %r can answer again", plan.model, t.variant)

    def _combine(self) -> None:
        if not self.drained:
            self.down = self._probed_down
            return
        drained = {
            t.key for plan in self._table() for t in plan.targets if t.backend in self.drained
        }
        self.down = self._probed_down | drained

    async def set_drained(self, backend: str, drained: bool) -> None:
        """Drained backends' variants get no new calls while a sibling can answer."""
        if drained:
            self.drained.add(backend)
        else:
            self.drained.discard(backend)
        log.info("backend %s %s", backend, "drained" if drained else "undrained")
        self._combine()
        await self._publish()

    async def use_drained(self, backends: frozenset[str]) -> None:
        """The drained set as the revision store holds it (shared by every replica)."""
        if backends == self.drained:
            return
        for backend in sorted(backends ^ self.drained):
            log.info("backend %s %s", backend, "drained" if backend in backends else "undrained")
        self.drained = set(backends)
        self._combine()
        await self._publish()

    def table_changed(self) -> None:
        self._combine()

    def route_ready(self, model: str, _seen: frozenset[str] = frozenset()) -> bool:
        """A route is ready when a variant can answer, or a fallback step can."""
        plan = self._table().get(model)
        if plan is None:
            return False
        if any(self._can_answer(t) for t in plan.targets):
            return True
        for step in plan.settings.fallback:
            kind = step.WhichOneof("step")
            if kind == "static_response":
                return True
            if kind == "model" and step.model not in _seen | {model}:
                if self.route_ready(step.model, _seen | {model}):
                    return True
        return False

    def _can_answer(self, target) -> bool:
        # A backend not probed yet counts as down: never report ready before the first probe.
        return bool(self.backend_up.get(target.backend)) and target.key not in self.down

    async def _publish(self) -> None:
        all_routes = True
        for plan in self._table():
            up = self.route_ready(plan.model)
            self._metrics.route_ready.labels(plan.model).set(1 if up else 0)
            all_routes = all_routes and up
        ready = self.started and not self.draining and (all_routes or not self._all_routes)
        if ready != self.ready:
            log.info("gateway readiness: %s", "SERVING" if ready else "NOT_SERVING")
        self.ready = ready
        self._metrics.ready.set(1 if ready else 0)
        status = SERVING if ready else NOT_SERVING
        await self.servicer.set("", status)
        await self.servicer.set(OIP_SERVICE, status)
