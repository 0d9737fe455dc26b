"""The config's checks of meaning: every problem found, each with its field path (config.py loads
and defaults the file, then runs `check`)."""

from __future__ import annotations

import logging
import pathlib
import re
import ssl
from dataclasses import dataclass

from adapters import registry
from gateway.addresses import address_problem, is_loopback, same_listener
from gateway.controlplane.smoke_checks import problems as smoke_problems
from gateway.dataplane.layers.access.checks import access_problems
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


_MODEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


_HEADER = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: invalid gateway config ({len(problems)} problem(s)):\n{lines}")


def _check_listeners(listeners: config_pb2.Listeners, problems: list[Problem]) -> None:
    seen: dict[str, str] = {}
    for field in ("data_plane", "metrics", "admin", "xds", "rest"):
        value = getattr(listeners, field)
        if field != "data_plane" and value == "off":
            continue
        reason = address_problem(value)
        if reason:
            problems.append(Problem(f"listeners.{field}", reason))
        elif value in seen and not value.endswith(":0"):
            problems.append(Problem(f"listeners.{field}", f"same address as {seen[value]}"))
        seen[value] = f"listeners.{field}"


def _admin_in_clear_on_network(config: config_pb2.GatewayConfig) -> str | None:
    """listeners.admin when it is a usable address that is not loopback and has no TLS."""
    address = config.listeners.admin
    if address in ("", "off") or address_problem(address):
        return None
    if config.admin.tls.cert_file or is_loopback(address.rpartition(":")[0]):
        return None
    return address


def _check_admin_transport(config: config_pb2.GatewayConfig, problems: list[Problem]) -> None:
    address = _admin_in_clear_on_network(config)
    if address is None or config.admin.insecure_plaintext_on_network:
        return
    problems.append(
        Problem(
            "listeners.admin",
            f"{address!r} is not a loopback address and the admin API has no TLS: bearer tokens "
            "would cross the network in clear. Set admin.tls (cert_file, key_file), or bind "
            "listeners.admin to 127.0.0.1, or, on a network you trust end to end, set "
            "admin.insecure_plaintext_on_network: true",
        )
    )


def warnings(config: config_pb2.GatewayConfig) -> list[str]:
    """Insecure choices a valid config makes on purpose, one sentence each, for the serving code
    to log at WARNING when it starts. Empty for a config that makes none."""
    found = []
    address = _admin_in_clear_on_network(config)
    if address is not None and config.admin.insecure_plaintext_on_network:
        found.append(
            f"listeners.admin {address!r} serves the admin API in PLAINTEXT on a non-loopback "
            "address (admin.insecure_plaintext_on_network: true): bearer tokens cross the network "
            "in clear; set admin.tls to encrypt them"
        )
    return found


def _check_backends(
    backends: list[config_pb2.Backend], problems: list[Problem]
) -> dict[str, config_pb2.Backend]:
    by_name: dict[str, config_pb2.Backend] = {}
    for i, backend in enumerate(backends):
        at = f"backends[{i}]"
        if not backend.name:
            problems.append(Problem(f"{at}.name", "required"))
        elif not _NAME.match(backend.name):
            problems.append(Problem(f"{at}.name", f"{backend.name!r} must match {_NAME.pattern}"))
        elif backend.name in by_name:
            problems.append(Problem(f"{at}.name", f"duplicate backend name {backend.name!r}"))
        else:
            by_name[backend.name] = backend
        if backend.kind == config_pb2.BACKEND_KIND_UNSPECIFIED:
            kinds = ", ".join(config_pb2.BackendKind.Name(k) for k in registry.KINDS)
            problems.append(Problem(f"{at}.kind", f"required ({kinds})"))
        problems.extend(Problem(*p) for p in registry.check_backend(backend, at))
        if not backend.address:
            problems.append(Problem(f"{at}.address", "required"))
        else:
            reason = address_problem(backend.address)
            if reason:
                problems.append(Problem(f"{at}.address", reason))
        rest_kinds = (config_pb2.BACKEND_KIND_TRITON, config_pb2.BACKEND_KIND_OIP)
        if backend.rest_address and address_problem(backend.rest_address):
            problems.append(Problem(f"{at}.rest_address", address_problem(backend.rest_address)))
        elif backend.rest_address and backend.kind not in rest_kinds:
            why = "only Triton and OIP backends serve KServe v2 REST (the REST listener translates)"
            problems.append(Problem(f"{at}.rest_address", why))
        if seconds(backend.per_try_timeout) <= 0:
            problems.append(Problem(f"{at}.per_try_timeout", "must be positive"))
        conn = backend.connection
        if conn.max_message_bytes < 0:
            problems.append(Problem(f"{at}.connection.max_message_bytes", "must not be negative"))
        for field in ("keepalive_time", "connect_timeout"):
            if conn.HasField(field) and seconds(getattr(conn, field)) <= 0:
                problems.append(Problem(f"{at}.connection.{field}", "must be positive"))
    return by_name


