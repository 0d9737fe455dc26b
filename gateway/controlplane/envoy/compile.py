"""GatewayConfig -> Envoy resources (listener, route configuration, clusters, endpoints).

Pure: the same config gives the same resources, byte for byte, so a push is skipped when nothing
changed and versions are content hashes. No I/O, no clock.

Each route takes one of two paths, decided here (`decide`) and printed by `check-config`:

- **envoy**: Envoy answers it alone. Every variant is a cluster `tg|<model>|<variant>`; the route
  is a weighted_clusters action over them (sticky keys hash the route-key header), with the
  route's retries, timeouts, mirror (shadow) and fallback (an aggregate cluster walked by retry
  priorities). Breakers are outlier detection on the variant's cluster, bulkheads its
  circuit_breakers. A per-cluster upstream Lua filter renames the model for the backend, shows
  the public name in the answer and adds the x-tensorgate-variant / -backend trailers.
- **gateway**: the Python gateway answers it (Envoy forwards to it as the cluster
  `tensorgate_gateway`): whatever Envoy cannot express (backend translation, static answers,
  schema validation, hedging, shadow comparison, ...). Unknown models and versions and every RPC
  other than ModelInfer (metadata, readiness) go there too, so callers get the gateway's answers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import pathlib
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.runtime.v3 import rtds_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, message
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from gateway.dataplane.components import COMPONENTS
from gateway.dataplane.layers.breaker import breaker_settings
from gateway.dataplane.layers.bulkhead import bulkhead_settings
from gateway.dataplane.layers.chain import route_layers, route_settings
from gateway.dataplane.layers.retry import ENVOY_RETRY_ON
from gateway.dataplane.routing import BACKEND_TRAILER, VARIANT_TRAILER
from tensorgate.config.v1 import config_pb2

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
TYPES = (CLUSTER, ENDPOINT, RUNTIME, LISTENER, ROUTE)  # the order pushes go out in

# Variant weights live in an RTDS runtime layer, not in the routes: each weighted route names
# its runtime keys (runtime_key_prefix) and Envoy reads the weights per request. A weight
# change, rollout step, drain or probe result is then one small RTDS push instead of the whole
# route table (30,000 routes at 10,000 models: 9.5 MB, seconds for Envoy to rebuild).
WEIGHTS_LAYER = "tensorgate_weights"

LISTENER_NAME = "tensorgate"
ROUTE_NAME = "tensorgate"
GATEWAY_CLUSTER = "tensorgate_gateway"
VARIANT_HEADER = VARIANT_TRAILER  # the same trailers as the Python data plane
BACKEND_HEADER = BACKEND_TRAILER
# Set by the listener's Lua filter (model.lua) on ModelInfer calls from the body, always
# replacing a caller's: `model@version` or `model`, the key of the route table's match table.
ROUTE_HEADER = "x-tensorgate-route"

_LUA = pathlib.Path(__file__).parent / "lua"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HEADER_MUTATION = "envoy.filters.http.header_mutation"
_UNLIMITED = 1_000_000


@dataclass(frozen=True)
class Decision:
    """Which data plane answers a route, and why."""

    model: str
    path: str  # "envoy" or "gateway"
    reasons: tuple[str, ...] = ()  # why the gateway (path "gateway"), or notes (path "envoy")


@dataclass
class Resources:
    """Envoy resources by type URL, each a {name: message} dict, and the per-route decisions."""

    by_type: dict[str, dict[str, message.Message]] = field(default_factory=dict)
    decisions: tuple[Decision, ...] = ()

    def version(self, type_url: str) -> str:
        """A content hash of one type's resources: equal resources, equal version."""
        return content_version(self.by_type.get(type_url, {}))

    def cluster_names_referenced(self) -> set[str]:
        """Clusters the route configuration names (what must exist before it is pushed)."""
        names: set[str] = set()
        for config in self.by_type.get(ROUTE, {}).values():
            for route in routes_of(config):
                action = route.route
                if action.cluster:
                    names.add(action.cluster)
                names.update(c.name for c in action.weighted_clusters.clusters)
                names.update(m.cluster for m in action.request_mirror_policies)
        return names


_versions: dict[tuple, tuple[dict, str]] = {}


