"""Envoy mode for KServe v2 REST (envoy.rest_listen): a second listener, with its own route
configuration, beside the gRPC one.

A REST call names its model in the URL (`/v2/models/{m}[/versions/{v}]/infer`), so the route
table matches the exact path with no body read: one entry per public model (its weighted
variants) and per public version (pinning: the variants of that version). A variant's calls go
to its backend's REST cluster (`rest_address`, HTTP/1.1; per backend and shared by every route,
as on gRPC: `compile_rest_route`), with the breaker as outlier detection and the bulkhead as
circuit_breakers, as its gRPC cluster has; the route
carries the retries (gRPC codes mapped to HTTP statuses: decide.REST_RETRY_ON), the per-try
timeout (Envoy's 504), the mirror (shadow) and, for fallback variants, an aggregate cluster.
Weights come from the same RTDS layer as gRPC's, under keys of their own (the REST clusters'
names): one weight change is one push that moves both protocols.

Which routes Envoy serves is `decide.decide_rest_route`; a call on them still goes to the
gateway when the listener's Lua filter (lua/rest.lua) finds a body Envoy must not forward as it
is (keys the gateway would refuse, parameters other than Triton's binary flags, escapes,
compression, a caller's deadline). Everything else (the other routes, unknown models and
versions, metadata, readiness, /openapi.json, /docs, ...) goes to the gateway's REST listener
(envoy.gateway_rest_address).
"""

from __future__ import annotations

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import extension_pb2 as core_extension_pb2
from envoy.config.core.v3 import substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_header_mutation_pb2,
)
from envoy.type.matcher.v3 import regex_pb2
from xds.type.matcher.v3 import matcher_pb2

from gateway.controlplane.envoy.clusters import (
    add_cluster,
    build_aggregate,
    build_cluster,
    fallback_chains,
    http2,
    outlier_breaker,
    retry_budget,
    retry_class,
    route_limits,
    upstream_tls,
)
from gateway.controlplane.envoy.decide import REST_RETRY_ON
from gateway.controlplane.envoy.listener import (
    add_mirror,
    add_retries,
    header_input,
    identity_headers,
    on_route,
    set_header,
)
from gateway.controlplane.envoy.resources import (
    REST_GATEWAY_CLUSTER,
    REST_HAND_OVER_HEADER,
    REST_LISTENER_NAME,
    REST_PATH_HEADER,
    REST_ROUTE_NAME,
    ads_source,
    envoy_stat_name,
    infer_path,
    lua_source,
    lua_string,
    packed,
    rest_aggregate_cluster,
    rest_backend_cluster,
    rest_shadow_cluster,
    socket_address,
    split_address,
)
from gateway.durations import duration, seconds
from tensorgate.config.v1 import config_pb2

_LUA = "envoy.filters.http.lua"

# Request headers that hand a call to the gateway whatever its body: a compressed body (Triton
# inflates it, the listener's Lua could not read it), and the caller's deadline (the gateway's
# REST listener reads it, gateway/dataplane/rest/app.py TIMEOUT_HEADER, and caps it by the
# route's timeout; Envoy would apply the route's alone).
HAND_OVER_HEADERS = ("content-encoding", "x-tensorgate-timeout-ms")

# The gateway's bound on a request id (gateway/dataplane/layers/validation).
MAX_ID = 256

# A route the match table chose still needs a match (the field is required): one that always
# holds.
_ANY = route_components_pb2.RouteMatch(prefix="/")


def rest_path_lua(path: str | None = None) -> str:
    """The path-writing upstream filter: `path` as a constant (a shadow's cluster), or, without
    one, the path the route's entry put in REST_PATH_HEADER (a backend cluster)."""
    constant = lua_string(path) if path is not None else "nil"
    return f"local PATH = {constant}\n" + lua_source("rest_path.lua")


def _listener_lua() -> str:
    headers = ", ".join(lua_string(h) for h in HAND_OVER_HEADERS)
    prelude = (
        f"local C = {{hand_over = {lua_string(REST_HAND_OVER_HEADER)}, "
        f"hand_over_headers = {{{headers}}}, max_id = {MAX_ID}}}\n"
    )
    return prelude + lua_source("rest.lua")


