"""Envoy clusters: endpoints, HTTP/2 and TLS to the backend, outlier detection (breakers),
circuit breakers (bulkheads), and the upstream Lua filter that renames a variant's model.

gRPC clusters are keyed by what differs on the wire and in limits, not by variant: one per
backend (and slot, and retry budget: resources.backend_cluster), shared by every route on it,
as the gateway's own breaker and bulkhead are per backend. What a variant adds (its backend
model and version, the names its answer shows) travels per call in RENAME_HEADER, set by the
route's weighted cluster entry (ClusterWeight.request_headers_to_add) and applied by the one
upstream Lua filter of the backend cluster. At 10,000 routes of two variants this is a handful
of clusters instead of 20,000 (each with its own Lua state per worker, stats and host set).
Shadows keep a cluster of their own (shadow_cluster). The REST listener's clusters are per
backend the same way (rest.py), the path taking the place of the rename.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from gateway.controlplane.envoy.resources import (
    ads_source,
    envoy_stat_name,
    is_ip,
    lua_source,
    lua_string,
    packed,
    socket_address,
    split_address,
)
from gateway.dataplane.layers.breaker import breaker_settings
from gateway.dataplane.layers.bulkhead import bulkhead_settings
from gateway.durations import duration
from tensorgate.config.v1 import config_pb2

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


_UNLIMITED = 1_000_000


def load_assignment(name: str, address: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(address))
                    )
                ]
            )
        ],
    )


def http2(stream_window: int = 1 << 20) -> protocol_pb2.Http2ProtocolOptions:
    return protocol_pb2.Http2ProtocolOptions(
        max_concurrent_streams={"value": 1024},
        initial_stream_window_size={"value": stream_window},
        initial_connection_window_size={"value": 1 << 24},
    )


def renamed(route: config_pb2.Route, variant: config_pb2.Variant) -> bool:
    """Must calls to this variant be rewritten to the backend's model and version?
    Yes unless the backend knows it by the public name and with no version: a variant with a
    version also takes the route's unpinned calls (they carry no version, and the backend would
    run its own default version), so its version is always written for the backend."""
    return variant.backend_model != route.model or bool(variant.backend_version or variant.version)


def _field(value: str) -> str:
    # Model names are checked, backend_model is not: anything but [A-Za-z0-9_.-] travels as %XX,
    # so "," stays the separator and the value stays a valid header value.
    return "".join(
        c
        if c.isascii() and (c.isalnum() or c in "_.-")
        else "".join(f"%{b:02X}" for b in c.encode())
        for c in value
    )


def rename_value(route: config_pb2.Route, variant: config_pb2.Variant, pinned: bool) -> str | None:
    """The RENAME_HEADER value a route sets for calls it sends to `variant` (`pinned`: the
    route of `model@version`, whose calls name the version): `backend_model,backend_version`
    (requests rewritten) and, when the answer must show other names, `,model,version` (answers
    rewritten too). None when nothing is rewritten: no buffering at all."""
    if not renamed(route, variant):
        return None
    if variant.backend_model == route.model and variant.backend_version == variant.version:
        # The public names are the backend's: only unpinned calls (no version) need the version
        # written, and answers never need a rewrite.
        return None if pinned else f"{_field(variant.backend_model)},{variant.backend_version}"
    parts = (variant.backend_model, variant.backend_version, route.model, variant.version)
    return ",".join(_field(p) for p in parts)


def backend_lua() -> str:
    """The upstream filter of every backend cluster: it renames per call, from RENAME_HEADER."""
    return "local V = nil\n" + lua_source("variant.lua")


def shadow_lua(route: config_pb2.Route, variant: config_pb2.Variant) -> str | None:
    """The upstream filter of a shadow's own cluster: its names as constants (a mirrored copy
    carries the primary's headers, RENAME_HEADER included, which this filter ignores). None for
    a variant the backend knows by its public name and version."""
    if not renamed(route, variant):
        return None
    constants = {
        "model": route.model,
        "version": variant.version,
        "backend_model": variant.backend_model,
        "backend_version": variant.backend_version,
    }
    fields = ", ".join(f"{k} = {lua_string(v)}" for k, v in constants.items())
    if variant.backend_model == route.model and variant.backend_version == variant.version:
        # Public names are the backend's: only unpinned calls (no version) need the rewrite, and
        # answers never do. The filter knows a pinned call by the route key the listener set.
        fields += f", pinned_key = {lua_string(f'{route.model}@{variant.version}')}"
    return f"local V = {{{fields}}}\n" + lua_source("variant.lua")


def retry_class(settings) -> str:
    """What a route's retry policy puts on its clusters (circuit_breakers.retry_budget), as part
    of their name: routes on one backend share a cluster only when these agree. Empty when the
    route does not retry by policy (fallback-only retries keep Envoy's default max_retries)."""
    if settings.retry.max_attempts <= 1:
        return ""
    return f"rb{settings.retry.budget_ratio * 100:g}-{int(settings.retry.budget_min_per_second)}"


def build_cluster(
    name: str,
    address: str,
    *,
    upstream_lua: str | None = None,
    connect_timeout: float = 5.0,
    buffer_limit: int = 0,
    stat_name: str = "",
    eds_name: str = "",
    http1: bool = False,
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment | None]:
    """An HTTP/2 cluster of one address (HTTP/1.1 with `http1`: REST backends such as Triton's
    HTTP endpoint speak nothing else): EDS for an IP (endpoints pushed over ADS, one
    ClusterLoadAssignment per backend, `eds_name`, shared by every cluster on it: a few
    EDS resources however many routes), STRICT_DNS for a host name (Envoy resolves it)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        alt_stat_name=envoy_stat_name(stat_name or name),
        connect_timeout=duration(connect_timeout),
    )
    if buffer_limit:
        # What the upstream filter may buffer to rename a request or an answer.
        cluster.per_connection_buffer_limit_bytes.value = buffer_limit
    assignment = load_assignment(eds_name or name, address)
    endpoints = None
    if is_ip(split_address(address)[0]):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(ads_source())
        if eds_name:
            cluster.eds_cluster_config.service_name = eds_name
        endpoints = assignment
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(assignment)
    options = protocol_options(http1)
    if upstream_lua is not None:
        add_upstream_lua(options, upstream_lua)
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(packed(options))
    # An ejected (breaker-open) variant must get no calls: never "panic" back onto it.
    cluster.common_lb_config.healthy_panic_threshold.value = 0
    return cluster, endpoints


def protocol_options(http1: bool = False) -> http_protocol_options_pb2.HttpProtocolOptions:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    if http1:
        options.explicit_http_config.http_protocol_options.SetInParent()
    else:
        options.explicit_http_config.http2_protocol_options.CopyFrom(http2())
    return options


def add_upstream_lua(options: http_protocol_options_pb2.HttpProtocolOptions, lua: str) -> None:
    options.http_filters.add(
        name="envoy.filters.http.lua",
        typed_config=packed(lua_pb2.Lua(default_source_code={"inline_string": lua})),
    )
    options.http_filters.add(
        name="envoy.filters.http.upstream_codec",
        typed_config=packed(upstream_codec_pb2.UpstreamCodec()),
    )


def outlier_breaker(cluster: cluster_pb2.Cluster, backend: config_pb2.Backend, config) -> None:
    """The backend's breaker as outlier detection and its bulkhead as circuit_breakers."""
    b = breaker_settings(backend, config.defaults.circuit_breaker)
    if not b.disabled:
        od = outlier_detection_pb2.OutlierDetection()
        od.consecutive_5xx.value = b.consecutive_failures
        od.enforcing_consecutive_5xx.value = 100
        od.enforcing_consecutive_gateway_failure.value = 0
        od.enforcing_success_rate.value = 0
        od.base_ejection_time.CopyFrom(duration(b.open_duration))
        # Never longer than the breaker's open_duration: Envoy multiplies the ejection time by
        # the number of recent ejections, while the gateway's breaker admits a trial call after
        # open_duration every time (a recovered backend waited up to 4 s more through Envoy in
        # the chaos run: docs/reliability.md).
        od.max_ejection_time.CopyFrom(duration(b.open_duration))
        od.max_ejection_percent.value = 100
        od.interval.CopyFrom(duration(min(b.window, 1.0)))
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


def upstream_tls(
    server_name: str, ca_file: str, cert_file: str = "", key_file: str = "", alpn: str = "h2"
) -> base_pb2.TransportSocket:
    """Envoy's TLS to an upstream: its certificate chain checked against `ca_file` and its
    subject alternative names against `server_name`; a client certificate when given."""
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    # The protocol announced in the handshake: h2 as gRPC's own clients do (http/1.1 to a REST
    # listener).
    common.alpn_protocols.append(alpn)
    if cert_file:
        certificate = common.tls_certificates.add()
        certificate.certificate_chain.filename = cert_file
        certificate.private_key.filename = key_file
    validation = common.validation_context
    validation.trusted_ca.filename = ca_file
    # Any certificate the CA signed is not enough: it must name the upstream.
    san = validation.match_typed_subject_alt_names.add()
    san.matcher.exact = server_name
    if is_ip(server_name):
        san.san_type = common_pb2.SubjectAltNameMatcher.IP_ADDRESS
    else:
        san.san_type = common_pb2.SubjectAltNameMatcher.DNS
        context.sni = server_name  # SNI carries host names only (RFC 6066), never an IP
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.tls", typed_config=packed(context)
    )


