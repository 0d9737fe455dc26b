"""GatewayConfig -> Envoy resources (listener, route configuration, clusters, endpoints).

Pure: the same config gives the same resources, byte for byte, so a push is skipped when nothing
changed and versions are content hashes. No I/O, no clock.

Each route takes one of two paths, decided here (`decide`) and printed by `check-config`:

- **envoy**: Envoy answers it alone. Its variants' calls go to their backends' shared clusters
  (`tgb|<backend>|<slot>`: clusters.py); the route is a weighted_clusters action over them
  (sticky keys hash the route-key header), each entry carrying its variant's rename
  (x-tensorgate-rename, applied by the cluster's upstream Lua filter) and trailers, with the
  route's retries, timeouts, mirror (shadow) and fallback (an aggregate cluster walked by retry
  priorities). Breakers are outlier detection on the backend's cluster, bulkheads its
  circuit_breakers. The routes go to the shard of the route table their model hashes to
  (scoped routes: resources.SHARDS).
- **gateway**: the Python gateway answers it (Envoy forwards to it as the cluster
  `tensorgate_gateway`): whatever Envoy cannot express (backend translation, static answers,
  schema validation, hedging, shadow comparison, ...). Unknown models and versions and every RPC
  other than ModelInfer (metadata, readiness) go there too, so callers get the gateway's answers.

With envoy.rest_listen, each route is decided a second time for KServe v2 REST
(`decide_rest_route`) and, when Envoy serves it, gets REST clusters and routes too (rest.py),
on a second listener whose other calls go to the gateway's REST listener.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import message
from xds.type.matcher.v3 import matcher_pb2

from gateway.controlplane.envoy.clusters import (
    add_cluster,
    backend_lua,
    build_aggregate,
    build_cluster,
    fallback_chains,
    outlier_breaker,
    retry_budget,
    retry_class,
    route_limits,
    shadow_lua,
    upstream_tls,
)
from gateway.controlplane.envoy.decide import Decision, decide_rest_route, decide_route, rest_on
from gateway.controlplane.envoy.listener import (
    build_gateway_route,
    build_listener,
    build_routes,
    header_input,
    on_route,
    routes_of,
)
from gateway.controlplane.envoy.resources import (
    CLUSTER,
    ENDPOINT,
    GATEWAY_CLUSTER,
    LISTENER,
    LISTENER_NAME,
    REST_LISTENER_NAME,
    REST_ROUTE_NAME,
    ROUTE,
    ROUTE_HEADER,
    RUNTIME,
    SCOPED,
    SHARDS,
    WEIGHTS_LAYER,
    aggregate_cluster,
    backend_cluster,
    content_version,
    runtime_key,
    scope_name,
    shadow_cluster,
    shard_of,
    shard_route_name,
    split_address,
)
from gateway.controlplane.envoy.rest import (
    build_rest_listener,
    compile_rest_route,
    route_configuration,
)
from gateway.controlplane.envoy.rest import gateway_cluster as rest_gateway_cluster
from gateway.dataplane.layers.chain import route_settings
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2


@dataclass
class Resources:
    """Envoy resources by type URL, each a {name: message} dict, and the per-route decisions."""

    by_type: dict[str, dict[str, message.Message]] = field(default_factory=dict)
    decisions: tuple[Decision, ...] = ()
    rest_decisions: tuple[Decision, ...] = ()  # empty when envoy.rest_listen is off

    def version(self, type_url: str) -> str:
        """A content hash of one type's resources: equal resources, equal version."""
        return content_version(self.by_type.get(type_url, {}))

    def cluster_names_referenced(self) -> set[str]:
        """Clusters the route configurations name (what must exist before they are pushed)."""
        names: set[str] = set()
        for config in self.by_type.get(ROUTE, {}).values():
            names |= _referenced(config)
        return names


# Route configuration (by identity: compiled messages never change) -> the clusters it names.
# The ADS server asks on every ACK; an unchanged shard is the same message from one snapshot
# to the next, so only changed shards are walked again.
_named: dict[int, tuple[message.Message, frozenset[str]]] = {}