def _check_routes(
    routes: list[config_pb2.Route],
    backends: dict[str, config_pb2.Backend],
    problems: list[Problem],
) -> None:
    models: set[str] = set()
    models_by_name = {r.model for r in routes}
    for i, route in enumerate(routes):
        at = f"routes[{i}]"
        if not route.model:
            problems.append(Problem(f"{at}.model", "required"))
        elif not _MODEL.match(route.model):
            problems.append(Problem(f"{at}.model", f"{route.model!r} must match {_MODEL.pattern}"))
        elif route.model in models:
            problems.append(Problem(f"{at}.model", f"duplicate route for model {route.model!r}"))
        models.add(route.model)
        if not route.variants:
            problems.append(Problem(f"{at}.variants", "a route needs at least one variant"))
            continue
        names: set[str] = set()
        for j, variant in enumerate(route.variants):
            vat = f"{at}.variants[{j}]"
            if not variant.name:
                problems.append(Problem(f"{vat}.name", "required"))
            elif not _NAME.match(variant.name):
                problems.append(
                    Problem(f"{vat}.name", f"{variant.name!r} must match {_NAME.pattern}")
                )
            elif variant.name in names:
                problems.append(Problem(f"{vat}.name", f"duplicate variant {variant.name!r}"))
            names.add(variant.name)
            if not variant.backend:
                problems.append(Problem(f"{vat}.backend", "required"))
            elif variant.backend not in backends:
                known = ", ".join(sorted(backends)) or "none defined"
                problems.append(
                    Problem(
                        f"{vat}.backend",
                        f"unknown backend {variant.backend!r} (known: {known})",
                    )
                )
            if variant.version and not variant.version.isdigit():
                problems.append(
                    Problem(f"{vat}.version", f"{variant.version!r} must be a decimal number")
                )
            _check_backend_options(variant, vat, backends.get(variant.backend), route, problems)
            if variant.backend_version and not variant.backend_version.isdigit():
                problems.append(
                    Problem(
                        f"{vat}.backend_version",
                        f"{variant.backend_version!r} must be a decimal number",
                    )
                )
        _check_policy(route.policy, f"{at}.policy", route, models_by_name, problems)
        _check_schema(route.schema, f"{at}.schema", problems)
        if all(v.weight == 0 for v in route.variants):
            problems.append(
                Problem(
                    f"{at}.variants", "all weights are 0: at least one variant needs weight > 0"
                )
            )


_DATATYPES = {
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
}  # fmt: skip


def _check_policy(
    policy: config_pb2.RoutePolicy,
    at: str,
    route: config_pb2.Route | None,
    models: set[str],
    problems: list[Problem],
) -> None:
    """Checks a route's policy (route given) or defaults.route_policy (route None): each layer
    checks its own part (gateway/dataplane/layers/)."""
    from gateway.dataplane.layers.chain import check_policy

    problems.extend(Problem(*p) for p in check_policy(policy, at, route, models))


def _check_backend_options(variant, at: str, backend, route, problems: list[Problem]) -> None:
    """The variant's kind-specific options, checked by its backend's adapter."""
    if backend is not None:
        problems.extend(Problem(*p) for p in registry.check_variant(variant, backend, route, at))