def _groups(route: config_pb2.Route):
    """(route name, version or None, variants) of the model's REST routes: one per version
    (pinning), then the unpinned one when any variant takes unpinned calls. The names are the
    gRPC routes' (`model@version`, `model`): the runtime layer keys both by name and cluster."""
    versions = sorted({v.version for v in route.variants if v.version}, key=int)
    groups = [
        (f"{route.model}@{version}", version, [v for v in route.variants if v.version == version])
        for version in versions
    ]
    if any(v.weight > 0 for v in route.variants):
        groups.append((route.model, None, list(route.variants)))
    return groups


def compile_rest_route(route, settings, config, backends, shared=None):
    """One route's REST clusters, endpoints, Envoy routes (each paired with the path the match
    table keys it by) and weighted picks, for a route `decide_rest_route` gave to Envoy.

    Clusters are per backend (`tgrb|<backend>|<slot>[|<retry class>][|p]`, shared by every
    route, as the gRPC listener's: clusters.py); `|p` ones carry the upstream filter that sets
    the path a route's entry names in REST_PATH_HEADER. A shadow has its own cluster with its
    path as a constant (a mirrored copy carries the primary's headers)."""
    shared = {} if shared is None else shared
    backend_path = {v.name: infer_path(v.backend_model, v.backend_version) for v in route.variants}
    groups = _groups(route)
    # The route rewrites the path when all its variants take one path at the backend; where they
    # take several (unpinned calls over variants of different versions), each entry names its
    # variant's path and the cluster's filter writes it.
    rewrite_by_cluster = set()
    for _, _, group in groups:
        if len({backend_path[v.name] for v in group}) > 1:
            rewrite_by_cluster.update(v.name for v in group)
    klass = retry_class(settings)
    clusters, endpoints = {}, {}
    slot: dict[str, str] = {}
    taken: dict[str, int] = {}
    for variant in route.variants:
        backend = backends[variant.backend]
        rewrites = variant.name in rewrite_by_cluster
        name = rest_backend_cluster(variant.backend, taken.get(variant.backend, 0), klass, rewrites)
        taken[variant.backend] = taken.get(variant.backend, 0) + 1
        slot[variant.name] = name
        if name not in shared:
            cluster, assignment = build_cluster(
                name,
                backend.rest_address,
                upstream_lua=rest_path_lua() if rewrites else None,
                connect_timeout=seconds(backend.connection.connect_timeout, 5.0),
                eds_name=f"tgre|{backend.name}",
                http1=True,
            )
            outlier_breaker(cluster, backend, config)
            retry_budget(cluster, settings)
            shared[name] = (cluster, assignment)
        add_cluster(clusters, endpoints, *shared[name])
    target = dict(slot)
    # Fallback variants ask the backend what the primary asks (fallback.on_envoy), so they take
    # its path; retries walk the aggregate's priorities, as on gRPC.
    for variant, chain in fallback_chains(route, settings, slot):
        name = rest_aggregate_cluster(chain)
        if name not in shared:
            lua = rest_path_lua() if variant.name in rewrite_by_cluster else None
            shared[name] = (build_aggregate(name, chain, lua, 0, http1=True), None)
        add_cluster(clusters, endpoints, *shared[name])
        target[variant.name] = name
    mirror = None
    if settings.shadow is not None:
        variant = next(v for v in route.variants if v.name == settings.shadow.variant)
        backend = backends[variant.backend]
        mirror = rest_shadow_cluster(route.model, variant.name)
        cluster, assignment = build_cluster(
            mirror,
            backend.rest_address,
            stat_name=f"{mirror}|{variant.backend}",
            upstream_lua=rest_path_lua(backend_path[variant.name]),
            connect_timeout=seconds(backend.connection.connect_timeout, 5.0),
            eds_name=f"tgre|{backend.name}",
            http1=True,
        )
        outlier_breaker(cluster, backend, config)
        route_limits(cluster, variant, settings)
        add_cluster(clusters, endpoints, cluster, assignment)
    routes, picks = [], []
    for name, version, group in groups:
        members = [(target[v.name], v) for v in group]
        paths = {backend_path[v.name] for v in group}
        incoming = infer_path(route.model, version or "")
        rewrite = paths.pop() if len(paths) == 1 and incoming not in paths else None
        named = [backend_path[v.name] if v.name in rewrite_by_cluster else None for v in group]
        built = _route(name, members, named, route, settings, config, rewrite, mirror)
        routes.append((incoming, built))
        if len(members) > 1:
            picks.append((name, version is not None, [(c, v.name) for c, v in members]))
    return clusters, endpoints, routes, picks


