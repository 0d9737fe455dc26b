"""Envoy mode (issue 10): the gateway compiles its route table into Envoy resources and serves
them over ADS; a real Envoy 1.40 (tools venv) carries stock tritonclient calls to a real Triton.

One stack for the module: Triton (session fixture), `tensorgate serve` with listeners.xds and the
admin API, one Envoy bootstrapped by `tensorgate envoy-bootstrap`. Pure parts (compile, the ADS
state machine) are tested without processes at the top.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from gateway.controlplane.config import ConfigError, from_dict
from gateway.controlplane.envoy import ads
from gateway.controlplane.envoy.bootstrap import bootstrap, render
from gateway.controlplane.envoy.compile import Compiler, compile_config
from gateway.controlplane.envoy.control import ControlPlane
from gateway.controlplane.envoy.decide import decide
from gateway.controlplane.envoy.listener import grpc_routes
from gateway.controlplane.envoy.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    RUNTIME,
    SCOPED,
    SHARDS,
    WEIGHTS_LAYER,
    content_version,
    shard_of,
    shard_route_name,
)
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.backends.process import BackendProcess, free_port, tool
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess, triton_backend
from tests.oip import Y_V1, Y_V2, X, linear_request, output, sleep_request

TENSORGATE = Path(sys.executable).parent / "tensorgate"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
INFER = "/inference.GRPCInferenceService/ModelInfer"


def linear_routes(triton: str = "triton-a") -> list[dict]:
    def v(name, version, backend_version, weight):
        return {
            "name": name,
            "backend": triton,
            "backend_model": "demo_linear",
            "backend_version": backend_version,
            "version": version,
            "weight": weight,
        }

    return [
        {"model": "linear", "variants": [v("stable", "1", "1", 80), v("canary", "2", "2", 20)]},
        {"model": "flip", "variants": [v("a", "1", "1", 100), v("b", "2", "2", 0)]},
        {
            # The primary's backend is down: retries walk the aggregate cluster to "up".
            "model": "guarded",
            "variants": [
                {
                    "name": "down",
                    "backend": "dead",
                    "backend_model": "demo_linear",
                    "backend_version": "1",
                    "weight": 100,
                },
                v("up", "", "1", 0),
            ],
            "policy": {"fallback": [{"variant": "up"}]},
        },
        {
            "model": "mirrored",
            "variants": [v("main", "", "1", 1), v("copy", "", "2", 0)],
            "policy": {"shadow": {"variant": "copy", "fraction": 1.0}},
        },
        {
            "model": "sleep",
            "variants": [
                {"name": "s", "backend": triton, "backend_model": "demo_sleep", "weight": 1}
            ],
        },
        {"model": "via_gateway", "variants": [v("only", "", "1", 1)]},
        {
            # per-try timeout 0.3 s (backend "impatient"), three tries, DEADLINE_EXCEEDED retried
            "model": "slow",
            "variants": [
                {"name": "s", "backend": "impatient", "backend_model": "demo_sleep", "weight": 1}
            ],
            "policy": {
                "retry": {
                    "max_attempts": 3,
                    "retry_on": ["UNAVAILABLE", "DEADLINE_EXCEEDED"],
                    "base_delay": "0.01s",
                }
            },
        },
        {
            # two backends (the same Triton under two names): a drain moves all calls to "y"
            "model": "drainable",
            "variants": [
                v("x", "", "1", 50),
                {**v("y", "", "1", 50), "backend": "impatient"},
            ],
        },
        # not renamed: the upstream filter never buffers it
        {"model": "demo_linear", "variants": [{"name": "plain", "backend": triton, "weight": 1}]},
    ]


def stack_config(triton_address: str, xds: int, listen: int, max_body: int) -> dict:
    return {
        "listeners": {"xds": f"127.0.0.1:{xds}"},
        "envoy": {
            "listen": f"127.0.0.1:{listen}",
            "max_body_bytes": max_body,
            "gateway_routes": ["via_gateway"],
        },
        "backends": [
            triton_backend(triton_address),
            {
                **triton_backend(triton_address, "impatient"),
                "per_try_timeout": "0.3s",
                "circuit_breaker": {"disabled": True},  # this test is about retries
            },
            {
                "name": "dead",
                "kind": "BACKEND_KIND_TRITON",
                "address": f"127.0.0.1:{free_port()}",
                "per_try_timeout": "1s",
                "connection": {"connect_timeout": "0.25s"},
                "circuit_breaker": {"consecutive_failures": 2, "open_duration": "60s"},
            },
        ],
        "routes": linear_routes(),
    }


# --- compile: pure --------------------------------------------------------------------------


def test_compile_decides_the_path_per_route_and_says_why():
    config = from_dict(
        {
            "listeners": {"xds": "127.0.0.1:18000"},
            "backends": [
                triton_backend("127.0.0.1:1"),
                {"name": "ts", "kind": "BACKEND_KIND_TORCHSERVE", "address": "127.0.0.1:2"},
            ],
            "routes": [
                *linear_routes()[:1],
                {"model": "torch", "variants": [{"name": "a", "backend": "ts", "weight": 1}]},
                {
                    "model": "static",
                    "variants": [{"name": "a", "backend": "triton-a", "weight": 1}],
                    "policy": {
                        "fallback": [
                            {
                                "static_response": {
                                    "outputs": [
                                        {
                                            "name": "y",
                                            "datatype": "FP32",
                                            "shape": [1],
                                            "fp_values": [0],
                                        }
                                    ]
                                }
                            }
                        ]
                    },
                },
                {
                    "model": "hedged",
                    "variants": [{"name": "a", "backend": "triton-a", "weight": 1}],
                    "policy": {"hedge": {"delay": "0.05s"}},
                },
            ],
        }
    )
    paths = {d.model: (d.path, " ".join(d.reasons)) for d in decide(config)}
    assert paths["linear"][0] == "envoy"
    assert paths["torch"][0] == "gateway" and "TORCHSERVE" in paths["torch"][1]
    assert paths["static"][0] == "gateway" and "static_response" in paths["static"][1]
    assert paths["hedged"][0] == "gateway" and "hedge" in paths["hedged"][1]
    resources = compile_config(config)
    clusters = resources.by_type[CLUSTER]
    # one cluster per backend and slot (a route's first, second, ... variant on that backend)
    assert sorted(clusters) == [
        "tensorgate_gateway",
        "tgb|triton-a|0|rb20-5",
        "tgb|triton-a|1|rb20-5",
    ]
    routes = grpc_routes(resources.by_type[ROUTE])
    names = [r.name for r in routes]
    # pinned versions first, then unpinned, then everything else to the gateway
    assert names == ["linear@1", "linear@2", "linear", "gateway"]
    weighted = routes[2].route.weighted_clusters
    assert [c.name for c in weighted.clusters] == ["tgb|triton-a|0|rb20-5", "tgb|triton-a|1|rb20-5"]
    # each entry tells the shared cluster's upstream filter what to write for its variant
    assert [[(h.header.key, h.header.value) for h in c.request_headers_to_add]
            for c in weighted.clusters] == [
        [("x-tensorgate-rename", "demo_linear,1,linear,1")],
        [("x-tensorgate-rename", "demo_linear,2,linear,2")],
    ]  # fmt: skip
    # the weights are in the runtime layer the route names, not in the route
    assert weighted.runtime_key_prefix == "tgw.linear"
    layer = resources.by_type[RUNTIME][WEIGHTS_LAYER].layer
    assert {k: layer[k] for k in layer if k.startswith("tgw.linear.")} == {
        "tgw.linear.tgb|triton-a|0|rb20-5": 80,
        "tgw.linear.tgb|triton-a|1|rb20-5": 20,
    }
    assert weighted.use_hash_policy.value
    assert routes[2].route.hash_policy[0].header.header_name == "x-tensorgate-route-key"


def test_compile_is_deterministic_and_a_weight_change_only_changes_the_weights_layer():
    def build(weight):
        routes = linear_routes()[:1]
        routes[0]["variants"][1]["weight"] = weight
        config = {
            "listeners": {"xds": "127.0.0.1:18000"},
            "backends": [triton_backend("127.0.0.1:1")],
            "routes": routes,
        }
        return compile_config(from_dict(config))

    a, b, c = build(20), build(20), build(30)
    types = (CLUSTER, ENDPOINT, RUNTIME, LISTENER, SCOPED, ROUTE)
    for type_url in types:
        assert a.version(type_url) == b.version(type_url)
    assert [t for t in types if a.version(t) != c.version(t)] == [RUNTIME]
    # so does a variant leaving the split (a drain, a 100/0 flip)
    assert [t for t in types if a.version(t) != build(0).version(t)] == [RUNTIME]


def test_clusters_are_per_backend_not_per_variant_and_a_new_model_is_a_route_change():
    """Issue 24: at 10,000 routes of two variants, a cluster per variant cost each Envoy 1.6 GB.
    Clusters are per backend (and slot: a route's first, second, ... variant on it), shared by
    every route; the rename travels per call on the weighted cluster entry."""

    def table(n):
        def variant(name, version):
            return {
                "name": name,
                "backend": "triton-a",
                "backend_model": "demo_linear",
                "backend_version": version,
                "version": version,
                "weight": 50,
            }

        return {
            "listeners": {"xds": "127.0.0.1:18000"},
            "backends": [triton_backend("127.0.0.1:1")],
            "routes": [{"model": f"m{i}", "variants": [variant("a", "1"), variant("b", "2")]}
                       for i in range(n)],
        }  # fmt: skip

    compiler = Compiler()
    small, large = compile_config(from_dict(table(3))), compiler.compile(from_dict(table(300)))
    expected = ["tensorgate_gateway", "tgb|triton-a|0|rb20-5", "tgb|triton-a|1|rb20-5"]
    assert sorted(small.by_type[CLUSTER]) == sorted(large.by_type[CLUSTER]) == expected
    assert sorted(large.by_type[ENDPOINT]) == ["tensorgate_gateway", "tge|triton-a"]
    # one upstream filter per backend cluster, the same code for all: no names in it
    lua = {
        c.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].SerializeToString()
        for n, c in large.by_type[CLUSTER].items()
        if n.startswith("tgb|")
    }
    assert len(lua) == 1 and b"m299" not in lua.pop()
    routes = {r.name: r for r in grpc_routes(large.by_type[ROUTE])}
    renames = [
        [h.header.value for h in c.request_headers_to_add]
        for c in routes["m7"].route.weighted_clusters.clusters
    ]
    assert renames == [["demo_linear,1,m7,1"], ["demo_linear,2,m7,2"]]
    assert [h.header.value for h in routes["m7@2"].request_headers_to_add] == ["demo_linear,2,m7,2"]
    # a model added: the route table and the weights change, no cluster and no endpoint
    more = compiler.compile(from_dict(table(301)))
    changed = [
        t for t in (CLUSTER, ENDPOINT, LISTENER, SCOPED) if more.version(t) != large.version(t)
    ]
    assert changed == []
    # and of the route table, only the shard that holds the new model (scoped routes)
    shards = [n for n, c in more.by_type[ROUTE].items() if c is not large.by_type[ROUTE][n]]
    assert shards == [shard_route_name(shard_of("m300"))]
    assert len(more.by_type[ROUTE]) == SHARDS


def test_rename_values_say_only_what_must_be_rewritten():
    config = from_dict(
        {
            "listeners": {"xds": "127.0.0.1:18000"},
            "backends": [triton_backend("127.0.0.1:1")],
            "routes": [
                {"model": "same", "variants": [
                    {"name": "a", "backend": "triton-a", "version": "3", "backend_version": "3",
                     "weight": 1}]},
                {"model": "odd", "variants": [
                    {"name": "a", "backend": "triton-a", "backend_model": "x,y%z/é",
                     "weight": 1}]},
                {"model": "plain", "variants": [{"name": "a", "backend": "triton-a",
                                                 "weight": 1}]},
            ],
        }
    )  # fmt: skip
    routes = {r.name: r for r in grpc_routes(compile_config(config).by_type[ROUTE])}

    def rename(name):
        return [h.header.value for h in routes[name].request_headers_to_add]

    # public names are the backend's: a pinned call passes untouched, an unpinned one gets the
    # version written, and no answer is rewritten
    assert rename("same@3") == [] and rename("same") == ["same,3"]
    # separators and anything beyond [A-Za-z0-9_.-] escaped
    assert rename("odd") == ["x%2Cy%25z%2F%C3%A9,,odd,"]
    assert rename("plain") == []


def test_an_ejected_host_returns_after_the_breakers_open_duration():
    # Envoy multiplies the ejection time by the host's recent ejections up to max_ejection_time;
    # the gateway's breaker admits a trial after open_duration every time. With a cap of 300 s
    # a recovered backend stayed refused through Envoy for seconds (the chaos run).
    config = {
        "listeners": {"xds": "127.0.0.1:18000"},
        "backends": [{**triton_backend("127.0.0.1:1"),
                      "circuit_breaker": {"consecutive_failures": 3, "open_duration": "2s"}}],
        "routes": linear_routes()[:1],
    }  # fmt: skip
    clusters = compile_config(from_dict(config)).by_type[CLUSTER]
    guarded = [c for c in clusters.values() if c.HasField("outlier_detection")]
    assert guarded
    for cluster in guarded:
        od = cluster.outlier_detection
        assert od.base_ejection_time.ToTimedelta().total_seconds() == 2.0
        assert od.max_ejection_time.ToTimedelta().total_seconds() == 2.0


def _taking_traffic(resources, route) -> list[str]:
    """The clusters a compiled route sends calls to: its cluster, or its weighted clusters whose
    weight in the runtime layer is not 0."""
    if route.route.cluster:
        return [route.route.cluster]
    layer = resources.by_type[RUNTIME][WEIGHTS_LAYER].layer
    prefix = route.route.weighted_clusters.runtime_key_prefix
    return [c.name for c in route.route.weighted_clusters.clusters if layer[f"{prefix}.{c.name}"]]


def test_compile_fallback_variants_and_down_variants():
    base = {
        "listeners": {"xds": "127.0.0.1:18000"},
        "backends": [triton_backend("127.0.0.1:1"), {**triton_backend("127.0.0.1:2", "triton-b")}],
    }
    same = {
        "name": "b",
        "backend": "triton-b",
        "backend_model": "demo_linear",
        "backend_version": "1",
        "weight": 0,
    }
    other = {**same, "backend_model": "other"}
    primary = {
        "name": "a",
        "backend": "triton-a",
        "backend_model": "demo_linear",
        "backend_version": "1",
        "weight": 1,
    }
    policy = {"fallback": [{"variant": "b"}]}
    ok = from_dict(
        {**base, "routes": [{"model": "m", "variants": [primary, same], "policy": policy}]}
    )
    assert decide(ok)[0].path == "envoy"
    resources = compile_config(ok)
    chain = "tga|tgb|triton-a|0|rb20-5,tgb|triton-b|0|rb20-5"
    assert chain in resources.by_type[CLUSTER]
    route = grpc_routes(resources.by_type[ROUTE])[0]
    assert _taking_traffic(resources, route) == [chain]
    assert (
        route.route.retry_policy.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    )
    # a fallback that asks the backend for another model cannot share the primary's rename
    bad = from_dict(
        {**base, "routes": [{"model": "m", "variants": [primary, other], "policy": policy}]}
    )
    assert (
        decide(bad)[0].path == "gateway" and "fallback to variant 'b'" in decide(bad)[0].reasons[0]
    )
    # readiness: a down variant leaves the pick while a sibling can answer, never the last one
    two = from_dict(
        {**base, "routes": [{"model": "m", "variants": [primary, {**same, "weight": 1}]}]}
    )

    def picked(down):
        resources = compile_config(two, down)
        return _taking_traffic(resources, grpc_routes(resources.by_type[ROUTE])[0])

    a, b = "tgb|triton-a|0|rb20-5", "tgb|triton-b|0|rb20-5"
    assert picked(frozenset()) == [a, b]
    assert picked(frozenset({("triton-a", "demo_linear", "1")})) == [b]
    both = frozenset({("triton-a", "demo_linear", "1"), ("triton-b", "demo_linear", "1")})
    assert picked(both) == [a, b]
    # readiness moves weights only: the route table Envoys hold stays the same
    assert compile_config(two, frozenset({("triton-a", "demo_linear", "1")})).version(
        ROUTE
    ) == compile_config(two).version(ROUTE)


def test_config_keeps_xds_on_loopback_unless_asked():
    base = {"backends": [triton_backend("127.0.0.1:1")], "routes": linear_routes()[:1]}
    with pytest.raises(ConfigError, match=r"listeners\.xds"):
        from_dict({**base, "listeners": {"xds": "0.0.0.0:18000"}})
    from_dict({**base, "listeners": {"xds": "0.0.0.0:18000"}, "envoy": {"xds_on_network": True}})
    with pytest.raises(ConfigError, match=r"envoy: set listeners\.xds"):
        from_dict({**base, "envoy": {"listen": "127.0.0.1:1"}})
    # Envoy's TLS to the gateway must match the data plane's: TLS without gateway_tls ...
    tls = {"cert_file": "/x/cert.pem", "key_file": "/x/key.pem"}
    listeners = {"xds": "127.0.0.1:18000", "data_plane": "127.0.0.1:8001", "data_plane_tls": tls}
    with pytest.raises(ConfigError, match=r"envoy\.gateway_tls: .* serves TLS"):
        from_dict({**base, "listeners": listeners})
    gateway_tls = {"gateway_tls": {"ca_file": "/envoy/ca.pem"}}
    from_dict({**base, "listeners": listeners, "envoy": gateway_tls})
    # ... client certificates Envoy cannot present, gateway_tls towards a plaintext data plane
    with_clients = {**listeners, "data_plane_tls": {**tls, "client_ca_file": "/x/ca.pem"}}
    with pytest.raises(ConfigError, match=r"client_ca_file: Envoy mode"):
        from_dict({**base, "listeners": with_clients, "envoy": gateway_tls})
    plaintext = {"xds": "127.0.0.1:18000", "data_plane": "127.0.0.1:8001"}
    with pytest.raises(ConfigError, match=r"envoy\.gateway_tls: .* serves plaintext"):
        from_dict({**base, "listeners": plaintext, "envoy": gateway_tls})
    # Another gateway's data plane: its TLS is not known here.
    from_dict({**base, "listeners": listeners, "envoy": {"gateway_address": "127.0.0.1:8101"}})


def test_compiling_a_large_table_does_not_stall_the_event_loop():
    """The control plane compiles in a worker thread: while a table of 10,000 routes compiles
    (~2 s; 3,000 routes compile in 0.6 s since the table is sharded, too short for the bound
    below to tell a thread from the loop on a loaded machine), the event loop that serves the Python data plane keeps running."""

    async def run():
        plane = ControlPlane(CollectorRegistry())
        variant = {"backend": "triton-a", "backend_version": "1", "weight": 1}
        config = from_dict(
            {
                "listeners": {"xds": "127.0.0.1:18000"},
                "backends": [triton_backend("127.0.0.1:1")],
                "routes": [
                    {"model": f"m{i}", "variants": [{**variant, "name": n} for n in "ab"]}
                    for i in range(10000)
                ],
            }
        )
        lags, done = [], asyncio.Event()

        async def ticker():
            while not done.is_set():
                tick = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - tick - 0.01)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        plane.update(config)
        await plane.settled()
        compile_s = time.perf_counter() - started
        done.set()
        await ticking
        return compile_s, max(lags), plane.xds.number

    compile_s, worst_lag, snapshots = asyncio.run(run())
    print(f"\ncompile {compile_s:.2f} s, worst event-loop lag {worst_lag * 1000:.0f} ms")
    assert snapshots == 1
    # On the event loop the loop would stall for the whole compile; in a thread it only waits
    # for its turn at the GIL (a few switch intervals).
    assert worst_lag < max(0.2, compile_s / 5), (worst_lag, compile_s)


# --- the ADS state machine: pure ---------------------------------------------------------------


def ads_resource_name(resource) -> str:
    config = route_pb2.RouteConfiguration()
    resource.Unpack(config)
    return config.name


def _request(type_url, nonce="", names=(), error=None, version=""):
    request = discovery_pb2.DiscoveryRequest(
        type_url=type_url, response_nonce=nonce, resource_names=list(names), version_info=version
    )
    request.node.id = "test"
    if error:
        request.error_detail.message = error
    return request


def test_ads_pushes_clusters_before_routes_and_never_resends_a_nack():
    config = {
        "listeners": {"xds": "127.0.0.1:18000"},
        "backends": [triton_backend("127.0.0.1:1")],
        "routes": linear_routes()[:1],
    }
    server = ads.XdsServer(registry=CollectorRegistry())
    server.set_snapshot(compile_config(from_dict(config)))
    stream = ads._Stream()
    for type_url in (CLUSTER, LISTENER):
        server._handle(stream, _request(type_url))
    server._handle(stream, _request(RUNTIME, names=[WEIGHTS_LAYER]))
    first = server._due(stream)
    # no listener before clusters and weights are ACKed
    assert [r.type_url for r in first] == [CLUSTER, RUNTIME]
    cds, rtds = first
    eds_names = sorted(n for n in compile_config(from_dict(config)).by_type[ENDPOINT])
    server._handle(stream, _request(ENDPOINT, names=eds_names))
    server._handle(stream, _request(CLUSTER, cds.nonce, version=cds.version_info))
    second = server._due(stream)
    assert [r.type_url for r in second] == [ENDPOINT]
    server._handle(stream, _request(ENDPOINT, second[0].nonce, eds_names))
    assert server._due(stream) == []  # the weights are still unanswered
    server._handle(stream, _request(RUNTIME, rtds.nonce, [WEIGHTS_LAYER]))
    third = server._due(stream)
    assert [r.type_url for r in third] == [LISTENER]
    server._handle(stream, _request(LISTENER, third[0].nonce))
    # the listener's scoped routes: the scopes (SRDS), then each scope's route table (RDS)
    server._handle(stream, _request(SCOPED))
    (srds,) = server._due(stream)
    assert srds.type_url == SCOPED and len(srds.resources) == SHARDS
    server._handle(stream, _request(SCOPED, srds.nonce))
    shards = sorted(shard_route_name(k) for k in range(SHARDS))
    server._handle(stream, _request(ROUTE, names=shards))
    rds = server._due(stream)
    assert [r.type_url for r in rds] == [ROUTE] and len(rds[0].resources) == 1
    # Envoy rejects a route table: counted, logged, and not sent again; the others are sent,
    # one per response
    server._handle(stream, _request(ROUTE, rds[0].nonce, shards, error="bad route"))
    sent = 0
    while rds := server._due(stream):
        (rds,) = rds
        assert rds.type_url == ROUTE and len(rds.resources) == 1
        server._handle(stream, _request(ROUTE, rds.nonce, shards))
        sent += 1
    assert sent == SHARDS - 1
    assert server.metrics.nacks.labels("rds")._value.get() == 1
    # A weight change is a new weights layer: sent, RTDS only.
    config["routes"][0]["variants"][1]["weight"] = 50
    server.set_snapshot(compile_config(from_dict(config)))
    (rtds,) = server._due(stream)
    assert rtds.type_url == RUNTIME
    server._handle(stream, _request(RUNTIME, rtds.nonce, [WEIGHTS_LAYER]))
    assert server._due(stream) == []
    # A new route on a backend Envoy has clusters for is a route change only: weights first,
    # then the one route table shard that holds it.
    config["routes"].append(linear_routes()[1])
    server.set_snapshot(compile_config(from_dict(config)))
    (rtds,) = server._due(stream)
    assert rtds.type_url == RUNTIME
    server._handle(stream, _request(RUNTIME, rtds.nonce, [WEIGHTS_LAYER]))
    (rds,) = server._due(stream)
    assert rds.type_url == ROUTE
    assert [ads_resource_name(r) for r in rds.resources] == [shard_route_name(shard_of("flip"))]
    server._handle(stream, _request(ROUTE, rds.nonce, shards))
    assert server._due(stream) == []
    # A route on a new backend: its cluster first (with its endpoints), then the route table.
    config["backends"].append(triton_backend("127.0.0.1:2", "triton-b"))
    moved = linear_routes("triton-b")[2:3]
    moved[0]["variants"][0]["backend"] = "triton-b"
    config["routes"].extend(moved)
    server.set_snapshot(compile_config(from_dict(config)))
    cds, rtds = server._due(stream)
    assert (cds.type_url, rtds.type_url) == (CLUSTER, RUNTIME)
    server._handle(stream, _request(CLUSTER, cds.nonce, version=cds.version_info))
    eds_names = sorted(server.snapshot.by_type[ENDPOINT])  # Envoy asks for the new clusters'
    server._handle(stream, _request(ENDPOINT, names=eds_names))
    (eds,) = server._due(stream)
    server._handle(stream, _request(ENDPOINT, eds.nonce, eds_names))
    assert server._due(stream) == []  # the weights are still unanswered
    server._handle(stream, _request(RUNTIME, rtds.nonce, [WEIGHTS_LAYER]))
    assert [r.type_url for r in server._due(stream)] == [ROUTE]


# --- real Envoy, real Triton ------------------------------------------------------------------


class Envoy(BackendProcess):
    name = "envoy"

    def __init__(self, bootstrap: Path, admin_port: int, base_id: int) -> None:
        self.bootstrap = bootstrap
        self.admin_port = admin_port
        self.base_id = base_id
        super().__init__("envoy-", "envoy.log", 30.0)

    def _command(self):
        return [
            tool("envoy"),
            "-c",
            str(self.bootstrap),
            "--disable-hot-restart",
            "--base-id",
            str(self.base_id),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ], None

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self) -> dict[str, str]:
        out = {}
        for line in self.admin("/stats").splitlines():
            name, _, value = line.partition(": ")
            out[name] = value
        return out

    def counter(self, name: str) -> int:
        return int(self.stats().get(name, "0") or 0)

    def counters(self, pattern: str) -> int:
        """The sum of the counters whose names match the regex `pattern`."""
        found = re.compile(pattern)
        return sum(int(v or 0) for k, v in self.stats().items() if found.search(k))

    def _wait_ready(self) -> None:
        def ready():
            try:
                return (
                    "tensorgate" in self.admin("/listeners")
                    and self.admin("/ready").strip() == "LIVE"
                )
            except OSError:
                return False

        self._poll(ready, time.monotonic() + self.startup_timeout, "Envoy has no listener")


def write_bootstrap(gateway: GatewayProcess, admin_port: int, node: str) -> Path:
    path = Path(gateway.directory) / f"{node}.json"
    subprocess.run(
        [str(TENSORGATE), "envoy-bootstrap", "-c", str(gateway.config_path), "-o", str(path),
         "--admin", f"127.0.0.1:{admin_port}", "--node-id", node],
        check=True,
    )  # fmt: skip
    return path


@contextlib.contextmanager
def envoy_in_front(gateway: GatewayProcess, node: str, base_id: int):
    """Starts `gateway` (Envoy mode), then a real Envoy bootstrapped from its config; yields
    the Envoy; stops both."""
    envoy = None
    try:
        gateway.start()
        admin_port = free_port()
        envoy = Envoy(write_bootstrap(gateway, admin_port, node), admin_port, base_id)
        envoy.start()
        yield envoy
    finally:
        if envoy is not None:
            envoy.stop()
        gateway.stop()


MAX_BODY = 64 * 1024
# The stack's backend clusters (resources.backend_cluster): triton-a's first and second slot
# (a route's first and second variant on it), "dead" and "impatient"; rb20-5 is the default
# retry budget's class.
A0, A1 = "tgb|triton-a|0|rb20-5", "tgb|triton-a|1|rb20-5"
DEAD, IMPATIENT = "tgb|dead|0|rb20-5", "tgb|impatient|0|rb20-5"


@pytest.fixture(scope="module")
def stack(triton):
    xds, listen = free_port(), free_port()
    gateway = GatewayProcess(stack_config(triton.address, xds, listen, MAX_BODY), admin=True)
    with envoy_in_front(gateway, "envoy-a", 41) as envoy:
        yield gateway, envoy, f"127.0.0.1:{listen}"


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack[2]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def call(stub, request, metadata=(), timeout=10):
    response, info = stub.ModelInfer.with_call(request, metadata=metadata, timeout=timeout)
    return response, dict(info.trailing_metadata())


def test_stock_tritonclient_through_envoy_weights_80_20(stack):
    _, envoy, address = stack
    client = tc.InferenceServerClient(address)
    x = tc.InferInput("INPUT0", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([X], dtype=np.float32))
    before = envoy.counter(f"cluster.{A0}.upstream_rq_total")
    counts = {"stable": 0, "canary": 0}
    for _ in range(2000):
        result = client.infer("linear", [x])
        response = result.get_response()
        assert response.model_name == "linear"  # public name, though Triton ran demo_linear
        variant = "stable" if result.as_numpy("OUTPUT0").tolist() == [Y_V1] else "canary"
        assert response.model_version == ("1" if variant == "stable" else "2")
        counts[variant] += 1
    share = counts["stable"] / 2000 * 100
    assert 76 <= share <= 84, counts
    # Envoy answered them itself (variant clusters), not the Python gateway.
    assert envoy.counter(f"cluster.{A0}.upstream_rq_total") - before == counts["stable"]
    assert envoy.counter("cluster.tensorgate_gateway.upstream_rq_total") == 0


def test_envoy_holds_every_shard_of_the_route_table_at_its_content_version(stack):
    """The route table is 64 route configurations (scoped routes), each sent alone with its own
    content hash as version: what Envoy reports for each is what the control plane compiled
    (the chaos benchmark's convergence check reads exactly this)."""
    gateway, envoy, _ = stack
    expected = compile_config(from_dict(gateway.config)).by_type[ROUTE]
    dump = json.loads(envoy.admin("/config_dump?resource=dynamic_route_configs"))
    held = {
        c["route_config"]["name"]: c["version_info"] for c in dump["configs"] if "route_config" in c
    }
    shards = [shard_route_name(k) for k in range(SHARDS)]
    assert {n: held.get(n) for n in shards} == {
        n: content_version({n: expected[n]}) for n in shards
    }
    scopes = json.loads(envoy.admin("/config_dump?resource=dynamic_scoped_route_configs"))
    assert scopes["configs"], scopes


def test_pinned_versions_trailers_and_unknown_versions(stub):
    for version, variant, y in (("1", "stable", Y_V1), ("2", "canary", Y_V2)):
        for _ in range(20):
            response, trailers = call(stub, linear_request("linear", version))
            assert output(response) == y
            assert (response.model_name, response.model_version) == ("linear", version)
            assert trailers["x-tensorgate-variant"] == variant
            assert trailers["x-tensorgate-backend"] == "triton-a"
    # Unknown version: Envoy has no route for it, the gateway answers as it would directly.
    with pytest.raises(grpc.RpcError) as err:
        call(stub, linear_request("linear", "9"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "versions: 1, 2" in err.value.details()


def test_model_name_need_not_be_the_first_field(stack):
    _, envoy, address = stack
    names_last = b"\x12\x01" + b"2" + b"\x0a\x06" + b"linear"  # model_version, then model_name
    before = envoy.counter(f"cluster.{A1}.upstream_rq_total")
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            INFER,
            request_serializer=lambda b: b,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        # inputs and raw contents first, then the names (tests/test_envoy_differential.py puts
        # them after 40 KB of tensor, where the body's read window has to move)
        response = infer(linear_request("", "").SerializeToString() + names_last, timeout=10)
    assert output(response) == Y_V2 and response.model_name == "linear"
    assert envoy.counter(f"cluster.{A1}.upstream_rq_total") == before + 1


def test_routing_headers_are_ignored_and_large_bodies_are_bounded(stack, stub):
    _, envoy, _ = stack
    # A caller's x-tensorgate-model/-version headers do not route: the body does (they used to
    # skip the body read, which let the body name any model to Triton).
    response, trailers = call(
        stub,
        linear_request("linear", "1"),
        metadata=(("x-tensorgate-model", "linear"), ("x-tensorgate-version", "2")),
    )
    assert output(response) == Y_V1 and trailers["x-tensorgate-variant"] == "stable"
    # A body over envoy.max_body_bytes: Envoy refuses at the bound instead of buffering it
    # (HTTP 413, gRPC UNKNOWN "Payload Too Large"), header or not.
    big = linear_request("demo_linear", "", x=[1.0] * (MAX_BODY // 2))
    before = envoy.counter(f"cluster.{A0}.upstream_rq_total")
    for metadata in ((), (("x-tensorgate-model", "demo_linear"),)):
        with pytest.raises(grpc.RpcError) as err:
            call(stub, big, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        assert err.value.details() == "Payload Too Large"
    assert envoy.counter(f"cluster.{A0}.upstream_rq_total") == before


def test_a_callers_rename_header_has_no_effect(stub):
    """x-tensorgate-rename tells a backend cluster's upstream filter what to ask the backend for;
    only routes set it. A caller's is removed as the request arrives: sent on a route that
    renames nothing (demo_linear, whose filter would otherwise apply it) or on one that does, it
    never picks the model or version Triton runs, nor the names the answer shows."""
    plain, trailers = call(stub, linear_request("demo_linear"))
    assert trailers["x-tensorgate-variant"] == "plain"
    ran = "1" if output(plain) == Y_V1 else "2"  # Triton's default version of demo_linear
    other = {"1": "2", "2": "1"}[ran]
    for value in (f"demo_linear,{other}", f"demo_linear,{other},linear,9"):
        response, _ = call(
            stub, linear_request("demo_linear"), metadata=(("x-tensorgate-rename", value),)
        )
        assert output(response) == output(plain)
        assert (response.model_name, response.model_version) == (
            plain.model_name,
            plain.model_version,
        )
        response, _ = call(
            stub, linear_request("linear", "1"), metadata=(("x-tensorgate-rename", value),)
        )
        assert output(response) == Y_V1
        assert (response.model_name, response.model_version) == ("linear", "1")


def test_sticky_route_key(stub):
    seen = {}
    for key in [f"user-{i}" for i in range(30)]:
        variants = {
            call(stub, linear_request("linear"), metadata=(("x-tensorgate-route-key", key),))[1][
                "x-tensorgate-variant"
            ]
            for _ in range(5)
        }
        assert len(variants) == 1, (key, variants)
        seen[key] = variants.pop()
    assert set(seen.values()) == {"stable", "canary"}


def test_fallback_variant_retry_and_outlier_ejection(stack, stub):
    _, envoy, _ = stack
    for _ in range(10):
        response, trailers = call(stub, linear_request("guarded"))
        assert output(response) == Y_V1 and response.model_name == "guarded"
        # A difference from the Python path (docs/envoy.md): the trailers name the variant the
        # route picked, not the fallback that answered.
        assert trailers["x-tensorgate-variant"] == "down"
    # The dead variant's breaker (outlier detection, 2 consecutive failures) opened.
    assert envoy.counter(f"cluster.{DEAD}.outlier_detection.ejections_enforced_total") >= 1
    assert envoy.counter(f"cluster.{DEAD}.upstream_cx_connect_fail") >= 2


def test_shadow_is_a_request_mirror(stack, stub):
    _, envoy, _ = stack
    before = envoy.counter("cluster.tgs|mirrored|copy|triton-a.upstream_rq_total")
    for _ in range(10):
        response, trailers = call(stub, linear_request("mirrored"))
        assert output(response) == Y_V1 and trailers["x-tensorgate-variant"] == "main"
    deadline = time.monotonic() + 5
    while envoy.counter("cluster.tgs|mirrored|copy|triton-a.upstream_rq_200") - before < 10:
        assert time.monotonic() < deadline, "mirrored calls did not reach the shadow (renamed)"
        time.sleep(0.05)


def test_caller_deadline_is_honoured(stub):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call(stub, sleep_request(1.0), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    response, _ = call(stub, sleep_request(0.0), timeout=5)
    assert output(response) == [0.0]


def test_per_try_timeout_and_retries(stack, stub):
    _, envoy, _ = stack
    tries = envoy.counter(f"cluster.{IMPATIENT}.upstream_rq_per_try_timeout")
    retries = envoy.counter(f"cluster.{IMPATIENT}.upstream_rq_retry")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call(stub, sleep_request(0.8, "slow"), timeout=10)
    elapsed = time.monotonic() - started
    # three tries of 0.3 s each, then Envoy gives up: no try ran to the 0.8 s the model sleeps
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 0.85 < elapsed < 1.6, elapsed
    assert envoy.counter(f"cluster.{IMPATIENT}.upstream_rq_per_try_timeout") - tries == 3
    assert envoy.counter(f"cluster.{IMPATIENT}.upstream_rq_retry") - retries == 2
    time.sleep(0.8)  # the abandoned tries still hold demo_sleep's instances
    response, _ = call(stub, sleep_request(0.0, "slow"))
    assert output(response) == [0.0]


def test_routes_envoy_cannot_serve_go_to_the_gateway(stack, stub):
    _, envoy, _ = stack
    before = envoy.counter("cluster.tensorgate_gateway.upstream_rq_total")
    response, trailers = call(stub, linear_request("via_gateway"))
    assert output(response) == Y_V1 and trailers["x-tensorgate-variant"] == "only"
    # metadata RPCs too, even with routing headers (the route key is only ever Envoy's own)
    with grpc.insecure_channel(stack[2]) as channel:
        meta = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            oip.ModelMetadataRequest(name="linear"),
            timeout=5,
            metadata=(("x-tensorgate-model", "linear"), ("x-tensorgate-route", "linear@1")),
        )
    assert meta.name == "linear"
    assert envoy.counter("cluster.tensorgate_gateway.upstream_rq_total") == before + 2
    # a caller's own route key is dropped: the body's version decides
    response, trailers = call(
        stub, linear_request("linear", "1"), metadata=(("x-tensorgate-route", "linear@2"),)
    )
    assert output(response) == Y_V1 and trailers["x-tensorgate-variant"] == "stable"
    out = subprocess.run(
        [str(TENSORGATE), "check-config", str(stack[0].config_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "envoy   linear" in out.stdout
    assert "gateway via_gateway" in out.stdout and "envoy.gateway_routes" in out.stdout


def _variant(stub, model):
    return call(stub, linear_request(model))[1]["x-tensorgate-variant"]


def test_admin_weight_change_reaches_envoy_fast(stack, stub):
    gateway, envoy, _ = stack
    delays = []
    routes_applied = envoy.counter("http.tensorgate.rds.tensorgate.update_success")
    weights_applied = envoy.counter("runtime.update_success")
    with grpc.insecure_channel(gateway.admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        target = "a"
        for _ in range(20):
            target = "b" if target == "a" else "a"
            weights = {target: 100, ("a" if target == "b" else "b"): 0}
            admin.SetVariantWeights(
                admin_pb2.SetVariantWeightsRequest(model="flip", weights=weights),
                metadata=ADMIN,
                timeout=5,
            )
            ok = time.monotonic()
            while _variant(stub, "flip") != target:
                assert time.monotonic() - ok < 2, "weight change not applied by Envoy in 2 s"
            # observed: the first call after the change went to the new variant, and so do more
            delays.append(time.monotonic() - ok)
            assert {_variant(stub, "flip") for _ in range(20)} == {target}
    delays.sort()
    p99 = delays[-1]
    print(f"propagation over 20 changes: p50 {delays[9] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 1.0
    # each flip was a push of the weights layer; the route table Envoy holds never changed
    assert envoy.counter("runtime.update_success") >= weights_applied + 20
    assert envoy.counter("http.tensorgate.rds.tensorgate.update_success") == routes_applied


def test_admin_drain_reaches_envoy(stack, stub):
    gateway, _, _ = stack
    with grpc.insecure_channel(gateway.admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.DrainBackend(admin_pb2.DrainBackendRequest(backend="triton-a"), metadata=ADMIN)
        ok = time.monotonic()
        try:
            while {_variant(stub, "drainable") for _ in range(20)} != {"y"}:
                assert time.monotonic() - ok < 2, "a drain did not reach Envoy in 2 s"
            print(f"drain reached Envoy in {(time.monotonic() - ok) * 1000:.0f} ms")
            # routes whose every variant is on the drained backend keep being served
            assert output(call(stub, linear_request("linear", "1"))[0]) == Y_V1
        finally:
            admin.UndrainBackend(
                admin_pb2.UndrainBackendRequest(backend="triton-a"), metadata=ADMIN
            )
        deadline = time.monotonic() + 2
        while {_variant(stub, "drainable") for _ in range(40)} != {"x", "y"}:
            assert time.monotonic() < deadline, "undrain did not reach Envoy"


def test_control_plane_killed_under_load_envoy_keeps_serving(stack):
    gateway, envoy, address = stack

    async def load(stop: asyncio.Event) -> dict:
        codes: dict[str, int] = {}
        async with grpc.aio.insecure_channel(address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def worker():
                while not stop.is_set():
                    try:
                        await stub.ModelInfer(linear_request("linear"), timeout=5)
                        code = "OK"
                    except grpc.aio.AioRpcError as err:
                        code = err.code().name
                    codes[code] = codes.get(code, 0) + 1

            await asyncio.gather(*(worker() for _ in range(8)))
        return codes

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        await asyncio.sleep(0.5)
        gateway.proc.kill()  # kill -9 the control plane (and the Python data plane with it)
        gateway.proc.wait()
        await asyncio.sleep(2.0)
        stop.set()
        return await task

    codes = asyncio.run(scenario())
    assert set(codes) == {"OK"} and codes["OK"] > 100, codes
    # Restarted on the same ports, it is reconnected to and pushes again.
    gateway._log.close()
    gateway.start()
    deadline = time.monotonic() + 15
    while envoy.stats().get("control_plane.connected_state") != "1":
        assert time.monotonic() < deadline, "Envoy did not reconnect to the control plane"
        time.sleep(0.1)
    # ... and converges: the restarted control plane serves the stored revision, and a change
    # made now reaches the Envoy.
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        current = _variant(stub, "flip")
        target = "b" if current == "a" else "a"
        with grpc.insecure_channel(gateway.admin_address) as admin_channel:
            admin_pb2_grpc.AdminServiceStub(admin_channel).SetVariantWeights(
                admin_pb2.SetVariantWeightsRequest(model="flip", weights={target: 100, current: 0}),
                metadata=ADMIN,
                timeout=5,
            )
        deadline = time.monotonic() + 5
        while _variant(stub, "flip") != target:
            assert time.monotonic() < deadline, "a change after the restart did not reach Envoy"


class InProcessControlPlane:
    """gateway.controlplane.envoy.ads.XdsServer on its own event loop thread, so a test can push any snapshot
    (including ones Envoy must reject)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.xds = ads.XdsServer(CollectorRegistry())
        started = asyncio.run_coroutine_threadsafe(ads.serve("127.0.0.1:0", self.xds), self.loop)
        self.server, self.port = started.result(10)

    def push(self, resources) -> None:
        self.loop.call_soon_threadsafe(self.xds.set_snapshot, resources)

    def count(self, metric, type_: str) -> float:
        return metric.labels(type_)._value.get()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_envoy_nack_is_counted_not_retried_and_the_last_good_config_stays(triton, tmp_path):
    plane = InProcessControlPlane()
    listen, admin_port = free_port(), free_port()
    config = {
        "listeners": {"xds": f"127.0.0.1:{plane.port}", "data_plane": f"127.0.0.1:{free_port()}"},
        "envoy": {"listen": f"127.0.0.1:{listen}"},
        "backends": [triton_backend(triton.address)],
        "routes": linear_routes()[:1],
    }
    good = from_dict(config)
    plane.push(compile_config(good))
    path = tmp_path / "bootstrap.json"
    path.write_text(render(bootstrap(good, node_id="envoy-nack", admin=f"127.0.0.1:{admin_port}")))
    envoy = Envoy(path, admin_port, 42)
    try:
        envoy.start()
        with grpc.insecure_channel(f"127.0.0.1:{listen}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert output(call(stub, linear_request("linear", "1"))[0]) == Y_V1
            # A cluster Envoy must refuse (negative connect timeout): a new backend's, which a
            # new route needs.
            flip = linear_routes("triton-b")[1]
            more = {
                **config,
                "backends": [*config["backends"], triton_backend(triton.address, "triton-b")],
                "routes": [*config["routes"], flip],
            }
            bad = compile_config(from_dict(more))
            bad.by_type[CLUSTER]["tgb|triton-b|0|rb20-5"].connect_timeout.seconds = -1
            plane.push(bad)
            deadline = time.monotonic() + 10
            while plane.count(plane.xds.metrics.nacks, "cds") < 1:
                assert time.monotonic() < deadline, "no NACK"
                time.sleep(0.05)
            pushes = plane.count(plane.xds.metrics.pushes, "cds")
            time.sleep(1.5)
            # Not re-sent in a loop; the routes that need the refused cluster were never sent.
            assert plane.count(plane.xds.metrics.pushes, "cds") == pushes
            assert plane.count(plane.xds.metrics.nacks, "cds") == 1
            assert envoy.counter("cluster_manager.cds.update_rejected") == 1
            assert output(call(stub, linear_request("linear", "1"))[0]) == Y_V1
            with pytest.raises(grpc.RpcError):  # "flip" never reached this Envoy
                call(stub, linear_request("flip"))
            # The next good snapshot is taken.
            plane.push(compile_config(from_dict(more)))
            deadline = time.monotonic() + 10
            while True:
                try:
                    if output(call(stub, linear_request("flip"))[0]) == Y_V1:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "good snapshot after a NACK not applied"
                time.sleep(0.05)
    finally:
        envoy.stop()
        plane.close()


PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def test_envoy_recording_rules_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run scripts/system-tools (scripts/test does)")
    for args in (
        ["check", "rules", str(PROM / "envoy.yaml")],
        ["test", "rules", str(PROM / "envoy_test.yaml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def test_live_envoy_exports_the_series_the_recording_rules_read(stack, stub, tmp_path):
    """envoy.yaml's rules run by promtool over a live Envoy's /stats/prometheus (each counter
    taken to grow by its current value every minute) give non-empty per-backend and per-model
    series."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run scripts/system-tools (scripts/test does)")
    call(stub, linear_request("linear", "1"))  # triton-a's cluster
    call(stub, linear_request("guarded"))  # the fallback chain dead -> triton-a
    # Histograms reach the admin page at Envoy's next stats flush (every 5 s by default).
    inf = f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{A0}",le="+Inf"}} '
    deadline = time.monotonic() + 15
    while True:
        text = stack[1].admin("/stats/prometheus")
        if any(line.startswith(inf) and line != inf + "0" for line in text.splitlines()):
            break
        assert time.monotonic() < deadline, "no latency observed in Envoy's histogram"
        time.sleep(0.2)
    ok = f'envoy_cluster_grpc_ModelInfer_0{{envoy_grpc_bridge_method="GRPCInferenceService",envoy_grpc_bridge_service="inference",envoy_cluster_name="{A0}"}}'
    assert ok in text
    assert f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{A0}",le="0.5"}}' in text
    assert (
        f'envoy_cluster_outlier_detection_ejections_active{{envoy_cluster_name="{DEAD}"}}' in text
    )
    rules = PROM / "envoy.yaml"
    read = {  # the metric names envoy.yaml's rules select
        name
        for group in yaml.safe_load(rules.read_text())["groups"]
        for rule in group["rules"]
        for name in re.findall(r"\b(envoy_[A-Za-z0-9_]+)\{", rule["expr"])
    }
    series = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser names a counter's sample <name>_total, as OpenMetrics does; Envoy's
            # own names (envoy_cluster_grpc_ModelInfer_0) have no such suffix.
            name = sample.name if sample.name in read else sample.name.removesuffix("_total")
            if name in read:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                grows = "0+" if family.type in ("counter", "histogram") else ""
                series.append({"series": f"{name}{{{labels}}}", "values": f"{grows}{sample.value:g}x10"})  # fmt: skip
    assert {s["series"].split("{")[0] for s in series} >= {
        "envoy_cluster_grpc_ModelInfer_0",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_cluster_outlier_detection_ejections_active",
        "envoy_vhost_route_upstream_rq",
        "envoy_vhost_route_upstream_rq_time_bucket",
    }

    def present(expr: str) -> dict:
        return {"expr": f"count({expr})", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]}  # fmt: skip

    cases = [
        present('backend_code:tensorgate_envoy_requests:rate5m{backend="triton-a",code="OK"} > 0'),
        present('backend_code:tensorgate_envoy_requests:rate5m{backend="dead",code="OK"} > 0'),
        present('backend:tensorgate_envoy_request_errors:ratio_rate5m{backend="triton-a"} >= 0'),
        present('backend:tensorgate_envoy_try_duration_seconds:p99_5m{backend="triton-a"} > 0'),
        present('backend:tensorgate_envoy_ejected:max{backend="dead"}'),
        # Per model, from the routes' statistics (each route's stat_prefix is its model).
        present('model:tensorgate_envoy_requests:rate5m{model="linear"} > 0'),
        present('model:tensorgate_envoy_requests:rate5m{model="guarded"} > 0'),
        present('model:tensorgate_envoy_local_errors:ratio_rate5m{model="linear"} >= 0'),
        present('model:tensorgate_envoy_try_duration_seconds:p99_5m{model="linear"} > 0'),
    ]
    unit = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}],
    }
    (tmp_path / "live_test.yaml").write_text(json.dumps(unit))  # JSON is YAML
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "live_test.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_route_statistics_are_per_model_and_count_a_grpc_error_as_http_200(stack, stub):
    """Why Envoy mode's per-model series have no gRPC code (docs/envoy.md, "Statistics"): a
    backend's gRPC error is counted by code on its backend cluster (grpc_stats) and as HTTP
    200 on the model's route statistics, where only Envoy's own failures (a timeout: 504) show;
    a pinned and the unpinned route share the model's."""
    _, envoy, _ = stack
    grpc_invalid = r"^cluster\.tgb\|triton-a\|.*\.grpc\..*ModelInfer\.3$"
    before = envoy.counters(grpc_invalid), envoy.stats()
    request = linear_request("linear", "1")
    request.inputs[0].name = "NO_SUCH_INPUT"  # Triton refuses it: INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        call(stub, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    call(stub, linear_request("linear"))  # the unpinned route: the same statistics
    with pytest.raises(grpc.RpcError):  # three per-try timeouts: Envoy's own failure
        call(stub, sleep_request(0.8, "slow"), timeout=10)

    def grew(name: str) -> int:
        return envoy.counter(name) - int(before[1].get(name, "0") or 0)

    assert envoy.counters(grpc_invalid) == before[0] + 1
    assert grew("vhost.tensorgate.route.linear.upstream_rq_200") == 2
    assert grew("vhost.tensorgate.route.linear.upstream_rq_completed") == 2
    assert grew("vhost.tensorgate.route.slow.upstream_rq_504") == 1
    time.sleep(0.8)  # the abandoned tries still hold demo_sleep's instances
    assert not any(k.startswith("vhost.tensorgate.route.gateway.") for k in envoy.stats())


def test_requests_with_parameters_go_to_the_gateway_allowlist(stack, stub):
    """Envoy forwards only requests without parameters: the gateway's per-backend allowlist
    (shared-memory parameters are never forwarded) applies to the rest."""
    _, envoy, _ = stack
    before = envoy.counter("cluster.tensorgate_gateway.upstream_rq_total")
    request = linear_request("linear", "1")
    request.inputs[0].parameters["shared_memory_region"].string_param = "someone-elses"
    with pytest.raises(grpc.RpcError) as err:
        call(stub, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shared_memory_region" in err.value.details()
    request = linear_request("linear", "1")
    request.parameters["priority"].int64_param = 1
    response, trailers = call(stub, request)  # allowed for Triton: the gateway forwards it
    assert output(response) == Y_V1 and trailers["x-tensorgate-variant"] == "stable"
    assert envoy.counter("cluster.tensorgate_gateway.upstream_rq_total") == before + 2
