"""The control plane inside `tensorgate serve`: compiles each route table revision and serves it
to Envoys over ADS (listeners.xds). Admin changes reach it through RouteManager.on_change."""

from __future__ import annotations

import logging
import time

import grpc

from gateway.envoy import ads
from gateway.envoy.compile import Compiler
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)


class ControlPlane:
    def __init__(self, registry=None) -> None:
        self.xds = ads.XdsServer(registry)
        self.compiler = Compiler()  # keeps each route's resources: one change, one route rebuilt
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def update(self, config: config_pb2.GatewayConfig) -> None:
        """Compile `config` and push it to every connected Envoy."""
        started = time.perf_counter()
        try:
            resources = self.compiler.compile(config)
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

    async def start(self, address: str, config: config_pb2.GatewayConfig) -> None:
        self.update(config)
        self._server, self.port = await ads.serve(address, self.xds)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
