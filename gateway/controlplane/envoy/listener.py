"""The Envoy listener and its route table: the body-reading Lua filter (model.lua), the match
table of public models, weighted routes with their retries, timeouts, mirrors and trailers, and
the route that hands everything else to the Python gateway.
"""

from __future__ import annotations

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.core.v3 import extension_pb2 as core_extension_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_header_mutation_pb2,
)
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.type.matcher.v3 import http_inputs_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from gateway.controlplane.envoy.clusters import http2, rename_value
from gateway.controlplane.envoy.resources import (
    BACKEND_HEADER,
    GATEWAY_CLUSTER,
    LISTENER_NAME,
    RENAME_HEADER,
    ROUTE_NAME,
    SHARD_HEADER,
    SHARDS,
    VARIANT_HEADER,
    ads_source,
    envoy_stat_name,
    lua_source,
    packed,
    shard_route_name,
    socket_address,
)
from gateway.dataplane.layers.retry import ENVOY_RETRY_ON
from gateway.durations import duration, seconds
from tensorgate.config.v1 import config_pb2

_HEADER_MUTATION = "envoy.filters.http.header_mutation"


def header_input(name: str) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(
        name=name,
        typed_config=packed(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=name)),
    )


def on_route(route: route_components_pb2.Route) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(
        action=extension_pb2.TypedExtensionConfig(name=route.name, typed_config=packed(route))
    )


def routes_of(config: route_pb2.RouteConfiguration) -> list[route_components_pb2.Route]:
    """The Envoy routes in a route configuration's match table: per model (by name) its pinned
    versions, then its unpinned route; the gateway route last. Nested tables (the REST
    listener's: hand-over header, then path) are walked in place."""
    out: list[route_components_pb2.Route] = []
    for host in config.virtual_hosts:
        _walk(host.matcher, out)
    return out


def _order(key: str):
    model, _, version = key.partition("@")
    return (model, 0 if version else 1, int(version) if version.isdigit() else 0, version)


def _walk(table: matcher_pb2.Matcher, out: list) -> None:
    entries = table.matcher_tree.exact_match_map.map
    chosen = [entries[key] for key in sorted(entries, key=_order)]
    if table.HasField("on_no_match"):
        chosen.append(table.on_no_match)
    for on_match in chosen:
        if on_match.HasField("matcher"):
            _walk(on_match.matcher, out)
        else:
            out.append(route_components_pb2.Route())
            on_match.action.typed_config.Unpack(out[-1])


def build_routes(route, settings, config, target: dict[str, str], mirror: str | None = None):
    """Envoy routes of one model: one per pinned version (named `model@version`), then the
    unpinned one (named `model`); the name is the route's key in the match table (`_assemble`).
    `target`: each variant's cluster (its backend cluster, or its fallback chain's aggregate);
    `mirror`: the shadow's cluster. Also returns each weighted route's members, whose weights
    the runtime layer carries (`_weights`)."""
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
        members = [(target[v.name], v) for v in group]
        renames = [rename_value(route, v, version is not None) for v in group]
        out.append(build_route(name, members, renames, route, settings, config, mirror))
        if len(members) > 1:
            picks.append((name, version is not None, [(c, v.name) for c, v in members]))
    return out, picks


def set_header(key: str, value: str | None) -> list[base_pb2.HeaderValueOption]:
    """A request header a route entry sets for the chosen cluster's upstream filter (RENAME_HEADER:
    what to rewrite for this variant, clusters.rename_value; the REST path header), replacing
    any a caller sent; none when `value` is None."""
    if value is None:
        return []
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, value=value),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    ]


# A route chosen by the match table still needs a match (the field is required): one that
# always holds, so the table alone decides.
_ANY = route_components_pb2.RouteMatch(prefix="/")


def identity_headers(variant: config_pb2.Variant) -> list[base_pb2.HeaderValueOption]:
    """Response headers naming the variant: for answers that end at their headers (gRPC
    trailers-only errors, whose headers are their trailers)."""
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, value=value),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for key, value in ((VARIANT_HEADER, variant.name), (BACKEND_HEADER, variant.backend))
    ]


def identity_trailers(variant: config_pb2.Variant) -> dict[str, any_pb2.Any]:
    """The same names as trailers, where the Python gateway sends them, added by the listener's
    header_mutation filter from this per-route (or per weighted cluster) config: no body
    buffering, no Lua on the way back."""
    mutations = header_mutation_pb2.Mutations(
        response_trailers_mutations=[
            mutation_rules_pb2.HeaderMutation(append=option) for option in identity_headers(variant)
        ]
    )
    return {
        _HEADER_MUTATION: packed(header_mutation_pb2.HeaderMutationPerRoute(mutations=mutations))
    }


