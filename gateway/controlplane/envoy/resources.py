"""The vocabulary every Envoy resource shares: type URLs, resource and cluster names, the
headers and runtime keys that tie routes to clusters, content versions, and small builders.
"""

from __future__ import annotations

import hashlib
import ipaddress
import pathlib

from envoy.config.core.v3 import address_pb2, config_source_pb2
from google.protobuf import any_pb2, message

from gateway.dataplane.routing import BACKEND_TRAILER, VARIANT_TRAILER

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"


SCOPED = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"


TYPES = (CLUSTER, ENDPOINT, RUNTIME, LISTENER, SCOPED, ROUTE)  # the order pushes go out in


# Variant weights live in an RTDS runtime layer, not in the routes: each weighted route names
# its runtime keys (runtime_key_prefix) and Envoy reads the weights per request. A weight
# change, rollout step, drain or probe result is then one small RTDS push instead of the whole
# route table (30,000 routes at 10,000 models: 9.5 MB, seconds for Envoy to rebuild).
WEIGHTS_LAYER = "tensorgate_weights"


LISTENER_NAME = "tensorgate"


ROUTE_NAME = "tensorgate"


# The gRPC listener's route table is split into SHARDS route configurations (scoped routes,
# SRDS): a model's routes live in shard `shard_of(model)`, which the listener's Lua filter
# computes from the body's model name and puts in SHARD_HEADER, the scope key. A route change
# (a model added, a policy changed) is then one shard pushed over RDS, not the whole table
# (17 MB and seconds for Envoy to rebuild at 10,000 models). Fixed: changing it moves every
# model, and the Lua filter carries it.
SHARDS = 64


SHARD_HEADER = "x-tensorgate-shard"


def shard_of(model: str) -> int:
    """The shard of a model's routes. lua/model.lua computes the same number from the same
    bytes: a polynomial hash kept below 2^31, so every step is exact in Lua's doubles."""
    h = 0
    for b in model.encode():
        h = (h * 31 + b) % 2147483647
    return h % SHARDS


def shard_route_name(shard: int) -> str:
    return f"{ROUTE_NAME}_{shard:02d}"


def scope_name(shard: int) -> str:
    return f"{ROUTE_NAME}_scope_{shard:02d}"


GATEWAY_CLUSTER = "tensorgate_gateway"


# The KServe v2 REST listener (envoy.rest_listen; gateway/controlplane/envoy/rest.py), its route
# configuration, and the cluster of the gateway's REST listener (envoy.gateway_rest_address).
REST_LISTENER_NAME = "tensorgate_rest"


REST_ROUTE_NAME = "tensorgate_rest"


REST_GATEWAY_CLUSTER = "tensorgate_gateway_rest"


# Set by the REST listener's Lua filter (rest.lua) on a call it will not let Envoy serve: the
# route table then sends it to the gateway. A caller may send it too; it only ever hands a call
# to the gateway, which answers anything.
REST_HAND_OVER_HEADER = "x-tensorgate-rest-gateway"


VARIANT_HEADER = VARIANT_TRAILER  # the same trailers as the Python data plane


BACKEND_HEADER = BACKEND_TRAILER


# Set by the listener's Lua filter (model.lua) on ModelInfer calls from the body, always
# replacing a caller's: `model@version` or `model`, the key of the route table's match table.
ROUTE_HEADER = "x-tensorgate-route"


_LUA = pathlib.Path(__file__).parent / "lua"


_versions: dict[tuple, tuple[dict, str]] = {}


def content_version(resources: dict[str, message.Message], remember: bool = True) -> str:
    """A content hash of {name: resource}. Remembered for the last few dicts (by the identity
    of their resources, which are never changed once compiled): the ADS server asks for the
    version of all clusters on every ACK, and hashing thousands costs tens of ms. `remember`
    False: computed, not kept (for callers that keep their own)."""
    key = tuple(sorted((name, id(r)) for name, r in resources.items()))
    hit = _versions.get(key)
    if hit is not None:
        return hit[1]
    digest = hashlib.sha256()
    for name, resource in sorted(resources.items()):
        digest.update(name.encode())
        digest.update(resource.SerializeToString(deterministic=True))
    version = digest.hexdigest()[:16]
    if not remember:
        return version
    if len(_versions) >= 32:
        _versions.pop(next(iter(_versions)))
    _versions[key] = (tuple(resources.values()), version)  # held: their ids stay theirs
    return version