def _retry_on(retry) -> tuple[str, list[int]]:
    words, codes = [], set()
    for code in sorted(c.name for c in retry.retry_on):
        more, statuses = REST_RETRY_ON[code]
        words.extend(w for w in more if w not in words)
        codes.update(statuses)
    if codes:
        words.append("retriable-status-codes")
    return ",".join(words), sorted(codes)


def _route(name, members, paths, route, settings, config, rewrite, mirror):
    action = route_components_pb2.RouteAction()
    identity, named = [], []
    if len(members) == 1:
        action.cluster = members[0][0]
        identity = identity_headers(members[0][1])
        named = set_header(REST_PATH_HEADER, paths[0])
    else:
        # Weights from the runtime layer, as on the gRPC routes (listener.build_route); each
        # entry names its variant's path where its cluster's filter writes it.
        action.weighted_clusters.runtime_key_prefix = f"tgw.{name}"
        for (cluster, variant), path in zip(members, paths, strict=True):
            action.weighted_clusters.clusters.add(
                name=cluster,
                weight={"value": 1},
                request_headers_to_add=set_header(REST_PATH_HEADER, path),
                response_headers_to_add=identity_headers(variant),
            )
        action.weighted_clusters.use_hash_policy.value = True
        action.hash_policy.add(header={"header_name": config.defaults.route_key_header})
    if rewrite is not None:
        action.regex_rewrite.CopyFrom(
            regex_pb2.RegexMatchAndSubstitute(
                pattern=regex_pb2.RegexMatcher(regex="^.*$"), substitution=rewrite
            )
        )
    # The route's timeout, or none (Envoy's default of 15 s would otherwise apply); a caller's
    # own deadline takes the call to the gateway (HAND_OVER_HEADERS).
    action.timeout.CopyFrom(duration(settings.timeout or 0.0))
    add_retries(action, route, settings, config, *_retry_on(settings.retry))
    if mirror is not None:
        add_mirror(action, settings, mirror)
    return route_components_pb2.Route(
        name=name,
        match=_ANY,
        route=action,
        # Per-model REST statistics (vhost.tensorgate_rest.route.<model>.*), as the gRPC routes
        # have under vhost.tensorgate: the REST answer's HTTP status is the call's outcome, so
        # here they also say how calls ended (deploy/prometheus/envoy.yaml records them).
        stat_prefix=envoy_stat_name(route.model),
        request_headers_to_add=named,
        response_headers_to_add=identity,
        # Triton compresses an answer when asked (Accept-Encoding: gzip); the gateway's REST
        # listener never does: the caller gets what the gateway would send, and Triton spends
        # no CPU compressing for a loopback hop.
        request_headers_to_remove=["accept-encoding"],
    )


def gateway_route() -> route_components_pb2.Route:
    """Everything Envoy does not serve alone goes to the gateway's REST listener, with no
    timeout of Envoy's (the gateway applies the caller's and the route's) and no body check.
    Retried once only when the call cannot have reached a gateway (a POST is not idempotent)."""
    action = route_components_pb2.RouteAction(cluster=REST_GATEWAY_CLUSTER)
    action.timeout.CopyFrom(duration(0))
    action.retry_policy.retry_on = "connect-failure,refused-stream,reset-before-request"
    action.retry_policy.num_retries.value = 1
    return route_components_pb2.Route(
        name="gateway",
        match=_ANY,
        route=action,
        typed_per_filter_config={_LUA: packed(lua_pb2.LuaPerRoute(disabled=True))},
        request_headers_to_remove=[REST_HAND_OVER_HEADER],  # Envoy's own word, not the gateway's
    )


