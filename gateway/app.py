"""Assemble and run a gateway: adapters, route table, request path, listeners, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

import gateway
from adapters.base import Adapter
from adapters.registry import build_adapter
from gateway.config import seconds
from gateway.health import Readiness
from gateway.layers import (
    breaker,
    bulkhead,
    deadline,
    dispatch,
    fallback,
    hedge,
    observe,
    retry,
    routing,
    shadow,
    validation,
)
from gateway.metrics import GatewayMetrics
from gateway.pipeline import InferService, compose
from gateway.policy import breaker_settings, bulkhead_settings
from gateway.routing import RouteTable
from gateway.servicer import InferenceServicer
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)

OIP_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class Runtime:
    """The live state a request reads: swapped whole on a config change, never edited in place."""

    def __init__(self, config: config_pb2.GatewayConfig) -> None:
        self.config = config
        self.table = RouteTable(config.routes, config.defaults.route_policy)
        max_request = config.limits.max_request_bytes
        self.adapters: dict[str, Adapter] = {
            b.name: build_adapter(b, max_request_bytes=max_request) for b in config.backends
        }
        self.per_try_timeout = {b.name: seconds(b.per_try_timeout) for b in config.backends}
        self.route_key_header = config.defaults.route_key_header
        self.metrics = GatewayMetrics()
        self.metrics.info.info({"version": gateway.__version__})
        self.readiness = Readiness(
            lambda: self.adapters,
            lambda: self.table,
            self.metrics,
            seconds(config.lifecycle.health_check_interval),
        )
        self.specs = validation.SpecCache()
        defaults = config.defaults
        self.breakers = {
            b.name: breaker.BackendBreaker(
                b.name, breaker_settings(b, defaults.circuit_breaker), self.metrics
            )
            for b in config.backends
            if not breaker_settings(b, defaults.circuit_breaker).disabled
        }
        self.bulkheads = {
            b.name: bulkhead.Bulkhead(b.name, bulkhead_settings(b, defaults.bulkhead), self.metrics)
            for b in config.backends
            if not bulkhead_settings(b, defaults.bulkhead).disabled
        }
        self.retry_budgets = retry.RetryBudgets()
        self.latencies = hedge.LatencyTracker()
        self.shadows = shadow.ShadowRunner(self.metrics, self.per_try_timeout.__getitem__)

    def request_path(self) -> InferService:
        """The ModelInfer path, outermost layer first. Each layer is one policy
        (gateway/layers/); the adapter call is at the bottom."""
        limits = self.config.limits
        adapters = lambda: self.adapters  # noqa: E731 - read per call, so swaps take effect
        backend_call = compose(
            breaker.breaker(lambda: self.breakers),
            bulkhead.bulkhead(lambda: self.bulkheads),
            service=dispatch.dispatch(adapters, self.per_try_timeout.__getitem__, self.metrics),
        )
        return compose(
            observe.observe(self.metrics, lambda model: self.table.get(model) is not None),
            validation.structure(
                max_request_bytes=limits.max_request_bytes, max_inputs=limits.max_inputs
            ),
            routing.route(lambda: self.table, lambda: self.readiness.down),
            validation.schema(adapters, self.specs),
            deadline.deadline(),
            shadow.shadow(self.shadows, lambda: backend_call),
            fallback.fallback(lambda: self.table, self.metrics),
            hedge.hedge(self.latencies, self.metrics),
            retry.retry(self.retry_budgets, self.metrics),
            service=backend_call,
        )

    async def close(self) -> None:
        await self.shadows.close()
        await asyncio.gather(*(a.close() for a in self.adapters.values()))


class Gateway:
    def __init__(self, config: config_pb2.GatewayConfig) -> None:
        self.config = config
        self.runtime = Runtime(config)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_server = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        # Room above the configured limit so oversized requests reach the validator and get a
        # message naming the limit; beyond twice the limit gRPC itself answers RESOURCE_EXHAUSTED.
        receive_limit = 2 * config.limits.max_request_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", receive_limit),
                ("grpc.max_send_message_length", max(receive_limit, 64 * 1024 * 1024)),
                # With SO_REUSEPORT a second gateway could silently share a busy port.
                ("grpc.so_reuseport", 0),
            ]
        )
        servicer = InferenceServicer(self.runtime, self.runtime.request_path())
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.runtime.readiness.servicer, self.server)
        reflection.enable_server_reflection(
            (
                OIP_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        address = config.listeners.data_plane
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen on {address} (listeners.data_plane): address in use?")
        if config.listeners.metrics != "off":
            self._metrics_server = self.runtime.metrics.serve(config.listeners.metrics)
            self.metrics_port = self._metrics_server.server_port
        await self.server.start()
        await self.runtime.readiness.start()
        host = address.rpartition(":")[0]
        log.info(
            "tensorgate %s serving Open Inference Protocol on %s:%d, metrics on %s",
            gateway.__version__,
            host,
            self.port,
            f"{host}:{self.metrics_port}" if self._metrics_server else "off",
        )

    async def shutdown(self) -> None:
        """Drain: report NOT_SERVING, keep serving for drain_delay, then refuse new calls and
        give in-flight ones shutdown_grace to finish."""
        if self._stopped.is_set():
            return
        life = self.config.lifecycle
        log.info("draining: readiness NOT_SERVING")
        await self.runtime.readiness.drain()
        await asyncio.sleep(seconds(life.drain_delay))
        grace = seconds(life.shutdown_grace)
        log.info("refusing new calls; waiting up to %.1fs for in-flight calls", grace)
        await self.server.stop(grace)
        await self.runtime.readiness.stop()
        await self.runtime.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: config_pb2.GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    gw = Gateway(config)
    await gw.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gw.shutdown()