def content_version(resources: dict[str, message.Message]) -> str:
    """A content hash of {name: resource}. Remembered for the last few dicts (by the identity
    of their resources, which are never changed once compiled): the ADS server asks for the
    version of a 9.5 MB route table on every ACK, and hashing it costs ~50 ms."""
    key = tuple(sorted((name, id(r)) for name, r in resources.items()))
    hit = _versions.get(key)
    if hit is not None:
        return hit[1]
    digest = hashlib.sha256()
    for name, resource in sorted(resources.items()):
        digest.update(name.encode())
        digest.update(resource.SerializeToString(deterministic=True))
    version = digest.hexdigest()[:16]
    if len(_versions) >= 32:
        _versions.pop(next(iter(_versions)))
    _versions[key] = (tuple(resources.values()), version)  # held: their ids stay theirs
    return version


def variant_cluster(model: str, variant: str) -> str:
    return f"tg|{model}|{variant}"


def aggregate_cluster(model: str, variant: str) -> str:
    return f"tga|{model}|{variant}"


def _stat_name(name: str) -> str:
    # Envoy splits stat names at dots; model and variant names may contain them.
    return name.replace(".", "_")


# --- which path --------------------------------------------------------------------------------


def decide(config: config_pb2.GatewayConfig) -> tuple[Decision, ...]:
    """Per route: can Envoy serve it alone? The reasons name each feature that needs Python."""
    backends = {b.name: b for b in config.backends}
    forced = set(config.envoy.gateway_routes)
    return tuple(decide_route(route, config, backends, forced) for route in config.routes)


def decide_route(route, config, backends, forced) -> Decision:
    """Derived from the declarations of every component (gateway/dataplane/components.py) and of
    every layer active on the route (each RouteLayer's `envoy`): nothing here names a policy."""
    declared = [component.envoy(route, backends) for component in COMPONENTS]
    settings = route_settings(route, config.defaults.route_policy)
    for layer in route_layers():
        layer_settings = settings[layer.name]
        if layer.active(layer_settings):
            declared.append(layer.envoy(layer_settings, route))
    reasons = ["listed in envoy.gateway_routes"] if route.model in forced else []
    reasons += [reason for d in declared for reason in d.hand_over]
    if reasons:
        return Decision(route.model, "gateway", tuple(reasons))
    return Decision(route.model, "envoy", tuple(note for d in declared for note in d.notes))


# --- small builders ----------------------------------------------------------------------------


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _any(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket(address: str) -> address_pb2.Address:
    host, port = _split(address)
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _load_assignment(name: str, address: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_socket(address))
                    )
                ]
            )
        ],
    )


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _http2(stream_window: int = 1 << 20) -> protocol_pb2.Http2ProtocolOptions:
    return protocol_pb2.Http2ProtocolOptions(
        max_concurrent_streams={"value": 1024},
        initial_stream_window_size={"value": stream_window},
        initial_connection_window_size={"value": 1 << 24},
    )


def _lua_string(value: str) -> str:
    return '"' + "".join(c if c.isalnum() or c in "_.-" else f"\\{ord(c):03d}" for c in value) + '"'


def lua_source(name: str) -> str:
    return (_LUA / name).read_text(encoding="utf-8")


def renamed(route: config_pb2.Route, variant: config_pb2.Variant) -> bool:
    """Must calls to this variant's cluster be rewritten to the backend's model and version?
    Yes unless the backend knows it by the public name and with no version: a variant with a
    version also takes the route's unpinned calls (they carry no version, and the backend would
    run its own default version), so its version is always written for the backend."""
    return variant.backend_model != route.model or bool(variant.backend_version or variant.version)


def variant_lua(route: config_pb2.Route, variant: config_pb2.Variant) -> str | None:
    """The upstream filter of a renamed variant's cluster: its names as constants, then the code.
    None for a variant the backend knows by its public name and version (no filter, no buffering:
    each Lua filter is one Lua state per worker, so only the clusters that need one get one)."""
    if not renamed(route, variant):
        return None
    constants = {
        "model": route.model,
        "version": variant.version,
        "variant": variant.name,
        "backend": variant.backend,
        "backend_model": variant.backend_model,
        "backend_version": variant.backend_version,
    }
    fields = ", ".join(f"{k} = {_lua_string(v)}" for k, v in constants.items())
    if variant.backend_model == route.model and variant.backend_version == variant.version:
        # Public names are the backend's: only unpinned calls (no version) need the rewrite, and
        # answers never do. The filter knows a pinned call by the route key the listener set.
        fields += f", pinned_key = {_lua_string(f'{route.model}@{variant.version}')}"
    prelude = f"local V = {{{fields}}}\n"
    return prelude + lua_source("variant.lua")