def _check_schema(schema: config_pb2.ModelSchema, at: str, problems: list[Problem]) -> None:
    for field in ("inputs", "outputs"):
        names: set[str] = set()
        for k, tensor in enumerate(getattr(schema, field)):
            tat = f"{at}.{field}[{k}]"
            if not tensor.name:
                problems.append(Problem(f"{tat}.name", "required"))
            elif tensor.name in names:
                problems.append(Problem(f"{tat}.name", f"duplicate tensor {tensor.name!r}"))
            names.add(tensor.name)
            if tensor.datatype not in _DATATYPES | {"BF16"}:
                problems.append(
                    Problem(f"{tat}.datatype", f"{tensor.datatype!r} is not an OIP datatype")
                )
            if any(d < -1 for d in tensor.shape):
                problems.append(Problem(f"{tat}.shape", "dimensions are sizes >= 0 or -1 (any)"))


def _check_settings(config: config_pb2.GatewayConfig, problems: list[Problem]) -> None:
    _check_policy(
        config.defaults.route_policy,
        "defaults.route_policy",
        None,
        {r.model for r in config.routes},
        problems,
    )
    breakers = [("defaults.circuit_breaker", config.defaults.circuit_breaker)] + [
        (f"backends[{i}].circuit_breaker", b.circuit_breaker) for i, b in enumerate(config.backends)
    ]
    for at, cb in breakers:
        if not 0 <= cb.failure_ratio <= 1:
            problems.append(Problem(f"{at}.failure_ratio", "must be between 0 and 1"))
        for field in ("window", "open_duration"):
            if cb.HasField(field) and seconds(getattr(cb, field)) <= 0:
                problems.append(Problem(f"{at}.{field}", "must be positive"))
    if config.limits.max_request_bytes < 1024:
        problems.append(Problem("limits.max_request_bytes", "must be at least 1024"))
    if config.limits.max_in_flight_bytes < config.limits.max_request_bytes:
        problems.append(
            Problem("limits.max_in_flight_bytes", "must be at least limits.max_request_bytes")
        )
    if config.limits.max_request_bytes > 1024 * 1024 * 1024:
        problems.append(Problem("limits.max_request_bytes", "must be at most 1 GiB"))
    if config.limits.max_inputs < 1:
        problems.append(Problem("limits.max_inputs", "must be at least 1"))
    if seconds(config.defaults.per_try_timeout) <= 0:
        problems.append(Problem("defaults.per_try_timeout", "must be positive"))
    if not _HEADER.match(config.defaults.route_key_header):
        problems.append(
            Problem("defaults.route_key_header", "must be a lower-case gRPC metadata key")
        )
    elif config.defaults.route_key_header.endswith("-bin"):
        problems.append(Problem("defaults.route_key_header", "must not be a binary (-bin) key"))
    life = config.lifecycle
    for field in ("shutdown_grace", "drain_delay"):
        if seconds(getattr(life, field)) < 0:
            problems.append(Problem(f"lifecycle.{field}", "must not be negative"))
    if seconds(life.health_check_interval) <= 0:
        problems.append(Problem("lifecycle.health_check_interval", "must be positive"))


