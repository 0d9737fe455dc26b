"""The control plane inside `tensorgate serve`: compiles each route table revision and serves it
to Envoys over ADS (listeners.xds). Admin changes reach it through RouteManager.on_change."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from gateway.controlplane.envoy import ads
from gateway.controlplane.envoy.compile import Compiler
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)


class ControlPlane:
    """`down`: returns what the gateway's readiness says cannot answer (probed down or drained);
    polled, so an admin drain or a failed probe reaches the Envoys too."""

    POLL_S = 0.2

    def __init__(self, registry=None, down: Callable[[], frozenset] = frozenset) -> None:
        self.xds = ads.XdsServer(registry)
        self._down = down
        self._last_down: frozenset = frozenset()
        self._config: config_pb2.GatewayConfig | None = None
        self._watch: asyncio.Task | None = None
        self.compiler = Compiler()  # keeps each route's resources: one change, one route rebuilt
        self._pending: config_pb2.GatewayConfig | None = None
        self._compiling: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def update(self, config: config_pb2.GatewayConfig) -> None:
        """Compile `config` and push it to every connected Envoy, in the background: compiling
        runs in a worker thread (10,000 routes take seconds; on the event loop the Python data
        plane would stop answering meanwhile). Updates that arrive during a compile coalesce:
        the latest config is compiled next."""
        self._config = config
        self._pending = config
        if self._compiling is None or self._compiling.done():
            self._compiling = asyncio.get_running_loop().create_task(self._compile_pending())

    async def settled(self) -> None:
        """Returns once every update so far is compiled and pushed."""
        while self._compiling is not None and not self._compiling.done():
            await asyncio.shield(self._compiling)

    async def _compile_pending(self) -> None:
        while self._pending is not None:
            config, self._pending = self._pending, None
            await self._compile(config)

    async def _compile(self, config: config_pb2.GatewayConfig) -> None:
        started = time.perf_counter()
        self._last_down = down = self._down()
        try:
            resources = await asyncio.to_thread(self.compiler.compile, config, down)
        except Exception:  # a bug here must not fail the admin change that was already applied
            log.exception("xds: cannot compile the route table; Envoys keep the previous one")
            return
        self.xds.set_snapshot(resources)
        log.info(
            "xds: snapshot %d compiled in %.1f ms (%d clusters; routes on Envoy: %d, on the "
            "gateway: %d)",
            self.xds.number,
            (time.perf_counter() - started) * 1000,
            len(resources.by_type.get("type.googleapis.com/envoy.config.cluster.v3.Cluster", {})),
            sum(d.path == "envoy" for d in resources.decisions),
            sum(d.path == "gateway" for d in resources.decisions),
        )

    async def start(
        self,
        address: str,
        config: config_pb2.GatewayConfig,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """Serve ADS on `address`, over TLS with `credentials` (envoy.xds_tls), once the first
        snapshot is compiled (an Envoy that connects gets a whole config at once)."""
        self._config = config
        await self._compile(config)
        self._server, self.port = await ads.serve(address, self.xds, credentials)
        self._watch = asyncio.create_task(self._follow_readiness())

    async def _follow_readiness(self) -> None:
        while True:
            await asyncio.sleep(self.POLL_S)
            if self._config is not None and self._down() != self._last_down:
                self.update(self._config)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._compiling is not None:
            self._compiling.cancel()
        if self._server is not None:
            await self._server.stop(0)