def _cluster(
    name: str,
    address: str,
    *,
    upstream_lua: str | None = None,
    connect_timeout: float = 5.0,
    buffer_limit: int = 0,
    stat_name: str = "",
    eds_name: str = "",
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment | None]:
    """An HTTP/2 cluster of one address: EDS for an IP (endpoints pushed over ADS, one
    ClusterLoadAssignment per backend, `eds_name`, shared by every variant cluster on it: a few
    EDS resources however many routes), STRICT_DNS for a host name (Envoy resolves it)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        alt_stat_name=_stat_name(stat_name or name),
        connect_timeout=_duration(connect_timeout),
    )
    if buffer_limit:
        # What the upstream filter may buffer to rename a request or an answer.
        cluster.per_connection_buffer_limit_bytes.value = buffer_limit
    assignment = _load_assignment(eds_name or name, address)
    endpoints = None
    if _is_ip(_split(address)[0]):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(_ads_source())
        if eds_name:
            cluster.eds_cluster_config.service_name = eds_name
        endpoints = assignment
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(assignment)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.CopyFrom(_http2())
    if upstream_lua is not None:
        _add_upstream_lua(options, upstream_lua)
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(_any(options))
    # An ejected (breaker-open) variant must get no calls: never "panic" back onto it.
    cluster.common_lb_config.healthy_panic_threshold.value = 0
    return cluster, endpoints


def _add_upstream_lua(options: http_protocol_options_pb2.HttpProtocolOptions, lua: str) -> None:
    options.http_filters.add(
        name="envoy.filters.http.lua",
        typed_config=_any(lua_pb2.Lua(default_source_code={"inline_string": lua})),
    )
    options.http_filters.add(
        name="envoy.filters.http.upstream_codec",
        typed_config=_any(upstream_codec_pb2.UpstreamCodec()),
    )


def _breaker(cluster: cluster_pb2.Cluster, backend: config_pb2.Backend, config) -> None:
    """The backend's breaker as outlier detection and its bulkhead as circuit_breakers."""
    b = breaker_settings(backend, config.defaults.circuit_breaker)
    if not b.disabled:
        od = outlier_detection_pb2.OutlierDetection()
        od.consecutive_5xx.value = b.consecutive_failures
        od.enforcing_consecutive_5xx.value = 100
        od.enforcing_consecutive_gateway_failure.value = 0
        od.enforcing_success_rate.value = 0
        od.base_ejection_time.CopyFrom(_duration(b.open_duration))
        od.max_ejection_time.CopyFrom(_duration(max(b.open_duration, 300.0)))
        od.max_ejection_percent.value = 100
        od.interval.CopyFrom(_duration(min(b.window, 1.0)))
        if b.failure_ratio > 0:
            od.failure_percentage_threshold.value = round(b.failure_ratio * 100)
            od.enforcing_failure_percentage.value = 100
            od.failure_percentage_minimum_hosts.value = 1
            od.failure_percentage_request_volume.value = b.minimum_calls
        cluster.outlier_detection.CopyFrom(od)
    limit = bulkhead_settings(backend, config.defaults.bulkhead)
    threshold = cluster.circuit_breakers.thresholds.add()
    threshold.priority = base_pb2.DEFAULT
    threshold.track_remaining = True
    if limit.disabled:
        threshold.max_requests.value = _UNLIMITED
        threshold.max_pending_requests.value = _UNLIMITED
    else:
        threshold.max_requests.value = limit.max_concurrency
        # HTTP/2 queues nothing per stream; "pending" is waiting for a connection, which the first
        # calls on a new connection always do, so it is never below the concurrency.
        threshold.max_pending_requests.value = max(limit.max_queue, limit.max_concurrency)


# --- compile -----------------------------------------------------------------------------------


