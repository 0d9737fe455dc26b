"""Envoy mode for KServe v2 REST (issue 22, part 2): with envoy.rest_listen, each Envoy gets a
second listener whose routes are the exact inference paths of the models Envoy serves alone
(weights, pinning by /versions/{v}, retries, per-try timeouts, outlier detection, mirrors), on the
backends' REST ports; everything else goes to the gateway's REST listener.

Pure parts (which route takes which path, and why; what the compiler builds) run without
processes. The rest runs against a real Envoy, a real Triton with its HTTP endpoint on, and the
gateway process with its REST listener, called with plain httpx and stock tritonclient.http.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from tritonclient.grpc import service_pb2 as oip

from gateway.controlplane.config import from_dict
from gateway.controlplane.envoy.compile import Compiler, compile_config
from gateway.controlplane.envoy.decide import decide_rest
from gateway.controlplane.envoy.listener import routes_of
from gateway.controlplane.envoy.resources import (
    CLUSTER,
    LISTENER,
    REST_LISTENER_NAME,
    REST_ROUTE_NAME,
    ROUTE,
    RUNTIME,
    WEIGHTS_LAYER,
)
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.backends.process import free_port
from tests.builders import oip_stub, triton_backend, variant
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess
from tests.loadgen import scrape
from tests.oip import Y_V1, Y_V2, X, linear_request, output
from tests.test_envoy_dataplane import envoy_in_front

# --- which path serves each route (pure) ------------------------------------------------------


def _pure_config(routes: list[dict], **envoy) -> dict:
    return {
        "listeners": {"xds": "127.0.0.1:18000", "rest": "127.0.0.1:8000"},
        "envoy": {"listen": "127.0.0.1:8080", "rest_listen": "127.0.0.1:8081", **envoy},
        "backends": [
            triton_backend("127.0.0.1:8001", rest_address="127.0.0.1:8002"),
            triton_backend("127.0.0.1:8001", "grpc-only"),
        ],
        "routes": routes,
    }


def _rest_paths(routes: list[dict], **envoy) -> dict[str, tuple[str, str]]:
    decisions = decide_rest(from_dict(_pure_config(routes, **envoy)))
    return {d.model: (d.path, " | ".join(d.reasons)) for d in decisions}


def test_rest_decision_is_the_grpc_one_plus_rest_address_and_public_names():
    paths = _rest_paths(
        [
            {"model": "demo_linear", "variants": [variant("v1", version="1")]},
            # the answer's body would say demo_linear, the gateway's says "renamed"
            {"model": "renamed", "variants": [variant("v1", version="1")]},
            # Triton's answer says the version it ran, the gateway's none
            {"model": "demo_sleep", "variants": [variant("s", backend_model="demo_sleep")]},
            # version 2 in public, 1 at the backend
            {"model": "demo_fail",
             "variants": [variant("f", backend_model="demo_fail", version="2")]},
            {"model": "demo_flaky",
             "variants": [variant("f", backend="grpc-only", backend_model="demo_flaky",
                                  version="1")]},
            # the gRPC decision already hands it over: so does REST
            {"model": "demo_identity",
             "variants": [variant("i", backend_model="demo_identity", version="1")],
             "policy": {"response_cache": {"deterministic": True}}},
        ]
    )  # fmt: skip
    assert paths["demo_linear"] == ("envoy", "")
    assert paths["renamed"][0] == "gateway" and "backend_model 'demo_linear'" in paths["renamed"][1]
    assert paths["demo_sleep"][0] == "gateway" and "has no version" in paths["demo_sleep"][1]
    assert paths["demo_fail"][0] == "gateway" and "version '2'" in paths["demo_fail"][1]
    assert "backend 'grpc-only' has no rest_address" in paths["demo_flaky"][1]
    assert paths["demo_identity"][0] == "gateway" and "response_cache" in paths["demo_identity"][1]


def test_a_shadow_alone_may_be_renamed_a_pinned_or_fallback_variant_may_not():
    shadowed = {
        "model": "demo_linear",
        "variants": [variant("v1", version="1"), variant("copy", backend_version="2", weight=0)],
        "policy": {"shadow": {"variant": "copy", "fraction": 1.0}},
    }
    assert _rest_paths([shadowed])["demo_linear"][0] == "envoy"  # its answers are dropped
    shadowed["variants"][1]["backend_model"] = "demo_flaky"
    assert _rest_paths([shadowed])["demo_linear"][0] == "envoy"
    shadowed["variants"][1]["version"] = "2"  # now callers can pin it: its answer shows
    path, why = _rest_paths([shadowed])["demo_linear"]
    assert path == "gateway" and "'copy' is renamed" in why


def test_rest_off_compiles_no_rest_listener_and_no_decisions():
    config = _pure_config([{"model": "demo_linear", "variants": [variant("v1", version="1")]}])
    config["envoy"].pop("rest_listen")
    resources = compile_config(from_dict(config))
    assert list(resources.by_type[LISTENER]) == ["tensorgate"]
    assert resources.rest_decisions == ()
    assert not [c for c in resources.by_type[CLUSTER] if c.startswith("tgr")]


def _weighted_config(stable: int) -> dict:
    return _pure_config(
        [
            {
                "model": "demo_linear",
                "variants": [
                    variant("v1", version="1", weight=stable),
                    variant("v2", backend_version="2", version="2", weight=100 - stable),
                ],
            }
        ]
    )


def test_one_weight_change_is_one_runtime_push_for_both_protocols():
    compiler = Compiler()
    before = compiler.compile(from_dict(_weighted_config(80)))
    after = compiler.compile(from_dict(_weighted_config(30)))
    for kind in (CLUSTER, LISTENER, ROUTE):
        assert before.version(kind) == after.version(kind), kind
    assert before.version(RUNTIME) != after.version(RUNTIME)
    layer = dict(after.by_type[RUNTIME][WEIGHTS_LAYER].layer)
    assert layer == {
        "tgw.demo_linear.tgb|triton-a|0|rb20-5": 30,
        "tgw.demo_linear.tgb|triton-a|1|rb20-5": 70,
        "tgw.demo_linear.tgrb|triton-a|0|rb20-5|p": 30,
        "tgw.demo_linear.tgrb|triton-a|1|rb20-5|p": 70,
    }


def test_a_variant_readiness_finds_down_leaves_the_rest_split_too():
    down = frozenset({("triton-a", "demo_linear", "2")})
    layer = dict(compile_config(from_dict(_weighted_config(80)), down).by_type[RUNTIME][
        WEIGHTS_LAYER].layer)  # fmt: skip
    assert layer["tgw.demo_linear.tgrb|triton-a|0|rb20-5|p"] == 80
    assert layer["tgw.demo_linear.tgrb|triton-a|1|rb20-5|p"] == 0


def test_rest_routes_are_exact_paths_and_their_clusters_are_pushed_first():
    resources = compile_config(from_dict(_weighted_config(80)))
    table = resources.by_type[ROUTE][REST_ROUTE_NAME].virtual_hosts[0].matcher
    paths = sorted(table.on_no_match.matcher.matcher_tree.exact_match_map.map)
    assert paths == [
        "/v2/models/demo_linear/infer",
        "/v2/models/demo_linear/versions/1/infer",
        "/v2/models/demo_linear/versions/2/infer",
    ]
    # the ADS server holds routes back until the clusters they name are ACKed
    assert {"tgrb|triton-a|0|rb20-5|p", "tgrb|triton-a|1|rb20-5|p", "tensorgate_gateway_rest"} <= (
        resources.cluster_names_referenced()
    )
    routes = {r.name: r for r in routes_of(resources.by_type[ROUTE][REST_ROUTE_NAME])}
    assert list(routes) == ["gateway", "demo_linear", "demo_linear@1", "demo_linear@2"]
    assert REST_LISTENER_NAME in resources.by_type[LISTENER]
    # unpinned calls over two versions: each entry names its variant's path, which the shared
    # backend cluster's filter writes (per backend, not per variant: no path in its code)
    assert not any(r.route.HasField("regex_rewrite") for r in routes.values())
    entries = routes["demo_linear"].route.weighted_clusters.clusters
    assert [(e.name, [(h.header.key, h.header.value) for h in e.request_headers_to_add])
            for e in entries] == [
        ("tgrb|triton-a|0|rb20-5|p", [("x-tensorgate-rest-path", "/v2/models/demo_linear/versions/1/infer")]),
        ("tgrb|triton-a|1|rb20-5|p", [("x-tensorgate-rest-path", "/v2/models/demo_linear/versions/2/infer")]),
    ]  # fmt: skip
    for name in ("tgrb|triton-a|0|rb20-5|p", "tgrb|triton-a|1|rb20-5|p"):
        code = _upstream_lua(resources.by_type[CLUSTER][name])
        assert "x-tensorgate-rest-path" in code and "demo_linear" not in code
    # one variant: the route writes it, the clusters need no filter
    single = _pure_config([{"model": "demo_linear", "variants": [variant("v1", version="1")]}])
    resources = compile_config(from_dict(single))
    routes = {r.name: r for r in routes_of(resources.by_type[ROUTE][REST_ROUTE_NAME])}
    rewrite = routes["demo_linear"].route.regex_rewrite.substitution
    assert rewrite == "/v2/models/demo_linear/versions/1/infer"
    assert not routes["demo_linear@1"].route.HasField("regex_rewrite")  # already the path
    assert _upstream_lua(resources.by_type[CLUSTER]["tgrb|triton-a|0|rb20-5"]) == ""


def _upstream_lua(cluster) -> str:
    """The inline code of a cluster's upstream Lua filter, "" without one."""
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed = cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    packed.Unpack(options)
    for upstream_filter in options.http_filters:
        if upstream_filter.name == "envoy.filters.http.lua":
            code = lua_pb2.Lua()
            upstream_filter.typed_config.Unpack(code)
            return code.default_source_code.inline_string
    return ""