def _referenced(config) -> frozenset[str]:
    hit = _named.get(id(config))
    if hit is not None and hit[0] is config:
        return hit[1]
    names: set[str] = set()
    for route in routes_of(config):
        action = route.route
        if action.cluster:
            names.add(action.cluster)
        names.update(c.name for c in action.weighted_clusters.clusters)
        names.update(m.cluster for m in action.request_mirror_policies)
    if len(_named) >= 512:
        _named.pop(next(iter(_named)))
    _named[id(config)] = (config, frozenset(names))
    return _named[id(config)][1]


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
    rest_decision: Decision | None = None
    rest_routes: list = field(default_factory=list)  # [(exact path, Envoy route)]


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
        self._shared: dict[str, tuple] = {}  # the clusters routes share, built once per context
        self._shards: dict[int, tuple] = {}  # shard -> (its routes' identity, its table, them)

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
            self._shared, self._shards = {}, {}
        backends = {b.name: b for b in config.backends}
        forced = set(config.envoy.gateway_routes)
        cache: dict[bytes, _Compiled] = {}
        by_model: dict[str, _Compiled] = {}
        used: list[_Compiled] = []
        weights: dict[str, float] = {}
        decisions, rest_decisions = [], []
        for route in sorted(config.routes, key=lambda r: r.model):
            shape = _shape(route)
            route_key = shape.SerializeToString(deterministic=True)
            compiled = self._cache.get(route_key) or cache.get(route_key)
            if compiled is None:
                compiled = _compile_route(shape, config, backends, forced, self._shared)
                previous = self._by_model.get(route.model)
                if previous is not None and _same(previous, compiled):
                    compiled = previous  # same resources: keep the assembled table as it is
            cache[route_key] = compiled
            by_model[route.model] = compiled
            used.append(compiled)
            decisions.append(compiled.decision)
            if compiled.rest_decision is not None:
                rest_decisions.append(compiled.rest_decision)
            if compiled.picks:
                weights.update(_weights(route, compiled.picks, _down(route, down)))
        self._cache, self._by_model = cache, by_model
        order = {r.model: i for i, r in enumerate(config.routes)}
        decisions.sort(key=lambda d: order[d.model])
        rest_decisions.sort(key=lambda d: order[d.model])
        identity = tuple(id(c) for c in used)
        if self._assembled is not None and self._assembled[0] == identity:
            structure = self._assembled[1].by_type  # same routes: same messages, same versions
        else:
            structure = _assemble(config, used, self._shards).by_type
        layer = rtds_pb2.Runtime(name=WEIGHTS_LAYER)
        layer.layer.update(weights)
        resources = Resources(
            {
                CLUSTER: structure[CLUSTER],
                ENDPOINT: structure[ENDPOINT],
                RUNTIME: {WEIGHTS_LAYER: layer},
                LISTENER: structure[LISTENER],
                SCOPED: structure[SCOPED],
                ROUTE: structure[ROUTE],
            },
            tuple(decisions),
            tuple(rest_decisions),
        )
        self._assembled = (identity, resources)
        return resources


def _same(a: _Compiled, b: _Compiled) -> bool:
    def serialized(c: _Compiled):
        return (
            [m.SerializeToString(deterministic=True) for m in c.routes],
            [(p, m.SerializeToString(deterministic=True)) for p, m in c.rest_routes],
            {n: m.SerializeToString(deterministic=True) for n, m in c.clusters.items()},
            {n: m.SerializeToString(deterministic=True) for n, m in c.endpoints.items()},
        )

    return (
        a.decision == b.decision
        and a.rest_decision == b.rest_decision
        and a.picks == b.picks
        and serialized(a) == serialized(b)
    )


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


def _compile_route(route, config, backends, forced, shared=None) -> _Compiled:
    decision = decide_route(route, config, backends, forced)
    rest = decide_rest_route(route, config, backends, decision) if rest_on(config) else None
    clusters: dict[str, cluster_pb2.Cluster] = {}
    endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
    if decision.path != "envoy":
        return _Compiled(decision, clusters, endpoints, [], [], rest)
    shared = {} if shared is None else shared
    settings = route_settings(route, config.defaults.route_policy)
    klass = retry_class(settings)
    slot: dict[str, str] = {}  # variant name -> its backend cluster
    taken: dict[str, int] = {}
    for variant in route.variants:
        backend = backends[variant.backend]
        name = backend_cluster(variant.backend, taken.get(variant.backend, 0), klass)
        taken[variant.backend] = taken.get(variant.backend, 0) + 1
        slot[variant.name] = name
        if name not in shared:
            shared[name] = _backend_cluster(name, backend, config, settings)
        add_cluster(clusters, endpoints, *shared[name])
    target = dict(slot)
    for variant, chain in fallback_chains(route, settings, slot):
        name = aggregate_cluster(chain)
        if name not in shared:
            shared[name] = (
                build_aggregate(name, chain, backend_lua(), config.envoy.max_body_bytes),
                None,
            )
        add_cluster(clusters, endpoints, *shared[name])
        target[variant.name] = name
    mirror = None
    if settings.shadow is not None:
        variant = next(v for v in route.variants if v.name == settings.shadow.variant)
        mirror = shadow_cluster(route.model, variant.name)
        lua = shadow_lua(route, variant)
        backend = backends[variant.backend]
        cluster, assignment = build_cluster(
            mirror,
            backend.address,
            stat_name=f"{mirror}|{variant.backend}",
            upstream_lua=lua,
            connect_timeout=seconds(backend.connection.connect_timeout, 5.0),
            buffer_limit=config.envoy.max_body_bytes if lua else 0,
            eds_name=_eds_name(variant.backend),
        )
        outlier_breaker(cluster, backend, config)
        route_limits(cluster, variant, settings)
        add_cluster(clusters, endpoints, cluster, assignment)
    routes, picks = build_routes(route, settings, config, target, mirror)
    rest_routes = []
    if rest is not None and rest.path == "envoy":
        more_clusters, more_endpoints, rest_routes, more_picks = compile_rest_route(
            route, settings, config, backends, shared
        )
        clusters.update(more_clusters)
        endpoints.update(more_endpoints)
        picks = picks + more_picks
    return _Compiled(decision, clusters, endpoints, routes, picks, rest, rest_routes)