def build_route(
    name, members, renames, route, settings, config, mirror=None
) -> route_components_pb2.Route:
    action = route_components_pb2.RouteAction()
    identity, trailers, rename = [], {}, []
    if len(members) == 1:
        action.cluster = members[0][0]
        identity = identity_headers(members[0][1])
        trailers = identity_trailers(members[0][1])
        rename = set_header(RENAME_HEADER, renames[0])
    else:
        # Weights come from the runtime layer (key: runtime_key(name, cluster)), read per
        # request; 1 applies only until the layer arrives, which the ADS server sends first.
        action.weighted_clusters.runtime_key_prefix = f"tgw.{name}"
        for (cluster, variant), value in zip(members, renames, strict=True):
            # Each entry names its cluster once per route (resources.backend_cluster's slot), so
            # its runtime key is its own; the rename rides on the entry, applied by the router
            # before the upstream filters run.
            action.weighted_clusters.clusters.add(
                name=cluster,
                weight={"value": 1},
                request_headers_to_add=set_header(RENAME_HEADER, value),
                response_headers_to_add=identity_headers(variant),
                typed_per_filter_config=identity_trailers(variant),
            )
        # Sticky: the route-key header's hash picks the weighted cluster (random without it).
        action.weighted_clusters.use_hash_policy.value = True
        action.hash_policy.add(header={"header_name": config.defaults.route_key_header})
    # The caller's grpc-timeout is the deadline, capped by the route's timeout when it has one;
    # without either there is no timeout (Envoy's default of 15 s would otherwise apply).
    timeout = duration(settings.timeout or 0.0)
    action.timeout.CopyFrom(timeout)
    action.max_stream_duration.grpc_timeout_header_max.CopyFrom(timeout)
    words: list[str] = []
    for code in sorted(c.name for c in settings.retry.retry_on):
        words.extend(w for w in ENVOY_RETRY_ON[code] if w not in words)
    add_retries(action, route, settings, config, ",".join(words))
    if mirror is not None:
        add_mirror(action, settings, mirror)
    return route_components_pb2.Route(
        name=name,
        match=_ANY,
        route=action,
        # Route statistics (vhost.tensorgate.route.<model>.*, Prometheus label envoy_route): the
        # only per-model figures Envoy has, since clusters are per backend. A model's routes
        # (pinned versions, unpinned) share one prefix, so one set of stats: +41 MB of RSS at
        # 10,000 models (docs/envoy.md, Measured).
        stat_prefix=envoy_stat_name(route.model),
        request_headers_to_add=rename,
        response_headers_to_add=identity,
        typed_per_filter_config=trailers,
    )


def build_gateway_route() -> route_components_pb2.Route:
    """Everything Envoy does not answer alone goes to the Python gateway, caller deadline
    honoured; one retry when a gateway instance refused or reset the call."""
    action = route_components_pb2.RouteAction(cluster=GATEWAY_CLUSTER)
    action.timeout.CopyFrom(duration(0))
    action.max_stream_duration.grpc_timeout_header_max.CopyFrom(duration(0))
    action.retry_policy.retry_on = "reset,connect-failure,refused-stream"
    action.retry_policy.num_retries.value = 1
    return route_components_pb2.Route(name="gateway", match=_ANY, route=action)


def early_mutations() -> list[core_extension_pb2.TypedExtensionConfig]:
    """Applied as the request arrives, before route selection and every filter
    (HttpConnectionManager.early_header_mutation_extensions): a caller's RENAME_HEADER is
    removed, so the rename a backend cluster applies is only ever the one the route set, never a
    caller's choice of model; and SHARD_HEADER is set to shard 0 (a caller's replaced), so every
    call finds a route table, whose no-match action is the gateway, until the Lua filter keys it
    to its model's shard."""
    shard = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=SHARD_HEADER, value="0"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    mutation = early_header_mutation_pb2.HeaderMutation(
        mutations=[
            mutation_rules_pb2.HeaderMutation(remove=RENAME_HEADER),
            mutation_rules_pb2.HeaderMutation(append=shard),
        ]
    )
    return [
        core_extension_pb2.TypedExtensionConfig(
            name="envoy.http.early_header_mutation.header_mutation", typed_config=packed(mutation)
        )
    ]


def scoped_routes() -> hcm_pb2.ScopedRoutes:
    """The route table as SHARDS scopes (ScopedRouteConfiguration over SRDS, keyed by
    SHARD_HEADER: ScopeKeyBuilder.FragmentBuilder.HeaderValueExtractor, index 0 = the whole
    value), each naming its RouteConfiguration (RDS). Envoy re-selects the scope when a filter
    clears the route cache, which the Lua filter does after setting the header."""
    scoped = hcm_pb2.ScopedRoutes(name=ROUTE_NAME)
    fragment = scoped.scope_key_builder.fragments.add()
    fragment.header_value_extractor.name = SHARD_HEADER
    fragment.header_value_extractor.index = 0
    scoped.rds_config_source.CopyFrom(ads_source())
    scoped.scoped_rds.scoped_rds_config_source.CopyFrom(ads_source())
    return scoped