def compile_config(
    config: config_pb2.GatewayConfig, down: frozenset[tuple[str, str, str]] = frozenset()
) -> Resources:
    """The Envoy resources for a validated (defaulted) config with listeners.xds set. `down`:
    (backend, backend model, backend version) the gateway's readiness says cannot answer (probed
    down, or their backend drained): as on the Python path, a route's calls avoid them while a
    sibling variant can answer."""
    return Compiler().compile(config, down)


@dataclass
class _Compiled:
    decision: Decision
    clusters: dict
    endpoints: dict
    routes: list  # its Envoy routes, each named by its key in the match table
    picks: list  # [(route name, pinned, [(cluster, variant name)])] of its weighted routes


class Compiler:
    """compile_config with a cache of each route's resources, keyed by the route's shape (its
    bytes with every weight reduced to 0 or 1): an admin change to one route of 10,000 rebuilds
    that route only, and a weight change rebuilds nothing but the weights layer. Everything else
    a route's resources depend on (backends, defaults, the envoy section) empties the cache."""

    def __init__(self) -> None:
        self._context = b""
        self._cache: dict[bytes, _Compiled] = {}
        self._by_model: dict[str, _Compiled] = {}
        self._assembled: tuple[tuple[int, ...], Resources] | None = None

    def compile(
        self,
        config: config_pb2.GatewayConfig,
        down: frozenset[tuple[str, str, str]] = frozenset(),
    ) -> Resources:
        context = config_pb2.GatewayConfig()
        context.CopyFrom(config)
        context.ClearField("routes")
        key = context.SerializeToString(deterministic=True)
        if key != self._context:
            self._context, self._cache, self._by_model, self._assembled = key, {}, {}, None
        backends = {b.name: b for b in config.backends}
        forced = set(config.envoy.gateway_routes)
        cache: dict[bytes, _Compiled] = {}
        by_model: dict[str, _Compiled] = {}
        used: list[_Compiled] = []
        weights: dict[str, float] = {}
        decisions = []
        for route in sorted(config.routes, key=lambda r: r.model):
            shape = _shape(route)
            route_key = shape.SerializeToString(deterministic=True)
            compiled = self._cache.get(route_key) or cache.get(route_key)
            if compiled is None:
                compiled = _compile_route(shape, config, backends, forced)
                previous = self._by_model.get(route.model)
                if previous is not None and _same(previous, compiled):
                    compiled = previous  # same resources: keep the assembled table as it is
            cache[route_key] = compiled
            by_model[route.model] = compiled
            used.append(compiled)
            decisions.append(compiled.decision)
            if compiled.picks:
                weights.update(_weights(route, compiled.picks, _down(route, down)))
        self._cache, self._by_model = cache, by_model
        order = {r.model: i for i, r in enumerate(config.routes)}
        decisions.sort(key=lambda d: order[d.model])
        identity = tuple(id(c) for c in used)
        if self._assembled is not None and self._assembled[0] == identity:
            structure = self._assembled[1].by_type  # same routes: same messages, same versions
        else:
            structure = _assemble(config, used).by_type
        layer = rtds_pb2.Runtime(name=WEIGHTS_LAYER)
        layer.layer.update(weights)
        resources = Resources(
            {
                CLUSTER: structure[CLUSTER],
                ENDPOINT: structure[ENDPOINT],
                RUNTIME: {WEIGHTS_LAYER: layer},
                LISTENER: structure[LISTENER],
                ROUTE: structure[ROUTE],
            },
            tuple(decisions),
        )
        self._assembled = (identity, resources)
        return resources


def _same(a: _Compiled, b: _Compiled) -> bool:
    def serialized(c: _Compiled):
        return (
            [m.SerializeToString(deterministic=True) for m in c.routes],
            {n: m.SerializeToString(deterministic=True) for n, m in c.clusters.items()},
            {n: m.SerializeToString(deterministic=True) for n, m in c.endpoints.items()},
        )

    return a.decision == b.decision and a.picks == b.picks and serialized(a) == serialized(b)


def _shape(route: config_pb2.Route) -> config_pb2.Route:
    """The route with each weight reduced to whether it takes unpinned traffic: what decides
    its Envoy routes and clusters (the weights themselves go to the runtime layer)."""
    if all(v.weight in (0, 1) for v in route.variants):
        return route
    shape = config_pb2.Route()
    shape.CopyFrom(route)
    for variant in shape.variants:
        variant.weight = min(variant.weight, 1)
    return shape