# --- real Envoy, real Triton (HTTP on), the gateway's REST listener -----------------------------

DEAD = "127.0.0.1:1"  # nothing listens there: connections are refused at once
# demo_linear's v1 and v2 REST clusters: triton-a's first and second slot, the kind that writes
# the path each route entry names (|p); rb20-5 is the default retry budget's class
V1, V2 = "tgrb|triton-a|0|rb20-5|p", "tgrb|triton-a|1|rb20-5|p"
MAX_BODY = 256 * 1024


def _config(triton, xds: int, listen: int, rest_listen: int) -> dict:
    def rest(name: str, **fields) -> dict:
        return triton_backend(triton.address, name, rest_address=triton.http_address, **fields)

    return {
        "listeners": {"xds": f"127.0.0.1:{xds}"},
        "envoy": {
            "listen": f"127.0.0.1:{listen}",
            "rest_listen": f"127.0.0.1:{rest_listen}",
            "max_body_bytes": MAX_BODY,
        },
        "lifecycle": {"health_check_interval": "0.2s"},
        "backends": [
            rest("triton-a"),
            rest("triton-short", per_try_timeout="0.3s"),
            rest("triton-brk",
                 circuit_breaker={"consecutive_failures": 3, "open_duration": "60s"}),
            # its failures are the model's, by design: they must not open a breaker
            rest("triton-flaky", circuit_breaker={"disabled": True}),
            # its gRPC port answers (health checks find it up), its REST port is closed
            triton_backend(triton.address, "rest-down", rest_address=DEAD,
                           circuit_breaker={"disabled": True}),
        ],
        "routes": [
            # Envoy serves these: public names are Triton's, each variant pinned to its version
            {"model": "demo_linear",
             "variants": [variant("v1", version="1", weight=80),
                          variant("v2", backend_version="2", version="2", weight=20),
                          variant("copy", backend_version="2", weight=0)],
             "policy": {"shadow": {"variant": "copy", "fraction": 1.0, "max_concurrency": 64}}},
            # demo_flaky fails about 1 call in 5: ten tries make a failure ~1 in 10 million
            {"model": "demo_flaky",
             "variants": [variant("only", backend="triton-flaky", backend_model="demo_flaky",
                                  version="1")],
             "policy": {"retry": {"max_attempts": 10, "retry_on": ["INTERNAL", "UNAVAILABLE"],
                                  "base_delay": "0.001s", "max_delay": "0.005s",
                                  "budget_ratio": 1.0, "budget_min_per_second": 1000}}},
            {"model": "demo_sleep",
             "variants": [variant("s", backend="triton-short", backend_model="demo_sleep",
                                  version="1")]},
            {"model": "demo_fail",
             "variants": [variant("only", backend="triton-brk", backend_model="demo_fail",
                                  version="1")]},
            {"model": "demo_identity",
             "variants": [variant("down", backend="rest-down", backend_model="demo_identity",
                                  version="1"),
                          variant("up", backend_model="demo_identity", version="1", weight=0)],
             "policy": {"fallback": [{"variant": "up"}]}},
            # the gateway serves this one: renamed, so the answer's body must be rewritten
            {"model": "linear", "variants": [variant("v1", version="1")]},
        ],
    }  # fmt: skip