def build_aggregate(
    name: str, members: list[str], lua: str | None, buffer_limit: int, http1: bool = False
) -> cluster_pb2.Cluster:
    """Priority i is members[i]: retries walk down it (previous_priorities), and so does load
    while a member's hosts are ejected. Requests run the upstream filter of members[0]'s variant
    (the one the route picked), which is why fallbacks must ask for the same backend model.
    Connections (HTTP/2, timeouts) are the members' own."""
    cluster = cluster_pb2.Cluster(
        name=name, alt_stat_name=envoy_stat_name(name), connect_timeout=duration(5.0)
    )
    cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    cluster.cluster_type.CopyFrom(
        cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate",
            typed_config=packed(aggregate_pb2.ClusterConfig(clusters=members)),
        )
    )
    if lua is not None:
        if buffer_limit:
            cluster.per_connection_buffer_limit_bytes.value = buffer_limit
        options = protocol_options(http1)
        add_upstream_lua(options, lua)
        cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(packed(options))
    return cluster


def retry_budget(cluster: cluster_pb2.Cluster, settings) -> None:
    """The route's retry budget on a cluster it retries on (both listeners). Envoy bounds
    retries in flight per cluster: budget_percent of the cluster's active requests, so on a
    shared backend cluster the budget spans every route of the same retry_class."""
    if settings.retry.max_attempts > 1:
        budget = cluster.circuit_breakers.thresholds[0].retry_budget
        budget.budget_percent.value = settings.retry.budget_ratio * 100
        budget.min_retry_concurrency.value = int(settings.retry.budget_min_per_second)


def route_limits(cluster: cluster_pb2.Cluster, variant: config_pb2.Variant, settings) -> None:
    """What a route's policy bounds on a shadow's own cluster (both listeners): the retry
    budget when it retries, and the shadow's max_concurrency."""
    retry_budget(cluster, settings)
    if settings.shadow is not None and variant.name == settings.shadow.variant:
        cluster.circuit_breakers.thresholds[0].max_requests.value = settings.shadow.max_concurrency


def add_cluster(clusters: dict, endpoints: dict, cluster, assignment) -> None:
    """Put a built cluster (and its EDS assignment, if any) in the resources being assembled."""
    clusters[cluster.name] = cluster
    if assignment is not None:
        endpoints[assignment.cluster_name] = assignment


def fallback_chains(route: config_pb2.Route, settings, slot: dict[str, str]):
    """(variant, clusters in priority order) per variant of a route with variant fallbacks:
    the variant's own cluster, then each fallback's but itself. Nothing without fallbacks."""
    fallback = [s.variant for s in settings.fallback if s.WhichOneof("step") == "variant"]
    if not fallback:
        return
    for variant in route.variants:
        yield variant, [slot[variant.name]] + [slot[f] for f in fallback if f != variant.name]