def _down(route: config_pb2.Route, down) -> frozenset[str]:
    """Names of the route's variants whose (backend, model, version) is down."""
    if not down:
        return frozenset()
    return frozenset(
        v.name for v in route.variants if (v.backend, v.backend_model, v.backend_version) in down
    )


def runtime_key(route_name: str, cluster: str) -> str:
    return f"tgw.{route_name}.{cluster}"


def _weights(route: config_pb2.Route, picks, avoided: frozenset[str]) -> dict[str, float]:
    """The runtime layer's entries for one route's weighted routes, as the Python path picks:
    unpinned calls go to the variants with a weight; a pinned version to its variants by weight
    (evenly when none has one). Variants in `avoided` (down or drained) get 0 while another
    candidate of the same pick can answer."""
    variants = {v.name: v for v in route.variants}
    out = {}
    for route_name, pinned, members in picks:
        weight = {name: variants[name].weight for _, name in members}
        if pinned and not any(weight.values()):
            weight = dict.fromkeys(weight, 1)
        candidates = [n for n in weight if pinned or weight[n] > 0]
        kept = [n for n in candidates if n not in avoided] or candidates
        if not any(weight[n] for n in kept):
            weight = dict.fromkeys(weight, 1)
        for cluster, name in members:
            out[runtime_key(route_name, cluster)] = weight[name] if name in kept else 0
    return out


def _compile_route(route, config, backends, forced) -> _Compiled:
    decision = decide_route(route, config, backends, forced)
    clusters: dict[str, cluster_pb2.Cluster] = {}
    endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
    if decision.path != "envoy":
        return _Compiled(decision, clusters, endpoints, [], [])
    settings = route_settings(route, config.defaults.route_policy)
    for variant in route.variants:
        backend = backends[variant.backend]
        name = variant_cluster(route.model, variant.name)
        connect = backend.connection.connect_timeout
        lua = variant_lua(route, variant)
        cluster, assignment = _cluster(
            name,
            backend.address,
            stat_name=f"{name}|{variant.backend}",
            upstream_lua=lua,
            connect_timeout=(connect.seconds + connect.nanos / 1e9) or 5.0,
            buffer_limit=config.envoy.max_body_bytes if lua else 0,
        )
        _breaker(cluster, backend, config)
        if settings.retry.max_attempts > 1:
            budget = cluster.circuit_breakers.thresholds[0].retry_budget
            budget.budget_percent.value = settings.retry.budget_ratio * 100
            budget.min_retry_concurrency.value = int(settings.retry.budget_min_per_second)
        if settings.shadow is not None and variant.name == settings.shadow.variant:
            shadow_limit = cluster.circuit_breakers.thresholds[0]
            shadow_limit.max_requests.value = settings.shadow.max_concurrency
        clusters[name] = cluster
        if assignment is not None:
            endpoints[assignment.cluster_name] = assignment
    fallback = [s.variant for s in settings.fallback if s.WhichOneof("step") == "variant"]
    if fallback:
        for variant in route.variants:
            chain = [variant.name] + [f for f in fallback if f != variant.name]
            clusters[aggregate_cluster(route.model, variant.name)] = _aggregate(
                aggregate_cluster(route.model, variant.name),
                [variant_cluster(route.model, v) for v in chain],
                variant_lua(route, variant),
                config.envoy.max_body_bytes,
            )
    routes, picks = _routes(route, settings, config, bool(fallback))
    return _Compiled(decision, clusters, endpoints, routes, picks)