@dataclass
class Stack:
    gateway: GatewayProcess
    envoy: object
    url: str  # Envoy's REST listener
    triton: object
    grpc_address: str  # Envoy's gRPC listener


@pytest.fixture(scope="module")
def stack(triton):
    xds, listen, rest_listen = free_port(), free_port(), free_port()
    gateway = GatewayProcess(_config(triton, xds, listen, rest_listen), admin=True, rest=True)
    with envoy_in_front(gateway, "envoy-rest", 53) as envoy:
        url = f"http://127.0.0.1:{rest_listen}"
        deadline = time.monotonic() + 20
        while True:  # the REST listener and its routes arrive over xDS after the gRPC ones
            try:
                if httpx.post(
                    f"{url}{path('demo_linear', '1')}", json=body(), timeout=5
                ).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, envoy.admin("/listeners")
            time.sleep(0.1)
        yield Stack(gateway, envoy, url, triton, f"127.0.0.1:{listen}")


@pytest.fixture(scope="module")
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=10) as made:
        yield made


def path(model: str, version: str = "") -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def body(x=X, **extra) -> dict:
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [1, len(x)], "data": list(x)}
    return {"inputs": [tensor], **extra}


def sleep_body(seconds: float) -> dict:
    return {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [seconds]}]}


def answer(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"]


def served_by_envoy(stack: Stack, cluster: str) -> int:
    """Calls Envoy sent to a variant's REST cluster (its stat name: cluster|backend)."""
    return stack.envoy.counter(f"cluster.{cluster}.upstream_rq_total")


def handed_over(stack: Stack) -> int:
    return stack.envoy.counter("cluster.tensorgate_gateway_rest.upstream_rq_total")


def _rest_calls(gateway: GatewayProcess) -> float:
    """Inference calls the gateway answered over REST (its own metrics, protocol="rest")."""
    return sum(
        value
        for (name, labels), value in scrape(gateway.metrics_url).items()
        if name == "tensorgate_requests_total" and ("protocol", "rest") in labels
    )


def test_a_plain_route_is_served_by_envoy_alone(stack, client):
    before_v1 = served_by_envoy(stack, V1)
    before_gateway, before_rest = handed_over(stack), _rest_calls(stack.gateway)
    for _ in range(20):
        response = client.post(path("demo_linear", "1"), json=body())
        assert answer(response) == Y_V1
        reply = response.json()
        assert (reply["model_name"], reply["model_version"]) == ("demo_linear", "1")
        assert response.headers["x-tensorgate-variant"] == "v1"
        assert response.headers["x-tensorgate-backend"] == "triton-a"
    assert served_by_envoy(stack, V1) - before_v1 == 20
    assert handed_over(stack) == before_gateway
    assert _rest_calls(stack.gateway) == before_rest  # the gateway's REST listener saw none
    # Per-model statistics of Envoy's REST routes (a model's paths share them).
    assert stack.envoy.counter("vhost.tensorgate_rest.route.demo_linear.upstream_rq_200") >= 20


def test_weights_80_20(stack, client):
    counts = {"v1": 0, "v2": 0}
    for _ in range(400):
        response = client.post(path("demo_linear"), json=body())
        variant_name = response.headers["x-tensorgate-variant"]
        y, version = (Y_V1, "1") if variant_name == "v1" else (Y_V2, "2")
        assert (answer(response), response.json()["model_version"]) == (y, version)
        counts[variant_name] += 1
    assert 0.72 <= counts["v1"] / 400 <= 0.88, counts


def test_pinning_by_version_in_the_path(client):
    for version, y in (("1", Y_V1), ("2", Y_V2)):
        for _ in range(10):
            response = client.post(path("demo_linear", version), json=body())
            assert (answer(response), response.json()["model_version"]) == (y, version)


def test_one_admin_weight_change_moves_both_protocols_with_one_runtime_push(stack, client):
    envoy = stack.envoy
    # the gRPC listener's route table shards (scoped routes) and the REST listener's table
    route_tables = (r"^http\.tensorgate\..*rds\.tensorgate_\d+\.update_success$",
                    r"^http\.tensorgate_rest\.rds\.tensorgate_rest\.update_success$")  # fmt: skip
    tables_before = [envoy.counters(pattern) for pattern in route_tables]
    assert all(tables_before), tables_before  # the patterns name counters that exist
    pushes_before = envoy.counter("runtime.update_success")

    def set_weights(v1: int, v2: int) -> None:
        with grpc.insecure_channel(stack.gateway.admin_address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).SetVariantWeights(
                admin_pb2.SetVariantWeightsRequest(
                    model="demo_linear", weights={"v1": v1, "v2": v2, "copy": 0}
                ),
                metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
                timeout=5,
            )

    def rest_outputs() -> set:
        return {tuple(answer(client.post(path("demo_linear"), json=body()))) for _ in range(20)}

    set_weights(0, 100)
    try:
        changed = time.monotonic()
        while rest_outputs() != {tuple(Y_V2)}:
            assert time.monotonic() - changed < 2, "the weight change did not reach REST in 2 s"
        with oip_stub(stack.grpc_address) as stub:  # the gRPC listener moved with it
            grpc_outputs = {tuple(output(stub.ModelInfer(linear_request("demo_linear"))))
                            for _ in range(20)}  # fmt: skip
        assert grpc_outputs == {tuple(Y_V2)}
        assert envoy.counter("runtime.update_success") >= pushes_before + 1
        assert [envoy.counters(p) for p in route_tables] == tables_before  # no new routes
    finally:
        set_weights(80, 20)
    deadline = time.monotonic() + 2
    while rest_outputs() != {tuple(Y_V1), tuple(Y_V2)}:
        assert time.monotonic() < deadline, "the weights did not come back"


def test_sticky_route_keys(client):
    seen = set()
    for key in (f"user-{i}" for i in range(12)):
        picked = {
            client.post(
                path("demo_linear"), json=body(), headers={"x-tensorgate-route-key": key}
            ).headers["x-tensorgate-variant"]
            for _ in range(5)
        }
        assert len(picked) == 1, (key, picked)
        seen |= picked
    assert seen == {"v1", "v2"} or len(seen) == 1


def test_stock_tritonclient_http_with_binary_tensors_is_served_by_envoy(stack):
    client = triton_http.InferenceServerClient(stack.url.removeprefix("http://"))
    tensor = triton_http.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([X], dtype=np.float32), binary_data=True)
    wanted = triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)
    before = served_by_envoy(stack, V2)
    result = client.infer("demo_linear", [tensor], model_version="2", outputs=[wanted])
    assert result.as_numpy("OUTPUT0").tolist() == [Y_V2]
    assert result.get_response()["model_name"] == "demo_linear"
    assert served_by_envoy(stack, V2) == before + 1
    client.close()