def _check_envoy(config: config_pb2.GatewayConfig, problems: list[Problem]) -> None:
    """Envoy mode (listeners.xds, envoy.*): addresses, and xDS kept on loopback unless mTLS or
    asked."""
    envoy = config.envoy
    if config.listeners.xds == "off":
        if envoy.ByteSize():
            problems.append(Problem("envoy", "set listeners.xds to serve Envoy resources"))
        return
    for field in ("listen", "gateway_address"):
        reason = address_problem(getattr(envoy, field))
        if reason:
            problems.append(Problem(f"envoy.{field}", reason))
    if envoy.rest_listen != "off":
        reason = address_problem(envoy.rest_listen)
        if not reason and envoy.rest_listen == envoy.listen:
            reason = "is envoy.listen too: Envoy's REST and gRPC listeners need ports of their own"
        if reason:
            problems.append(Problem("envoy.rest_listen", reason))
        if config.listeners.rest == "off":
            problems.append(
                Problem(
                    "envoy.rest_listen",
                    "needs listeners.rest: Envoy hands the REST calls it cannot serve itself to "
                    "the gateway's REST listener",
                )
            )
        elif address_problem(envoy.gateway_rest_address):
            problems.append(
                Problem("envoy.gateway_rest_address", address_problem(envoy.gateway_rest_address))
            )
    _check_gateway_tls(config, problems)
    mtls = _check_xds_tls(envoy.xds_tls, problems)
    xds = config.listeners.xds
    on_network = not address_problem(xds) and not is_loopback(xds.rpartition(":")[0])
    if on_network and not mtls and not envoy.xds_on_network:
        if envoy.xds_tls.cert_file:
            reason = (
                "envoy.xds_tls has no client_ca_file: TLS alone encrypts the route table, but "
                "anyone who can connect still reads it. Set envoy.xds_tls.client_ca_file (mTLS), "
                "or envoy.xds_on_network: true on a network you trust"
            )
        else:
            reason = (
                "the route table would be readable from the network. Bind it to 127.0.0.1 (an "
                "Envoy sidecar), set envoy.xds_tls (cert_file, key_file, client_ca_file: mTLS), "
                "or set envoy.xds_on_network: true on a network you trust"
            )
        problems.append(Problem("listeners.xds", f"{xds!r} is not a loopback address: {reason}"))
    if envoy.max_body_bytes < 1024:
        problems.append(Problem("envoy.max_body_bytes", "must be at least 1024"))
    models = {r.model for r in config.routes}
    for i, model in enumerate(envoy.gateway_routes):
        if model not in models:
            problems.append(Problem(f"envoy.gateway_routes[{i}]", f"no route for model {model!r}"))


def _check_gateway_tls(config: config_pb2.GatewayConfig, problems: list[Problem]) -> None:
    """envoy.gateway_tls matches whether the data plane Envoy reaches serves TLS."""
    envoy, listeners = config.envoy, config.listeners
    tls = envoy.gateway_tls
    if tls.server_name and not tls.ca_file:
        problems.append(Problem("envoy.gateway_tls.ca_file", "required with envoy.gateway_tls"))
    if not same_listener(envoy.gateway_address, listeners.data_plane):
        return  # another gateway's data plane: its TLS is not known here
    if listeners.HasField("data_plane_tls"):
        if not tls.ca_file:
            problems.append(
                Problem(
                    "envoy.gateway_tls",
                    f"envoy.gateway_address {envoy.gateway_address!r} is the data plane, which "
                    "serves TLS (listeners.data_plane_tls): set envoy.gateway_tls.ca_file (the CA "
                    "that signed the data plane's certificate, a path on the Envoy hosts), or "
                    "Envoy's calls to the gateway fail their handshake",
                )
            )
        if listeners.data_plane_tls.client_ca_file:
            problems.append(
                Problem(
                    "listeners.data_plane_tls.client_ca_file",
                    "Envoy mode: the data plane would require client certificates, and Envoy "
                    "presents none to the gateway (not supported)",
                )
            )
    elif tls.ca_file:
        problems.append(
            Problem(
                "envoy.gateway_tls",
                f"envoy.gateway_address {envoy.gateway_address!r} is the data plane, which serves "
                "plaintext (no listeners.data_plane_tls): drop envoy.gateway_tls or set "
                "data_plane_tls",
            )
        )


def _check_xds_tls(tls: config_pb2.Tls, problems: list[Problem]) -> bool:
    """envoy.xds_tls: certificate and key named together and readable now, so that a wrong path
    fails check-config rather than the gateway's start. True for complete mTLS."""
    if not tls.ByteSize():
        return False
    for field in ("cert_file", "key_file"):
        if not getattr(tls, field):
            problems.append(Problem(f"envoy.xds_tls.{field}", "required with envoy.xds_tls"))
    unusable = False
    for field in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, field)
        reason = pem_problem(path) if path else None
        if reason:
            problems.append(Problem(f"envoy.xds_tls.{field}", reason))
            unusable = True
    if tls.cert_file and tls.key_file and not unusable:
        # gRPC would only say "Failed to bind" for a key that is not the certificate's.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                tls.cert_file, tls.key_file, password=lambda: b""
            )
        except ssl.SSLError as err:
            problems.append(
                Problem(
                    "envoy.xds_tls.key_file",
                    f"not the (unencrypted) private key of cert_file: {err.reason or err}",
                )
            )
    return bool(tls.cert_file and tls.key_file and tls.client_ca_file)