# Set per call by the route (the weighted cluster entry the router picked, or the route) and
# read by the backend cluster's upstream filter (lua/variant.lua): the backend's model and version
# to write into the request, and the public ones for the answer. Envoy's own: the listener drops
# a caller's before anything reads it (listener.early_mutations).
RENAME_HEADER = "x-tensorgate-rename"


def backend_cluster(backend: str, slot: int, retry_class: str = "") -> str:
    """The cluster of a backend, shared by every route on it. `slot`: the variant's place among
    its route's variants on that backend (0, 1, ...): a weighted route names each of its
    clusters once, since Envoy reads a weighted cluster's weight from the runtime key
    `<runtime_key_prefix>.<cluster name>` (WeightedCluster.runtime_key_prefix), so two variants
    of one route on one backend need two names. `retry_class`: the retry budget the cluster's
    circuit_breakers carry (clusters.retry_class), empty for none."""
    name = f"tgb|{backend}|{slot}"
    return f"{name}|{retry_class}" if retry_class else name


def aggregate_cluster(members: list[str]) -> str:
    """A fallback chain of backend clusters (priority i = members[i]), shared by every route
    whose chain is the same."""
    return "tga|" + ",".join(members)


def shadow_cluster(model: str, variant: str) -> str:
    """A shadow variant's own cluster: mirrored copies carry the primary's headers, and the
    shadow's max_concurrency bounds its copies alone."""
    return f"tgs|{model}|{variant}"


def rest_backend_cluster(backend: str, slot: int, retry_class: str, rewrites: bool) -> str:
    """A backend's REST cluster (its rest_address), shared as backend_cluster is; `rewrites`:
    the one whose upstream filter writes the path a route's entry names (REST_PATH_HEADER)."""
    name = f"tgrb|{backend}|{slot}" + (f"|{retry_class}" if retry_class else "")
    return name + "|p" if rewrites else name


def rest_aggregate_cluster(members: list[str]) -> str:
    return "tgra|" + ",".join(members)


def rest_shadow_cluster(model: str, variant: str) -> str:
    return f"tgrs|{model}|{variant}"


# Set by a REST route's entry for a variant whose cluster writes the path (rest.py), read by
# that cluster's upstream filter (lua/rest_path.lua). Envoy's own: the REST listener removes a
# caller's as the request arrives.
REST_PATH_HEADER = "x-tensorgate-rest-path"


def infer_path(model: str, version: str = "") -> str:
    """The KServe v2 REST inference path of a model (and version). Model names and versions are
    URL-safe as checked (letters, digits, `_.-`; decimal versions), so this is the path a client
    sends, byte for byte."""
    if version:
        return f"/v2/models/{model}/versions/{version}/infer"
    return f"/v2/models/{model}/infer"


def envoy_stat_name(name: str) -> str:
    # Envoy splits stat names at dots; model and variant names may contain them.
    return name.replace(".", "_")


def packed(msg: message.Message) -> any_pb2.Any:
    wrapped = any_pb2.Any()
    wrapped.Pack(msg)
    return wrapped


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def socket_address(address: str) -> address_pb2.Address:
    host, port = split_address(address)
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def lua_string(value: str) -> str:
    return '"' + "".join(c if c.isalnum() or c in "_.-" else f"\\{ord(c):03d}" for c in value) + '"'


def lua_source(name: str) -> str:
    return (_LUA / name).read_text(encoding="utf-8")


def runtime_key(route_name: str, cluster: str) -> str:
    return f"tgw.{route_name}.{cluster}"