# Bodies Envoy must not forward as they are: each is handed to the gateway, which answers it as
# it would directly (Triton would honour a shared-memory region another client registered, and
# ignores keys the gateway refuses).
_INPUT = body()["inputs"][0]
SMUGGLED = {
    "shared memory on an input": {"inputs": [{**_INPUT, "parameters": {"shared_memory_region": "o"}}]},
    "shared memory on an output": body(outputs=[{"name": "OUTPUT0",
                                                 "parameters": {"shared_memory_region": "o"}}]),
    "an escaped key Triton reads as parameters": (
        b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4],'
        b' "p\\u0061rameters": {"shared_memory_region": "o"}}]}'),
    "a request parameter": body(parameters={"priority": 1}),
    "a classification": body(outputs=[{"name": "OUTPUT0", "parameters": {"classification": 1}}]),
    "a flag out of its place": body(parameters={"binary_data": True}),
    "a nested value in parameters": body(parameters={"binary_data_output": {"a": 1}}),
    "a key the gateway does not know": body(priority=1),
    "a known key out of its place": body(name="INPUT0"),
    "a key twice": b'{"inputs": [], "inputs": ' + json.dumps(body()["inputs"]).encode() + b"}",
    "an over-long request id": body(id="x" * 300),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SMUGGLED))
