"""The Aggregated Discovery Service (state of the world) that Envoys connect to.

One `XdsServer` holds the latest compiled `Resources` (a snapshot) and one `_Stream` per
connected Envoy. A new snapshot wakes every stream; each stream then moves its Envoy to it in
an order that never lets a route name a cluster the Envoy does not have:

1. CDS: the union of the clusters the Envoy has and the new ones (nothing it still routes to
   disappears), then EDS for what it subscribes to, and RTDS (the weights layer);
2. once those are ACKed: LDS, SRDS (the route table's scopes) and RDS (its shards);
3. once every shard is ACKed: CDS again with exactly the new clusters (unused ones removed).

RDS goes one route configuration per response, and only those whose content the Envoy does not
have: a state-of-the-world response for RDS may carry a subset of the subscribed resources,
and Envoy updates only those (the xDS protocol: only Listener and Cluster responses must hold
every resource). So a model added is one shard of the route table, not all of it; and each
route configuration's version is its own content hash.

At most one response per type is unanswered at a time. An ACK records the version; a NACK
(error_detail set) is logged and counted (`tensorgate_xds_nacks_total`) and the stream waits for
the next snapshot: the same push is never sent again, so a config Envoy rejects cannot loop.
Versions are content hashes, so an unchanged type is never re-sent (a weight change is one RTDS
push: the routes read their weights from the runtime layer).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import prometheus_client as prom
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from gateway.controlplane.envoy.compile import Resources
from gateway.controlplane.envoy.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    RUNTIME,
    SCOPED,
    TYPES,
    content_version,
)
from gateway.observability.logs import cut

log = logging.getLogger(__name__)

# Any client that reaches the port names itself: an Envoy's node id is a short name, so it is
# kept (for logs and listeners) at most this long, not as the megabytes a client may send.
NODE_ID_CHARS = 128

_WILDCARD = (CLUSTER, LISTENER, SCOPED)
_SHORT = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    RUNTIME: "rtds",
    LISTENER: "lds",
    SCOPED: "srds",
    ROUTE: "rds",
}


class XdsMetrics:
    def __init__(self, registry: prom.CollectorRegistry | None) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.pushes = prom.Counter(
            "tensorgate_xds_pushes", "xDS responses sent to Envoys, by type.", ("type",), **kwargs
        )
        self.acks = prom.Counter(
            "tensorgate_xds_acks", "xDS responses Envoys accepted, by type.", ("type",), **kwargs
        )
        self.nacks = prom.Counter(
            "tensorgate_xds_nacks",
            "xDS responses Envoys rejected (NACK), by type; never re-sent.",
            ("type",),
            **kwargs,
        )
        self.streams = prom.Gauge(
            "tensorgate_xds_connected_envoys", "Envoys connected to the ADS server.", **kwargs
        )
        self.snapshot = prom.Gauge(
            "tensorgate_xds_snapshot", "Number of the route table snapshot being served.", **kwargs
        )


@dataclass
class _Sent:
    version: str
    nonce: str
    names: frozenset[str]
    resources: dict  # name -> message, what this response carried


@dataclass(eq=False)
class _Stream:
    node: str = ""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: list = field(default_factory=list)
    subscribed: dict[str, frozenset[str] | None] = field(default_factory=dict)
    pending: dict[str, _Sent] = field(default_factory=dict)  # sent, not yet (N)ACKed
    acked: dict[str, _Sent] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # type -> version NACKed
    last_sent: dict[str, _Sent] = field(default_factory=dict)
    routes_have: dict[str, str] = field(default_factory=dict)  # route config -> version ACKed
    routes_rejected: dict[str, str] = field(default_factory=dict)  # route config -> NACKed


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.metrics = XdsMetrics(registry)
        self.snapshot: Resources | None = None
        self.number = 0
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)
        self._pack_cache: dict[tuple[str, str], list[any_pb2.Any]] = {}
        # Each route configuration's content version, by the identity of the message (compiled
        # messages are never changed; an unchanged shard is the same object): the route table
        # is checked shard by shard on every ACK.
        self._route_versions: dict[int, tuple[object, str]] = {}
        self.listeners: list[Callable[[str, str, str, str], None]] = []  # (node, type, ver, what)

    # --- snapshots ---------------------------------------------------------------------------

    def set_snapshot(self, resources: Resources) -> None:
        """Serve `resources` from now on; every connected Envoy is moved to them."""
        self.snapshot = resources
        current = {id(r) for r in resources.by_type.get(ROUTE, {}).values()}
        self._route_versions = {k: v for k, v in self._route_versions.items() if k in current}
        self.number += 1
        self.metrics.snapshot.set(self.number)
        for stream in self._streams:
            stream.wake.set()

    # --- the RPC -----------------------------------------------------------------------------

    async def StreamAggregatedResources(self, request_iterator, context):
        stream = _Stream()
        self._streams.add(stream)
        self.metrics.streams.inc()
        reader = asyncio.create_task(self._read(request_iterator, stream))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if reader.done():
                    return
                while stream.inbox:
                    self._handle(stream, stream.inbox.pop(0))
                for response in self._due(stream):
                    await context.write(response)
        finally:
            reader.cancel()
            self._streams.discard(stream)
            self.metrics.streams.dec()
            log.info("xds: Envoy %s disconnected", stream.node or "?")

    async def _read(self, request_iterator, stream: _Stream) -> None:
        try:
            async for request in request_iterator:
                stream.inbox.append(request)
                stream.wake.set()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            stream.wake.set()

    def _handle(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> None:
        type_url = request.type_url
        if type_url not in TYPES:
            log.debug("xds: ignoring request for %s", type_url)
            return
        if request.node.id and not stream.node:
            stream.node = cut(request.node.id, NODE_ID_CHARS)
            log.info("xds: Envoy %s connected", stream.node)
        short = _SHORT[type_url]
        names = frozenset(request.resource_names)
        subscribed = None if type_url in _WILDCARD and not names else names
        pending = stream.pending.get(type_url)
        if request.response_nonce:
            if pending is None or request.response_nonce != pending.nonce:
                # A reply to a response we have since replaced: only the latest one counts.
                stream.subscribed[type_url] = subscribed
                return
            del stream.pending[type_url]
            if request.HasField("error_detail"):
                self.metrics.nacks.labels(short).inc()
                stream.rejected[type_url] = pending.version
                log.warning(
                    "xds: Envoy %s REJECTED %s version %s: %s",
                    stream.node,
                    short,
                    pending.version,
                    request.error_detail.message[:500],
                )
                self._notify(stream, type_url, pending.version, "nack")
                if type_url == ROUTE:
                    stream.routes_rejected.update(dict.fromkeys(pending.names, pending.version))
            else:
                self.metrics.acks.labels(short).inc()
                stream.acked[type_url] = pending
                if type_url == ROUTE:
                    stream.routes_have.update(dict.fromkeys(pending.names, pending.version))
                self._notify(stream, type_url, pending.version, "ack")
        stream.subscribed[type_url] = subscribed

    def _notify(self, stream: _Stream, type_url: str, version: str, what: str) -> None:
        for listener in self.listeners:
            listener(stream.node, _SHORT[type_url], version, what)

    def _packed(self, type_url: str, version: str, resources: dict) -> list[any_pb2.Any]:
        """The resources packed once per content version, shared by every Envoy's stream (a
        fleet costs one serialization of a large route table, not one per Envoy)."""
        key = (type_url, version)
        packed = self._pack_cache.get(key)
        if packed is None:
            packed = []
            for _, resource in sorted(resources.items()):
                item = any_pb2.Any()
                item.Pack(resource)
                packed.append(item)
            if len(self._pack_cache) >= 16:
                self._pack_cache.pop(next(iter(self._pack_cache)))
            self._pack_cache[key] = packed
        return packed

    # --- what to send next ---------------------------------------------------------------------

    def _due(self, stream: _Stream) -> list[discovery_pb2.DiscoveryResponse]:
        snap = self.snapshot
        if snap is None:
            return []
        out = []
        new_clusters = snap.by_type.get(CLUSTER, {})
        routed = snap.cluster_names_referenced()
        routes_current = all(
            self._is_current(stream, t, snap)
            for t in (LISTENER, SCOPED, ROUTE)
            if t in stream.subscribed
        )
        # 1. clusters: keep the ones the Envoy's current routes may still use until routes move.
        clusters = dict(new_clusters)
        if not routes_current and CLUSTER in stream.last_sent:
            for name, cluster in stream.last_sent[CLUSTER].resources.items():
                clusters.setdefault(name, cluster)
        out += self._offer(stream, CLUSTER, clusters)
        endpoints = snap.by_type.get(ENDPOINT, {})
        if CLUSTER in stream.last_sent:
            for name, assignment in stream.last_sent.get(ENDPOINT, _EMPTY).resources.items():
                if name in clusters and name not in endpoints:
                    endpoints = {**endpoints, name: assignment}
        out += self._offer(stream, ENDPOINT, endpoints)
        out += self._offer(stream, RUNTIME, snap.by_type.get(RUNTIME, {}))
        # 2. listener and routes, once every cluster they name is ACKed (with its endpoints),
        # and the weights they read.
        acked_clusters = stream.acked.get(CLUSTER)
        acked_endpoints = stream.acked.get(ENDPOINT, _EMPTY).resources.keys()
        if (
            CLUSTER not in stream.pending
            and ENDPOINT not in stream.pending
            and RUNTIME not in stream.pending
            and acked_clusters is not None
            and routed <= acked_clusters.resources.keys()
            # an EDS cluster warms until its endpoints arrive: routes wait for them too
            and snap.by_type.get(ENDPOINT, {}).keys() <= acked_endpoints
        ):
            out += self._offer(stream, LISTENER, snap.by_type.get(LISTENER, {}))
            out += self._offer(stream, SCOPED, snap.by_type.get(SCOPED, {}))
            out += self._offer_route(stream, snap.by_type.get(ROUTE, {}))
        return out

    def _offer_route(self, stream: _Stream, resources: dict) -> list:
        """One route configuration the Envoy subscribed to and does not have at this content
        (nor rejected), alone in a response whose version is its content hash; [] when it has
        them all."""
        if ROUTE not in stream.subscribed or ROUTE in stream.pending:
            return []
        for name in sorted(stream.subscribed[ROUTE] or resources):
            if name not in resources:
                continue
            one = {name: resources[name]}
            version = self._route_version(name, resources[name])
            if version in (stream.routes_have.get(name), stream.routes_rejected.get(name)):
                continue
            return self._respond(stream, ROUTE, one, version, frozenset({name}))
        return []

    def _route_version(self, name: str, resource) -> str:
        hit = self._route_versions.get(id(resource))
        if hit is None or hit[0] is not resource:
            hit = (resource, content_version({name: resource}, remember=False))
            self._route_versions[id(resource)] = hit
        return hit[1]

    def _is_current(self, stream: _Stream, type_url: str, snap: Resources) -> bool:
        if type_url == ROUTE:
            wanted = stream.subscribed.get(ROUTE) or frozenset()
            return all(
                stream.routes_have.get(name) == self._route_version(name, resource)
                for name, resource in snap.by_type.get(ROUTE, {}).items()
                if name in wanted
            )
        acked = stream.acked.get(type_url)
        return acked is not None and acked.version == _version(snap.by_type.get(type_url, {}))

    def _offer(self, stream: _Stream, type_url: str, resources: dict) -> list:
        """A response for `type_url` if the Envoy subscribed, has none unanswered, and does not
        have (or has not rejected) exactly this content."""
        if type_url not in stream.subscribed or type_url in stream.pending:
            return []
        wanted = stream.subscribed[type_url]
        if wanted is not None:
            resources = {n: r for n, r in resources.items() if n in wanted}
        version = _version(resources)
        last = stream.last_sent.get(type_url)
        if last is not None and last.version == version and last.names == (wanted or frozenset()):
            return []
        if stream.rejected.get(type_url) == version:
            return []
        return self._respond(stream, type_url, resources, version, wanted or frozenset())

    def _respond(self, stream, type_url, resources, version, names) -> list:
        nonce = str(next(self._nonces))
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce
        )
        response.resources.extend(self._packed(type_url, version, resources))
        sent = _Sent(version, nonce, names, dict(resources))
        stream.pending[type_url] = sent
        stream.last_sent[type_url] = sent
        self.metrics.pushes.labels(_SHORT[type_url]).inc()
        self._notify(stream, type_url, version, "push")
        return [response]


_EMPTY = _Sent("", "", frozenset(), {})


def _version(resources: dict) -> str:
    return content_version(resources)


async def serve(
    address: str, server: XdsServer, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server for `server` on `address` (TLS with `credentials`: envoy.xds_tls,
    read by the gateway, app.server_credentials); returns it and the bound port."""
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            # Envoys keep one stream open for hours: let their keepalive pings through.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(server, grpc_server)
    try:
        if credentials is not None:
            port = grpc_server.add_secure_port(address, credentials)
        else:
            port = grpc_server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        why = "address in use?"
        if credentials is not None:
            why = "address in use, or envoy.xds_tls's key does not match its certificate?"
        raise OSError(f"cannot listen on {address} (listeners.xds): {why}")
    await grpc_server.start()
    log.info(
        "xds: ADS serving on %s (%s)",
        address.rpartition(":")[0] + f":{port}",
        "TLS" if credentials is not None else "plaintext",
    )
    return grpc_server, port