def _assemble(config, compiled: list[_Compiled]) -> Resources:
    clusters: dict[str, cluster_pb2.Cluster] = {}
    endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
    gateway_cluster, gateway_endpoints = _cluster(GATEWAY_CLUSTER, config.envoy.gateway_address)
    tls = config.envoy.gateway_tls
    if tls.ca_file:
        gateway_cluster.transport_socket.CopyFrom(
            upstream_tls(tls.server_name or _split(config.envoy.gateway_address)[0], tls.ca_file)
        )
    clusters[GATEWAY_CLUSTER] = gateway_cluster
    if gateway_endpoints is not None:
        endpoints[GATEWAY_CLUSTER] = gateway_endpoints
    # A match table keyed by x-tensorgate-route, not a route list: Envoy walks a route list in
    # order for every call (twice: again after the Lua filter re-selects), which at 10,000
    # models cost 2.7-6.9 ms of Envoy CPU per call; the table is one hash lookup at any size, and
    # anything not in it (other RPCs, unknown models and versions) goes to the gateway.
    table = matcher_pb2.Matcher(on_no_match=_on_route(_gateway_route()))
    table.matcher_tree.input.CopyFrom(_header_input(ROUTE_HEADER))
    for one in compiled:
        clusters.update(one.clusters)
        endpoints.update(one.endpoints)
        for route in one.routes:
            table.matcher_tree.exact_match_map.map[route.name].CopyFrom(_on_route(route))
    if not table.matcher_tree.exact_match_map.map:
        table.ClearField("matcher_tree")
    route_config = route_pb2.RouteConfiguration(
        name=ROUTE_NAME,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="tensorgate", domains=["*"], matcher=table)
        ],
    )
    listener = _listener(config)
    return Resources(
        {
            CLUSTER: clusters,
            ENDPOINT: endpoints,
            LISTENER: {LISTENER_NAME: listener},
            ROUTE: {ROUTE_NAME: route_config},
        }
    )


def upstream_tls(
    server_name: str, ca_file: str, cert_file: str = "", key_file: str = ""
) -> base_pb2.TransportSocket:
    """Envoy's TLS to an upstream: its certificate chain checked against `ca_file` and its
    subject alternative names against `server_name`; a client certificate when given."""
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    # HTTP/2 announced in the handshake, as gRPC's own clients do.
    common.alpn_protocols.append("h2")
    if cert_file:
        certificate = common.tls_certificates.add()
        certificate.certificate_chain.filename = cert_file
        certificate.private_key.filename = key_file
    validation = common.validation_context
    validation.trusted_ca.filename = ca_file
    # Any certificate the CA signed is not enough: it must name the upstream.
    san = validation.match_typed_subject_alt_names.add()
    san.matcher.exact = server_name
    if _is_ip(server_name):
        san.san_type = common_pb2.SubjectAltNameMatcher.IP_ADDRESS
    else:
        san.san_type = common_pb2.SubjectAltNameMatcher.DNS
        context.sni = server_name  # SNI carries host names only (RFC 6066), never an IP
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(context))


def _header_input(name: str) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(
        name=name, typed_config=_any(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=name))
    )


def _on_route(route: route_components_pb2.Route) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(
        action=extension_pb2.TypedExtensionConfig(name=route.name, typed_config=_any(route))
    )


def routes_of(config: route_pb2.RouteConfiguration) -> list[route_components_pb2.Route]:
    """The Envoy routes in a route configuration's match table: per model (by name) its pinned
    versions, then its unpinned route; the gateway route last."""

    def order(key: str):
        model, _, version = key.partition("@")
        return (model, 0 if version else 1, int(version) if version.isdigit() else 0, version)

    out = []
    for host in config.virtual_hosts:
        table = host.matcher.matcher_tree.exact_match_map.map
        for key in sorted(table, key=order):
            out.append(route_components_pb2.Route())
            table[key].action.typed_config.Unpack(out[-1])
        out.append(route_components_pb2.Route())
        host.matcher.on_no_match.action.typed_config.Unpack(out[-1])
    return out


def _aggregate(
    name: str, members: list[str], lua: str | None, buffer_limit: int
) -> cluster_pb2.Cluster:
    """Priority i is members[i]: retries walk down it (previous_priorities), and so does load
    while a member's hosts are ejected. Requests run the upstream filter of members[0]'s variant
    (the one the route picked), which is why fallbacks must ask for the same backend model.
    Connections (HTTP/2, timeouts) are the members' own."""
    cluster = cluster_pb2.Cluster(
        name=name, alt_stat_name=_stat_name(name), connect_timeout=_duration(5.0)
    )
    cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    cluster.cluster_type.CopyFrom(
        cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate",
            typed_config=_any(aggregate_pb2.ClusterConfig(clusters=members)),
        )
    )
    if lua is not None:
        cluster.per_connection_buffer_limit_bytes.value = buffer_limit
        options = http_protocol_options_pb2.HttpProtocolOptions()
        options.explicit_http_config.http2_protocol_options.CopyFrom(_http2())
        _add_upstream_lua(options, lua)
        cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(_any(options))
    return cluster