def test_bodies_envoy_cannot_forward_as_they_are_go_to_the_gateway(stack, client, case):
    before_v1 = served_by_envoy(stack, V1)
    before_gateway = handed_over(stack)
    content = SMUGGLED[case]
    content = content if isinstance(content, bytes) else json.dumps(content).encode()
    client.post(path("demo_linear", "1"), content=content)
    assert served_by_envoy(stack, V1) == before_v1, case
    assert handed_over(stack) == before_gateway + 1, case
    # ... and the same call with Triton's binary flags only is Envoy's
    flags = body(parameters={"binary_data_output": False}, id="short")
    assert answer(client.post(path("demo_linear", "1"), json=flags)) == Y_V1
    assert served_by_envoy(stack, V1) == before_v1 + 1


def test_other_methods_compressed_bodies_and_callers_routing_headers_go_to_the_gateway(
    stack, client
):
    before_v1 = served_by_envoy(stack, V1)
    before_gateway = handed_over(stack)
    client.get(path("demo_linear", "1"))
    client.post(path("demo_linear", "1"), json=body(), headers={"content-encoding": "gzip"})
    client.post(path("demo_linear", "1"), json=body(), headers={"x-tensorgate-rest-gateway": "1"})
    client.post(path("demo_linear", "1") + "?x=1", json=body())  # not the exact path
    client.post("/v2/models/demo_l%69near/versions/1/infer", json=body())
    assert handed_over(stack) == before_gateway + 5
    # a caller's gRPC route key does not move a REST call
    response = client.post(
        path("demo_linear", "1"), json=body(), headers={"x-tensorgate-route": "demo_linear@2"}
    )
    assert answer(response) == Y_V1
    assert served_by_envoy(stack, V1) == before_v1 + 1