def grpc_routes(route_configs: dict) -> list[route_components_pb2.Route]:
    """The gRPC listener's Envoy routes across its shards (`routes_of` each), as one table:
    per model its pinned versions, then its unpinned route; the gateway route once, last."""
    shards = [route_configs[n] for n in map(shard_route_name, range(SHARDS)) if n in route_configs]
    out = [route for config in shards for route in routes_of(config) if route.name != "gateway"]
    out.sort(key=lambda r: _order(r.name))
    gateway = [r for c in shards for r in routes_of(c) if r.name == "gateway"]
    return out + gateway[:1]


def build_listener(config: config_pb2.GatewayConfig) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="tensorgate",
        codec_type=hcm_pb2.HttpConnectionManager.HTTP2,
        scoped_routes=scoped_routes(),
        # Envoy buffers up to max(connection limit, stream window) per stream: keep the window
        # within the bound so the bound holds (HTTP/2's minimum window is 65535).
        http2_protocol_options=http2(max(65535, min(1 << 20, config.envoy.max_body_bytes))),
        stream_idle_timeout=duration(300),
        generate_request_id={"value": False},
        early_header_mutation_extensions=early_mutations(),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.lua",
                typed_config=packed(
                    lua_pb2.Lua(
                        default_source_code={
                            "inline_string": f"local SHARDS = {SHARDS}\n" + lua_source("model.lua")
                        }
                    )
                ),
            ),
            # The variant's trailers (per-route config: identity_trailers).
            hcm_pb2.HttpFilter(
                name=_HEADER_MUTATION,
                typed_config=packed(header_mutation_pb2.HeaderMutation()),
            ),
            # Per-cluster counts by gRPC status (cluster.<c>.grpc.<service>.<method>.<code>): what
            # deploy/prometheus/envoy.yaml maps onto tensorgate_requests_total{code}. Its upstream
            # timing stats stay off: latency comes from the cluster's upstream_rq_time, and they
            # cost ~15 us of Envoy CPU per call at 16 in flight (an eighth of Envoy's cost).
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.grpc_stats",
                typed_config=packed(
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
                name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
            ),
        ],
    )
    listener = listener_pb2.Listener(
        name=LISTENER_NAME,
        address=socket_address(config.envoy.listen),
        # Bounds what Envoy buffers per connection: a ModelInfer request over it is refused
        # (its model is read from the body, never from a caller's header).
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
    return listener


def add_retries(action, route, settings, config, retry_on: str, statuses=()) -> None:
    """The route's retry policy (both listeners; `retry_on` and `statuses` in the listener's
    protocol): attempts, or one per fallback variant when more, each try bounded by the slowest
    variant backend's per_try_timeout, and with fallback each retry one priority further down
    the aggregate cluster (the next fallback variant)."""
    retry = settings.retry
    backends = {b.name: b for b in config.backends}
    per_try = max(seconds(backends[v.backend].per_try_timeout) for v in route.variants)
    fallback = [s for s in settings.fallback if s.WhichOneof("step") == "variant"]
    retries = retry.max_attempts - 1
    if fallback:
        retries = max(retries, len(fallback))
    if retries <= 0:
        return
    policy = action.retry_policy
    policy.retry_on = retry_on
    policy.retriable_status_codes.extend(statuses)
    policy.num_retries.value = retries
    policy.per_try_timeout.CopyFrom(duration(per_try))
    policy.retry_back_off.base_interval.CopyFrom(duration(max(retry.base_delay, 0.001)))
    policy.retry_back_off.max_interval.CopyFrom(
        duration(max(retry.max_delay, retry.base_delay, 0.001))
    )
    if fallback:
        policy.retry_priority.name = "envoy.retry_priorities.previous_priorities"
        policy.retry_priority.typed_config.CopyFrom(
            packed(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=1))
        )


def add_mirror(action, settings, cluster: str) -> None:
    """The route's shadow: a mirror of `settings.shadow.fraction` of its calls to `cluster`."""
    mirror = action.request_mirror_policies.add(
        cluster=cluster, disable_shadow_host_suffix_append=True
    )
    mirror.runtime_fraction.default_value.CopyFrom(
        percent_pb2.FractionalPercent(
            numerator=round(settings.shadow.fraction * 1_000_000),
            denominator=percent_pb2.FractionalPercent.MILLION,
        )
    )