def _routes(route, settings, config, has_fallback: bool):
    """Envoy routes of one model: one per pinned version (named `model@version`), then the
    unpinned one (named `model`); the name is the route's key in the match table (`_assemble`).
    Also returns each weighted route's members, whose weights the runtime layer carries
    (`_weights`)."""
    target = aggregate_cluster if has_fallback else variant_cluster
    versions = sorted({v.version for v in route.variants if v.version}, key=int)
    groups = [
        (f"{route.model}@{version}", version, [v for v in route.variants if v.version == version])
        for version in versions
    ]
    if any(v.weight > 0 for v in route.variants):
        # Every variant is a member, those without weight at 0: a variant entering or leaving
        # the split (a drain, a 100/0 flip) is then a weights push, not a new route table.
        groups.append((route.model, None, list(route.variants)))
    out, picks = [], []
    for name, version, group in groups:
        members = [(target(route.model, v.name), v) for v in group]
        out.append(_route(name, members, route, settings, config))
        if len(members) > 1:
            picks.append((name, version is not None, [(c, v.name) for c, v in members]))
    return out, picks


# A route chosen by the match table still needs a match (the field is required): one that
# always holds, so the table alone decides.
_ANY = route_components_pb2.RouteMatch(prefix="/")


def _identity(variant: config_pb2.Variant) -> list[base_pb2.HeaderValueOption]:
    """Response headers naming the variant: for answers that end at their headers (gRPC
    trailers-only errors, whose headers are their trailers)."""
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, value=value),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for key, value in ((VARIANT_HEADER, variant.name), (BACKEND_HEADER, variant.backend))
    ]


def _identity_trailers(variant: config_pb2.Variant) -> dict[str, any_pb2.Any]:
    """The same names as trailers, where the Python gateway sends them, added by the listener's
    header_mutation filter from this per-route (or per weighted cluster) config: no body
    buffering, no Lua on the way back."""
    mutations = header_mutation_pb2.Mutations(
        response_trailers_mutations=[
            mutation_rules_pb2.HeaderMutation(append=option) for option in _identity(variant)
        ]
    )
    return {_HEADER_MUTATION: _any(header_mutation_pb2.HeaderMutationPerRoute(mutations=mutations))}


def _route(name, members, route, settings, config) -> route_components_pb2.Route:
    action = route_components_pb2.RouteAction()
    identity, trailers = [], {}
    if len(members) == 1:
        action.cluster = members[0][0]
        identity = _identity(members[0][1])
        trailers = _identity_trailers(members[0][1])
    else:
        # Weights come from the runtime layer (key: runtime_key(name, cluster)), read per
        # request; 1 applies only until the layer arrives, which the ADS server sends first.
        action.weighted_clusters.runtime_key_prefix = f"tgw.{name}"
        for cluster, variant in members:
            action.weighted_clusters.clusters.add(
                name=cluster,
                weight={"value": 1},
                response_headers_to_add=_identity(variant),
                typed_per_filter_config=_identity_trailers(variant),
            )
        # Sticky: the route-key header's hash picks the weighted cluster (random without it).
        action.weighted_clusters.use_hash_policy.value = True
        action.hash_policy.add(header={"header_name": config.defaults.route_key_header})
    # The caller's grpc-timeout is the deadline, capped by the route's timeout when it has one;
    # without either there is no timeout (Envoy's default of 15 s would otherwise apply).
    timeout = _duration(settings.timeout or 0.0)
    action.timeout.CopyFrom(timeout)
    action.max_stream_duration.grpc_timeout_header_max.CopyFrom(timeout)
    retry = settings.retry
    backends = {b.name: b for b in config.backends}
    per_try = max(
        b.per_try_timeout.seconds + b.per_try_timeout.nanos / 1e9
        for b in (backends[v.backend] for v in route.variants)
    )
    fallback = [s for s in settings.fallback if s.WhichOneof("step") == "variant"]
    retries = retry.max_attempts - 1
    if fallback:
        retries = max(retries, len(fallback))
    if retries > 0:
        policy = action.retry_policy
        words: list[str] = []
        for code in sorted(c.name for c in retry.retry_on):
            words.extend(w for w in ENVOY_RETRY_ON[code] if w not in words)
        policy.retry_on = ",".join(words)
        policy.num_retries.value = retries
        policy.per_try_timeout.CopyFrom(_duration(per_try))
        policy.retry_back_off.base_interval.CopyFrom(_duration(max(retry.base_delay, 0.001)))
        policy.retry_back_off.max_interval.CopyFrom(
            _duration(max(retry.max_delay, retry.base_delay, 0.001))
        )
        if fallback:
            # Each retry moves one priority down the aggregate cluster: the next fallback variant.
            policy.retry_priority.name = "envoy.retry_priorities.previous_priorities"
            policy.retry_priority.typed_config.CopyFrom(
                _any(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=1))
            )
    if settings.shadow is not None:
        mirror = action.request_mirror_policies.add(
            cluster=variant_cluster(route.model, settings.shadow.variant),
            disable_shadow_host_suffix_append=True,
        )
        mirror.runtime_fraction.default_value.CopyFrom(
            percent_pb2.FractionalPercent(
                numerator=round(settings.shadow.fraction * 1_000_000),
                denominator=percent_pb2.FractionalPercent.MILLION,
            )
        )
    return route_components_pb2.Route(
        name=name,
        match=_ANY,
        route=action,
        response_headers_to_add=identity,
        typed_per_filter_config=trailers,
    )