def test_callers_envoy_headers_do_not_change_the_routes_policy(stack, client):
    # The route has no timeout: a caller's x-envoy-upstream-rq-timeout-ms must not impose one
    start = time.monotonic()
    response = client.post(
        path("demo_sleep", "1"),
        json=sleep_body(0.2),
        headers={"x-envoy-upstream-rq-timeout-ms": "50"},
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - start >= 0.2
    # ... nor may a caller make Envoy retry what the route does not (a 400 here)
    tries = f"cluster.{V1}.upstream_rq_total"
    before = stack.envoy.counter(tries)
    bad = {"inputs": [{**_INPUT, "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}  # Triton: 400
    headers = {
        "x-envoy-retry-on": "retriable-status-codes",
        "x-envoy-retriable-status-codes": "400",
        "x-envoy-max-retries": "5",
    }
    assert client.post(path("demo_linear", "1"), json=bad, headers=headers).status_code == 400
    assert stack.envoy.counter(tries) == before + 1


def test_a_callers_deadline_takes_the_call_to_the_gateway_which_honours_it(stack, client):
    before = handed_over(stack)
    start = time.monotonic()
    response = client.post(
        path("demo_sleep", "1"), json=sleep_body(2.0), headers={"x-tensorgate-timeout-ms": "300"}
    )
    assert time.monotonic() - start < 1.5
    assert response.status_code == 504, response.text
    assert handed_over(stack) == before + 1


def test_envoys_answer_is_the_gateways_answer(stack, client):
    """What Envoy serves it serves exactly as the gateway would: the same call to the gateway's
    own REST listener gets the same status, body and variant headers."""
    with httpx.Client(base_url=stack.gateway.rest_url, timeout=10) as gateway:
        for request in (body(), body(id="call-1"), body(outputs=[{"name": "OUTPUT0"}])):
            through_envoy = client.post(path("demo_linear", "1"), json=request)
            direct = gateway.post(path("demo_linear", "1"), json=request)
            assert through_envoy.status_code == direct.status_code == 200
            assert through_envoy.json() == direct.json()
            # httpx asks for gzip: Triton would compress, the gateway does not
            assert "content-encoding" not in direct.headers
            assert "content-encoding" not in through_envoy.headers
            for header in ("x-tensorgate-variant", "x-tensorgate-backend"):
                assert through_envoy.headers[header] == direct.headers[header]


def test_bodies_over_the_bound_are_refused_by_envoy_only_on_routes_it_serves(stack, client):
    big = body(x=[1.0] * (MAX_BODY // 4))  # JSON: several bytes a value, over the bound
    response = client.post(path("demo_linear", "1"), json=big)
    assert response.status_code == 413
    assert "error" in response.json()  # Envoy's own answer, in the v2 error form
    # a handed-over route's body is not buffered by Envoy: the gateway answers it
    before = handed_over(stack)
    response = client.post(path("linear", "1"), json=big)
    assert response.status_code == 400 and "INPUT0" in response.json()["error"], response.text
    assert handed_over(stack) == before + 1


def test_retry_hides_a_flaky_backend(client):
    failed = [r.text for r in (client.post(path("demo_flaky", "1"), json=body()) for _ in range(100))
              if r.status_code != 200]  # fmt: skip
    assert failed == []


def test_the_flaky_backend_fails_without_retries(stack):
    # The scenario above proves something only if the model fails over HTTP too
    with httpx.Client(base_url=f"http://{stack.triton.http_address}", timeout=10) as direct:
        statuses = [direct.post(path("demo_flaky", "1"), json=body()).status_code
                    for _ in range(100)]  # fmt: skip
    assert 5 <= sum(s != 200 for s in statuses) <= 45, statuses
    assert set(statuses) <= {200, 500}  # INTERNAL: what the REST retries match


def test_per_try_timeout_is_a_504(client):
    start = time.monotonic()
    response = client.post(path("demo_sleep", "1"), json=sleep_body(2.0))
    assert time.monotonic() - start < 1.2
    assert response.status_code == 504
    assert "error" in response.json()


def _v2_inferences(triton) -> int:
    with oip_stub(triton.address) as stub:
        stats = stub.ModelStatistics(oip.ModelStatisticsRequest(name="demo_linear", version="2"))
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def test_shadow_copies_reach_the_shadow_and_the_caller_sees_the_primary(stack, client):
    before = _v2_inferences(stack.triton)
    for _ in range(10):
        assert answer(client.post(path("demo_linear", "1"), json=body())) == Y_V1
    deadline = time.monotonic() + 5
    while _v2_inferences(stack.triton) < before + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _v2_inferences(stack.triton) == before + 10


def test_a_callers_rest_path_header_has_no_effect(client):
    """x-tensorgate-rest-path names the path a shared backend cluster writes: only routes set
    it (overwriting), and the REST listener removes a caller's as the request arrives."""
    other = {"x-tensorgate-rest-path": "/v2/models/demo_identity/versions/1/infer"}
    for version, y in (("1", Y_V1), ("2", Y_V2)):
        response = client.post(path("demo_linear", version), json=body(), headers=other)
        assert (answer(response), response.json()["model_version"]) == (y, version)
    for _ in range(10):
        response = client.post(path("demo_linear"), json=body(), headers=other)
        assert response.json()["model_name"] == "demo_linear", response.text


def test_an_open_breaker_fails_fast(client):
    assert answer(client.post(path("demo_fail", "1"), json=sleep_body(0.0))) == [0.0]
    # demo_fail fails a negative input (INTERNAL: 500); three in a row eject the cluster's host
    failures = [client.post(path("demo_fail", "1"), json=sleep_body(-1.0)) for _ in range(3)]
    assert [r.status_code for r in failures] == [500] * 3, [r.text for r in failures]
    start = time.monotonic()
    refused = client.post(path("demo_fail", "1"), json=sleep_body(0.0))
    assert time.monotonic() - start < 0.5
    assert refused.status_code == 503 and "error" in refused.json(), refused.text


def test_fallback_to_a_variant(stack, client):
    request = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]}]}
    refused = "cluster.tgrb|rest-down|0|rb20-5.upstream_cx_connect_fail"
    before_up, before_down = (
        served_by_envoy(stack, "tgrb|triton-a|0|rb20-5"),
        stack.envoy.counter(refused),
    )
    for _ in range(5):
        response = client.post(path("demo_identity", "1"), json=request)
        assert answer(response) == [1, 2, 3]
    # each call tried the primary first (its REST port refused), then the fallback answered
    assert stack.envoy.counter(refused) >= before_down + 5
    assert served_by_envoy(stack, "tgrb|triton-a|0|rb20-5") == before_up + 5


def test_a_handed_over_route_is_answered_by_the_gateway(stack, client):
    before, before_rest = handed_over(stack), _rest_calls(stack.gateway)
    response = client.post(path("linear", "1"), json=body())
    assert answer(response) == Y_V1
    assert response.json()["model_name"] == "linear"  # the public name: the gateway renamed it
    assert response.headers["x-tensorgate-variant"] == "v1"
    assert handed_over(stack) == before + 1
    assert _rest_calls(stack.gateway) == before_rest + 1


def test_unknown_models_get_the_gateways_404(client):
    response = client.post(path("no_such_model"), json=body())
    assert response.status_code == 404
    assert "no_such_model" in response.json()["error"]