def pem_problem(path: str) -> str | None:
    """Why `path` is not a readable PEM file, or None. Never quotes the content (keys)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        return f"cannot read {path}: {err.strerror}"
    if b"-----BEGIN " not in data:
        return f"{path} is not PEM (no -----BEGIN line)"
    return None


def _check_store(config: config_pb2.GatewayConfig, problems: list[Problem]) -> None:
    """store.etcd: endpoints as the store's channel will read them (the same function refuses
    them there: nothing about them fails `serve` that check-config passed), a prefix, TLS files
    named together, plaintext only on loopback."""
    if not config.store.HasField("etcd"):
        return
    etcd = config.store.etcd
    endpoints = list(etcd.endpoints)
    refused = _store_endpoint_problems(endpoints)
    for index, reason in refused:
        path = "store.etcd.endpoints" + (f"[{index}]" if index is not None else "")
        problems.append(Problem(path, reason))
    plaintext = not etcd.ca_file
    for i, endpoint in enumerate(endpoints):
        if any(index == i for index, _ in refused):
            continue
        if plaintext and not etcd.insecure_plaintext_on_network:
            host = endpoint.rpartition(":")[0]
            if not is_loopback(host):
                problems.append(
                    Problem(
                        f"store.etcd.endpoints[{i}]",
                        f"{endpoint!r} is not loopback and store.etcd.ca_file is unset: the "
                        "route table would cross the network in clear. Set ca_file (and "
                        "cert_file/key_file for client certificates), or "
                        "insecure_plaintext_on_network: true on a network you trust",
                    )
                )
    if not etcd.prefix.startswith("/") or etcd.prefix.endswith("/") or "//" in etcd.prefix:
        problems.append(
            Problem("store.etcd.prefix", f"{etcd.prefix!r}: use /a/b (leading /, no trailing /)")
        )
    if bool(etcd.cert_file) != bool(etcd.key_file):
        problems.append(Problem("store.etcd", "cert_file and key_file go together"))
    if etcd.cert_file and not etcd.ca_file:
        problems.append(Problem("store.etcd.ca_file", "required with a client certificate"))
    if seconds(etcd.timeout) <= 0 or seconds(etcd.timeout) > 60:
        problems.append(Problem("store.etcd.timeout", "must be within (0, 60s]"))
    if not 2 <= seconds(etcd.lease_ttl) <= 300:
        problems.append(Problem("store.etcd.lease_ttl", "must be within [2s, 300s]"))


def check(config: config_pb2.GatewayConfig) -> list[Problem]:
    """Every problem in a defaulted config, in the order of its fields."""
    problems: list[Problem] = []
    if not config.backends:
        problems.append(Problem("backends", "none declared: a gateway needs at least one backend "
                                "(name, kind, address)"))  # fmt: skip
    if not config.routes:
        problems.append(Problem("routes", "none declared: without a route every call is answered "
                                "NOT_FOUND; declare at least one (model, variants)"))  # fmt: skip
    _check_listeners(config.listeners, problems)
    _check_admin_transport(config, problems)
    backends = _check_backends(config.backends, problems)
    _check_routes(config.routes, backends, problems)
    problems.extend(Problem(path, reason) for path, reason in smoke_problems(config))
    _check_settings(config, problems)
    _check_envoy(config, problems)
    problems.extend(Problem(path, reason) for path, reason in access_problems(config))
    _check_store(config, problems)
    return problems


def _store_endpoint_problems(endpoints: list[str]) -> list[tuple[int | None, str]]:
    """store.etcd.endpoints as the etcd store reads them (controlplane/store/endpoints.py)."""
    from gateway.controlplane.store.endpoints import endpoint_problems

    return endpoint_problems(endpoints)