def _gateway_route() -> route_components_pb2.Route:
    """Everything Envoy does not answer alone goes to the Python gateway, caller deadline
    honoured; one retry when a gateway instance refused or reset the call."""
    action = route_components_pb2.RouteAction(cluster=GATEWAY_CLUSTER)
    action.timeout.CopyFrom(_duration(0))
    action.max_stream_duration.grpc_timeout_header_max.CopyFrom(_duration(0))
    action.retry_policy.retry_on = "reset,connect-failure,refused-stream"
    action.retry_policy.num_retries.value = 1
    return route_components_pb2.Route(name="gateway", match=_ANY, route=action)


def _listener(config: config_pb2.GatewayConfig) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="tensorgate",
        codec_type=hcm_pb2.HttpConnectionManager.HTTP2,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=ROUTE_NAME),
        # Envoy buffers up to max(connection limit, stream window) per stream: keep the window
        # within the bound so the bound holds (HTTP/2's minimum window is 65535).
        http2_protocol_options=_http2(max(65535, min(1 << 20, config.envoy.max_body_bytes))),
        stream_idle_timeout=_duration(300),
        generate_request_id={"value": False},
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.lua",
                typed_config=_any(
                    lua_pb2.Lua(default_source_code={"inline_string": lua_source("model.lua")})
                ),
            ),
            # The variant's trailers (per-route config: _identity_trailers).
            hcm_pb2.HttpFilter(
                name=_HEADER_MUTATION,
                typed_config=_any(header_mutation_pb2.HeaderMutation()),
            ),
            # Per-cluster counts by gRPC status (cluster.<c>.grpc.<service>.<method>.<code>): what
            # deploy/prometheus/envoy.yaml maps onto tensorgate_requests_total{code}. Its upstream
            # timing stats stay off: latency comes from the cluster's upstream_rq_time, and they
            # cost ~15 us of Envoy CPU per call at 16 in flight (an eighth of Envoy's cost).
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.grpc_stats",
                typed_config=_any(
                    grpc_stats_pb2.FilterConfig(
                        individual_method_stats_allowlist={
                            "services": [
                                {
                                    "name": "inference.GRPCInferenceService",
                                    "method_names": ["ModelInfer"],
                                }
                            ]
                        },
                    )
                ),
            ),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            ),
        ],
    )
    listener = listener_pb2.Listener(
        name=LISTENER_NAME,
        address=_socket(config.envoy.listen),
        # Bounds what Envoy buffers per connection: a ModelInfer request over it is refused
        # (its model is read from the body, never from a caller's header).
        per_connection_buffer_limit_bytes={"value": config.envoy.max_body_bytes},
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(manager),
                    )
                ]
            )
        ],
    )
    return listener


__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "RUNTIME",
    "TYPES",
    "Decision",
    "Resources",
    "compile_config",
    "decide",
    "routes_of",
    "upstream_tls",
]
