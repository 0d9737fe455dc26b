"""Assemble and run a gateway: adapters, route table, request path, listeners, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import socket
import uuid
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

import gateway
from adapters.base import Adapter
from adapters.registry import build_adapter
from gateway.controlplane.store import open_store
from gateway.dataplane import memory, reflection
from gateway.dataplane.identity import Identifier
from gateway.dataplane.intake import Intake
from gateway.dataplane.layers import (
    access,
    breaker,
    bulkhead,
    dispatch,
    observe,
    resolve,
    validation,
)
from gateway.dataplane.layers.breaker import breaker_settings
from gateway.dataplane.layers.bulkhead import bulkhead_settings
from gateway.dataplane.layers.chain import route_layers
from gateway.dataplane.layers.contract import LayerEnv
from gateway.dataplane.layers.drift.monitor import DriftMonitor
from gateway.dataplane.layers.validation.specs import SpecCache
from gateway.dataplane.pipeline import InferService, compose
from gateway.dataplane.plane import DataPlane
from gateway.dataplane.routing import RouteTable
from gateway.dataplane.servicer import InferenceServicer
from gateway.durations import seconds
from gateway.observability import logs, tracing
from gateway.observability.health import Readiness
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.stats import RecentStats
from tensorgate.config.v1 import config_pb2

# Set in the environment of `serve --workers` processes: they share the file store.
WORKER_ENV = "TENSORGATE_WORKER"

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
        self.metrics.served_weights(config.routes)
        self.readiness = Readiness(
            lambda: self.adapters,
            lambda: self.table,
            self.metrics,
            seconds(config.lifecycle.health_check_interval),
            all_routes=config.lifecycle.readiness == config_pb2.READINESS_ALL_ROUTES,
        )
        self.recent = RecentStats()
        self.breakers: dict[str, breaker.BackendBreaker] = {}
        self.bulkheads: dict[str, bulkhead.Bulkhead] = {}
        breaker_metrics = breaker.BreakerMetrics(self.metrics.registry)
        bulkhead_metrics = bulkhead.BulkheadMetrics(self.metrics.registry)
        for b in config.backends:
            breaking = breaker_settings(b, config.defaults.circuit_breaker)
            if not breaking.disabled:
                self.breakers[b.name] = breaker.BackendBreaker(b.name, breaking, breaker_metrics)
            limiting = bulkhead_settings(b, config.defaults.bulkhead)
            if not limiting.disabled:
                self.bulkheads[b.name] = bulkhead.Bulkhead(b.name, limiting, bulkhead_metrics)
        adapters = lambda: self.adapters  # noqa: E731 - read per call, so swaps take effect
        # What a call to one variant goes through, below the per-route layers (and what a
        # shadow's mirror takes): the backend's breaker and bulkhead, then its adapter.
        self.backend_call: InferService = compose(
            breaker.breaker(lambda: self.breakers),
            bulkhead.bulkhead(lambda: self.bulkheads),
            service=dispatch.dispatch(adapters, self.per_try_timeout.__getitem__, self.metrics),
        )
        # Model descriptions, shared by the schema layer and the stream relay (decoupled or not).
        self.specs = SpecCache()
        # Caller identities (read by the data plane's transport), authorization, rate limits.
        self.identifier = Identifier(config.callers)
        self.gate = access.Gate(config.callers, self.metrics.registry)
        env = LayerEnv(
            self.metrics.registry,
            table=lambda: self.table,
            adapters=adapters,
            backend_call=lambda: self.backend_call,
            per_try_timeout=self.per_try_timeout.__getitem__,
            specs=self.specs,
            drift=DriftMonitor(self.metrics.registry),
            down=lambda: self.readiness.down,
            route_service=self.compiled_route,
            may_call=self.gate.may_call,
        )
        self.route_layers = route_layers()
        self.layer_state = {layer.name: layer.state(env) for layer in self.route_layers}

    def apply(self, config: config_pb2.GatewayConfig) -> None:
        """Swap in a validated config whose backends are unchanged (an admin route change). The
        route table is replaced in one assignment, so each call sees the old or the new one."""
        self.config = config
        self.table = RouteTable(config.routes, config.defaults.route_policy)
        self.readiness.table_changed()
        self.metrics.served_weights(config.routes)

    def route_service(self, plan) -> InferService:
        """One route's chain of layers (gateway.dataplane.layers.route_layers(), outermost first),
        with the layers that are off for this route left out, around the backend call."""
        service = self.backend_call
        for layer in reversed(self.route_layers):
            settings = plan.settings[layer.name]
            if layer.active(settings):
                service = layer.build(settings, self.layer_state[layer.name], plan)(service)
        return service

    def compiled_route(self, plan) -> InferService:
        """The route's chain, compiled on its first call and kept on the route (a new route
        table compiles afresh)."""
        service = plan.service
        if service is None:
            service = plan.service = self.route_service(plan)
        return service

    def request_path(self) -> InferService:
        """The ModelInfer path, outermost layer first: the layers every call passes, then the
        route's own compiled chain (`route_service`)."""
        limits = self.config.limits
        # Who may call what, and how much: before routing, so a refused caller learns nothing
        # of the route (layers/access); not there at all when no callers are configured.
        gate = (access.access(self.gate, lambda: self.table),) if self.gate.enabled else ()
        return compose(
            observe.observe(
                self.metrics, lambda model: self.table.get(model) is not None, self.recent
            ),
            validation.structure(max_inputs=limits.max_inputs),
            *gate,
            service=resolve.route(
                lambda: self.table, lambda: self.readiness.down, self.compiled_route
            ),
        )

    async def close(self) -> None:
        await self.gate.close()
        for shared in self.layer_state.values():
            close = getattr(shared, "close", None)
            if close is not None:
                await close()
        await asyncio.gather(*(a.close() for a in self.adapters.values()))