def _eds_name(backend: str) -> str:
    # One ClusterLoadAssignment per backend, named for it, shared by its clusters.
    return f"tge|{backend}"


def _backend_cluster(name, backend, config, settings):
    """A backend's shared cluster: its address, breaker, bulkhead and connection settings, the
    retry budget of its retry class, and the one upstream filter that renames per call."""
    cluster, assignment = build_cluster(
        name,
        backend.address,
        upstream_lua=backend_lua(),
        connect_timeout=seconds(backend.connection.connect_timeout, 5.0),
        buffer_limit=config.envoy.max_body_bytes,
        eds_name=_eds_name(backend.name),
    )
    outlier_breaker(cluster, backend, config)
    retry_budget(cluster, settings)
    return cluster, assignment


def _assemble(config, compiled: list[_Compiled], shard_cache: dict | None = None) -> Resources:
    clusters: dict[str, cluster_pb2.Cluster] = {}
    endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
    gateway_cluster, gateway_endpoints = build_cluster(
        GATEWAY_CLUSTER, config.envoy.gateway_address
    )
    tls = config.envoy.gateway_tls
    if tls.ca_file:
        gateway_cluster.transport_socket.CopyFrom(
            upstream_tls(
                tls.server_name or split_address(config.envoy.gateway_address)[0], tls.ca_file
            )
        )
    clusters[GATEWAY_CLUSTER] = gateway_cluster
    if gateway_endpoints is not None:
        endpoints[GATEWAY_CLUSTER] = gateway_endpoints
    by_shard: list[list[_Compiled]] = [[] for _ in range(SHARDS)]
    for one in compiled:
        clusters.update(one.clusters)
        endpoints.update(one.endpoints)
        if one.routes:
            by_shard[shard_of(one.decision.model)].append(one)
    shard_cache = {} if shard_cache is None else shard_cache
    route_configs, scopes = {}, {}
    for shard, members in enumerate(by_shard):
        # A shard whose routes are the same objects as last time keeps its message, and so its
        # content version: the ADS server pushes only the shards that changed.
        identity = tuple(id(one) for one in members)
        hit = shard_cache.get(shard)
        if hit is None or hit[0] != identity:
            hit = (identity, _route_table(shard_route_name(shard), members), members)
            shard_cache[shard] = hit
        route_configs[shard_route_name(shard)] = hit[1]
        scope = scoped_route_pb2.ScopedRouteConfiguration(
            name=scope_name(shard), route_configuration_name=shard_route_name(shard)
        )
        scope.key.fragments.add(string_key=str(shard))
        scopes[scope.name] = scope
    listeners = {LISTENER_NAME: build_listener(config)}
    if rest_on(config):
        cluster, assignment = rest_gateway_cluster(config)
        clusters[cluster.name] = cluster
        if assignment is not None:
            endpoints[cluster.name] = assignment
        listeners[REST_LISTENER_NAME] = build_rest_listener(config)
        route_configs[REST_ROUTE_NAME] = route_configuration(
            [pair for one in compiled for pair in one.rest_routes]
        )
    return Resources(
        {
            CLUSTER: clusters,
            ENDPOINT: endpoints,
            LISTENER: listeners,
            SCOPED: scopes,
            ROUTE: route_configs,
        }
    )


def _route_table(name: str, compiled: list[_Compiled]) -> route_pb2.RouteConfiguration:
    # A match table keyed by x-tensorgate-route, not a route list: Envoy walks a route list in
    # order for every call (twice: again after the Lua filter re-selects), which at 10,000
    # models cost 2.7-6.9 ms of Envoy CPU per call; the table is one hash lookup at any size, and
    # anything not in it (other RPCs, unknown models and versions) goes to the gateway.
    table = matcher_pb2.Matcher(on_no_match=on_route(build_gateway_route()))
    table.matcher_tree.input.CopyFrom(header_input(ROUTE_HEADER))
    for one in compiled:
        for route in one.routes:
            table.matcher_tree.exact_match_map.map[route.name].CopyFrom(on_route(route))
    if not table.matcher_tree.exact_match_map.map:
        table.ClearField("matcher_tree")
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="tensorgate", domains=["*"], matcher=table)
        ],
    )