def route_configuration(routes: list[tuple[str, route_components_pb2.Route]]):
    """The REST match table: first the hand-over header (set by the Lua filter, rest.lua), then
    the exact path; anything else to the gateway. Exact paths only: a query string, an escaped
    or doubled character, another method's path all miss, and the gateway answers them."""
    to_gateway = on_route(gateway_route())
    table = matcher_pb2.Matcher(on_no_match=to_gateway)
    if routes:
        by_path = matcher_pb2.Matcher(on_no_match=to_gateway)
        by_path.matcher_tree.input.CopyFrom(header_input(":path"))
        for path, route in routes:
            by_path.matcher_tree.exact_match_map.map[path].CopyFrom(on_route(route))
        table.on_no_match.ClearField("action")
        table.on_no_match.matcher.CopyFrom(by_path)
        table.matcher_tree.input.CopyFrom(header_input(REST_HAND_OVER_HEADER))
        table.matcher_tree.exact_match_map.map["1"].CopyFrom(to_gateway)
    return route_pb2.RouteConfiguration(
        name=REST_ROUTE_NAME,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="tensorgate_rest", domains=["*"], matcher=table)
        ],
    )


def gateway_cluster(config: config_pb2.GatewayConfig):
    """The gateway's REST listener as a cluster (HTTP/1.1; TLS as the gRPC gateway cluster:
    the REST listener serves the data plane's certificate)."""
    address = config.envoy.gateway_rest_address
    cluster, endpoints = build_cluster(REST_GATEWAY_CLUSTER, address, http1=True)
    tls = config.envoy.gateway_tls
    if tls.ca_file:
        cluster.transport_socket.CopyFrom(
            upstream_tls(tls.server_name or split_address(address)[0], tls.ca_file, alpn="http/1.1")
        )
    return cluster, endpoints


def build_rest_listener(config: config_pb2.GatewayConfig) -> listener_pb2.Listener:
    # Envoy's own answers (no healthy upstream, timeouts, a body over the bound) in the v2
    # error form the gateway and Triton use: {"error": "..."}.
    local_reply = hcm_pb2.LocalReplyConfig(
        body_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format={"error": "%LOCAL_REPLY_BODY%"}
        )
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="tensorgate_rest",
        # HTTP/1.1, and HTTP/2 for clients that speak it in clear (prior knowledge).
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=REST_ROUTE_NAME),
        http2_protocol_options=http2(max(65535, min(1 << 20, config.envoy.max_body_bytes))),
        stream_idle_timeout=duration(300),
        generate_request_id={"value": False},
        # A caller's REST_PATH_HEADER is removed before anything reads it: the path a backend
        # cluster writes is only ever the one a route named.
        early_header_mutation_extensions=[
            core_extension_pb2.TypedExtensionConfig(
                name="envoy.http.early_header_mutation.header_mutation",
                typed_config=packed(
                    early_header_mutation_pb2.HeaderMutation(
                        mutations=[mutation_rules_pb2.HeaderMutation(remove=REST_PATH_HEADER)]
                    )
                ),
            )
        ],
        local_reply_config=local_reply,
        http_filters=[
            hcm_pb2.HttpFilter(
                name=_LUA,
                typed_config=packed(
                    lua_pb2.Lua(default_source_code={"inline_string": _listener_lua()})
                ),
            ),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
            ),
        ],
    )
    return listener_pb2.Listener(
        name=REST_LISTENER_NAME,
        address=socket_address(config.envoy.rest_listen),
        # Bounds what the Lua filter buffers per call (envoy.max_body_bytes).
        per_connection_buffer_limit_bytes={"value": config.envoy.max_body_bytes},
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=packed(manager),
                    )
                ]
            )
        ],
    )