def _read(path: str, field: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as err:
        raise OSError(f"{field}: cannot read {path}: {err.strerror}") from None


def server_credentials(tls: config_pb2.Tls, field: str) -> grpc.ServerCredentials:
    key = _read(tls.key_file, f"{field}.key_file")
    cert = _read(tls.cert_file, f"{field}.cert_file")
    if tls.client_ca_file:
        ca = _read(tls.client_ca_file, f"{field}.client_ca_file")
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
    return grpc.ssl_server_credentials([(key, cert)])


def _bind(server: grpc.aio.Server, address: str, field: str, tls: config_pb2.Tls | None) -> int:
    try:
        if tls is not None and tls.cert_file:
            port = server.add_secure_port(
                address, server_credentials(tls, field.replace("listeners.", ""))
            )
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(f"cannot listen on {address} ({field}): address in use?")
    return port


class Gateway:
    def __init__(
        self,
        config: config_pb2.GatewayConfig,
        state_dir: str = ".tensorgate-state",
        *,
        listeners: config_pb2.Listeners | None = None,
        reuse_port: bool = False,
        source: str = "",
    ) -> None:
        """`source`: the config file's name, for the config-drift warning.
        `listeners`: what this process binds, when not config.listeners (a worker of
        `serve --workers`: gateway/workers.py); the Runtime is built from `config` either way.
        `reuse_port`: bind the data plane with SO_REUSEPORT, to share its port with the other
        workers."""
        self.config = config
        self.listeners = listeners if listeners is not None else config.listeners
        self.reuse_port = reuse_port
        self.source = source
        self.runtime = Runtime(config)
        self.server: grpc.aio.Server | None = None
        self.admin_server: grpc.aio.Server | None = None
        self.admin_front = None  # the admin listener's TCP front (admin/front.py), without TLS
        self.port = 0
        self.rest = None  # the KServe v2 REST listener (listeners.rest): gateway/dataplane/rest/
        self.jobs = None  # asynchronous inference (config.jobs): gateway/jobs/
        self.rest_port = 0
        self.admin_port = 0
        self.metrics_port = 0
        self._metrics_server = None
        self._state_dir = config.admin.state_dir or state_dir
        self._rollouts = None
        self._record_boot = False
        self.route_manager = None
        self.store = None
        self._follow: asyncio.Task | None = None
        self.control_plane = None  # Envoy mode (listeners.xds): gateway/controlplane/envoy/
        self._stopped = asyncio.Event()
        self.intake = Intake(
            self.runtime.metrics,
            max_request_bytes=config.limits.max_request_bytes,
            max_in_flight_bytes=config.limits.max_in_flight_bytes,
        )

    async def _open_store(self) -> None:
        """The revision store and what follows it: the route table (booted from the store's
        latest revision), drains, and the rollouts (driven here when the admin API is)."""
        from gateway.controlplane.admin.rollout import RolloutController
        from gateway.controlplane.admin.rollout_smoke import SmokeGate
        from gateway.controlplane.admin.routes import RouteManager

        config = self.config
        replica = config.store.etcd.replica or f"{socket.gethostname()}-{os.getpid()}"
        self.store = open_store(config, self._state_dir, replica)
        shared = config.store.HasField("etcd") or bool(os.environ.get(WORKER_ENV))
        manager = RouteManager(self.runtime, self.store, self.runtime.metrics.registry)
        manager.on_drains.append(self.runtime.readiness.use_drained)
        # Without an admin API nor a shared store nothing can change the table: the boot file
        # is served as it is and nothing is written (a read-only file system is fine). Else an
        # empty store gets the file's routes as revision 1 once every listener is bound
        # (`start`): a serve that fails to start writes nothing.
        self._record_boot = config.listeners.admin != "off" or shared
        await manager.boot(record=False, source=self.source)
        await manager.sync()  # drains as stored
        self.route_manager = manager
        lease_ttl = seconds(config.store.etcd.lease_ttl) if config.store.HasField("etcd") else 10
        self._rollouts = RolloutController(
            manager, self.store, self.runtime.recent, replica, uuid.uuid4().hex,
            lease_ttl=lease_ttl, metrics=self.runtime.metrics, smoke=SmokeGate(self.runtime),
        )  # fmt: skip
        self._rollouts.run(drive=self.listeners.admin != "off", publish=shared)
        self._follow = asyncio.create_task(manager.follow(), name="store-follow")

    async def start(self) -> None:
        config = self.config
        listeners = self.listeners
        await self._open_store()
        # Room above the configured limit so oversized requests reach the validator and get a
        # message naming the limit; beyond twice the limit gRPC itself answers RESOURCE_EXHAUSTED.
        receive_limit = 2 * config.limits.max_request_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", receive_limit),
                ("grpc.max_send_message_length", max(receive_limit, 64 * 1024 * 1024)),
                # With SO_REUSEPORT a second gateway could silently share a busy port: only the
                # workers of one `serve --workers` share theirs (gateway/workers.py).
                ("grpc.so_reuseport", int(self.reuse_port)),
            ]
        )
        plane = DataPlane(self.runtime, self.runtime.request_path())
        servicer = InferenceServicer(plane)
        # Every service is registered through the intake: undecodable bodies, the in-flight
        # byte budget and the shutdown gate are handled before any handler
        # (gateway/dataplane/intake.py).
        registrar = self.intake.register(self.server)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.runtime.readiness.servicer, registrar)
        services = [
            OIP_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        if config.HasField("jobs"):
            from gateway.jobs import JobsService

            self.jobs = JobsService(
                config.jobs, plane, self.runtime.metrics.registry, self._state_dir
            )
            self.jobs.register(registrar)
            services.append(JobsService.SERVICE_NAME)
        reflection.enable(tuple(services), registrar)
        address = listeners.data_plane
        tls = listeners.data_plane_tls if listeners.HasField("data_plane_tls") else None
        self.port = _bind(self.server, address, "listeners.data_plane", tls)
        if listeners.rest != "off":
            from gateway.dataplane.rest import rest_server

            self.rest = rest_server(plane, self.intake, listeners.rest, tls, self.reuse_port,
                                    jobs=self.jobs)  # fmt: skip
            self.rest_port = await self.rest.start()
        if listeners.admin != "off":
            self.admin_server = self._admin_server()
            if self.admin_front is not None:
                self.admin_port = await self.admin_front.bind(listeners.admin)
        if listeners.metrics != "off":
            self._metrics_server = self.runtime.metrics.serve(listeners.metrics)
            self.metrics_port = self._metrics_server.server_port
        if self._record_boot:
            await self.route_manager.record_boot()
        await self.server.start()
        if self.admin_server is not None:
            await self.admin_server.start()
        await self.runtime.readiness.start()
        if self.jobs is not None:
            await self.jobs.start()
        if listeners.xds != "off":
            from gateway.controlplane.envoy.control import ControlPlane

            self.control_plane = ControlPlane(
                self.runtime.metrics.registry, lambda: self.runtime.readiness.down
            )
            credentials = None
            if config.envoy.xds_tls.cert_file:
                credentials = server_credentials(config.envoy.xds_tls, "envoy.xds_tls")
            await self.control_plane.start(listeners.xds, self.runtime.config, credentials)
            if self.route_manager is not None:
                self.route_manager.on_change.append(self.control_plane.update)
        host = address.rpartition(":")[0]
        if self.rest is not None:
            log.info("KServe v2 REST on %s:%d", listeners.rest.rpartition(":")[0], self.rest_port)
        log.info(
            "tensorgate %s serving Open Inference Protocol on %s:%d, metrics on %s; "
            "route table revision %d from the revision store (%s), store identity %s",
            gateway.__version__,
            host,
            self.port,
            f"{host}:{self.metrics_port}" if self._metrics_server else "off",
            self.route_manager.revision.number,
            self.store.description,
            self._rollouts.identity,
        )

    def _admin_server(self) -> grpc.aio.Server:
        """The admin API on its own listener, behind authentication (reflection included)."""
        from gateway.controlplane.admin import auth, service
        from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc

        admin = self.config.admin
        try:
            tokens = auth.load_tokens(admin.tokens_file, admin.tokens_env)
        except auth.AuthConfigError as err:
            raise OSError(str(err)) from None
        if not tokens and not admin.tls.client_ca_file:
            raise OSError(
                "listeners.admin is set but no credentials are configured: set admin.tokens_file, "
                "admin.tokens_env or admin.tls.client_ca_file (or listeners.admin: off)"
            )
        manager = self.route_manager
        authenticator = auth.Authenticator(tokens, admin.client_cert_role)
        server = grpc.aio.server(
            interceptors=[auth.AuthInterceptor(authenticator, admin.tokens_env)],
            options=[("grpc.so_reuseport", 0)],
        )
        registrar = self.intake.register(server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            service.AdminServicer(self.runtime, manager, self._rollouts), registrar
        )
        reflection.enable(
            (
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
                reflection.SERVICE_NAME,
            ),
            registrar,
        )
        tls = admin.tls if admin.HasField("tls") else None
        if tls is not None and tls.cert_file:
            self.admin_port = _bind(server, self.listeners.admin, "listeners.admin", tls)
        else:  # the status page shares the port: gRPC is relayed by the front (admin/front.py)
            from gateway.controlplane.admin import front

            self.admin_front = front.for_admin(self.runtime, manager, self._rollouts, authenticator)
            _bind(server, f"unix:{self.admin_front.socket}", "listeners.admin", None)
        return server

    async def shutdown(self) -> None:
        """Drain: report NOT_SERVING, keep serving for drain_delay, then answer new calls
        UNAVAILABLE and give in-flight ones shutdown_grace to finish.

        The server is stopped only once admitted calls are done and arrivals have dried up:
        grpcio's stop cancels calls that reached the transport but not yet a handler, and a
        CANCELLED caller does not retry. Until then every call reaches a handler, which either
        runs it (accepted before the gate closed) or answers UNAVAILABLE (retryable)."""
        if self._stopped.is_set():
            return
        life = self.config.lifecycle
        log.info("draining: readiness NOT_SERVING")
        await self.runtime.readiness.drain()
        await asyncio.sleep(seconds(life.drain_delay))
        grace = seconds(life.shutdown_grace)
        log.info("refusing new calls; waiting up to %.1fs for in-flight calls", grace)
        started = asyncio.get_running_loop().time()
        self.intake.close()
        if self.admin_server is not None:
            await self.admin_server.stop(0)
        if self.admin_front is not None:
            await self.admin_front.close()
        if self._rollouts is not None:
            await self._rollouts.close()
        if self._follow is not None:
            self._follow.cancel()
        await self.intake.quiesce(grace)
        if self.control_plane is not None:
            await self.control_plane.stop()  # Envoys keep serving their last config
        left = grace - (asyncio.get_running_loop().time() - started)
        if self.jobs is not None:
            await self.jobs.close(max(left, 0.0))
        if self.rest is not None:
            await self.rest.stop(max(left, 0.1))
        await self.server.stop(max(left, 0.0))
        await self.runtime.readiness.stop()
        await self.runtime.close()
        if self.store is not None:
            await self.store.close()
        tracing.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(
    config: config_pb2.GatewayConfig,
    state_dir: str = ".tensorgate-state",
    *,
    listeners: config_pb2.Listeners | None = None,
    reuse_port: bool = False,
    started: Callable[[Gateway], None] | None = None,
    source: str = "",
) -> None:
    """Run until SIGTERM or SIGINT, then drain and return. `listeners` and `reuse_port` as in
    Gateway; `started(gateway)` runs once it serves and handles the signals (a worker of
    `serve --workers` reports its ports: gateway/workers.py)."""
    memory.return_large_buffers_to_os()
    logs.setup(config.observability.logging, logging.getLevelName(logging.getLogger().level))
    tracing.configure(config.observability.tracing)
    gw = Gateway(config, state_dir, listeners=listeners, reuse_port=reuse_port, source=source)
    await gw.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started(gw)
    await stop.wait()
    await gw.shutdown()
