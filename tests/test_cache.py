"""The response cache against a real Triton: hits carry the trailer and cost no backend call,
identical concurrent misses make one call, errors and degraded answers are never kept, a route
change or the TTL ends reuse, the byte bound evicts, and the metrics say so."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from gateway.controlplane.config import ConfigError, load_yaml
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.builders import oip_stub, triton_backend, variant
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess
from tests.loadgen import metric, scrape
from tests.oip import Y_V1, linear_request, output, sleep_request

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
CACHE = {"deterministic": True, "max_bytes": 1 << 20, "ttl": "30s"}
STATIC = {"outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3], "fp_values": [0, 0, 0]}]}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(triton):
    config = {
        # No breaker: the failing model's calls must all reach Triton, so they can be counted.
        "backends": [triton_backend(triton.address, circuit_breaker={"disabled": True})],
        "routes": [
            {"model": "linear", "variants": [variant("stable")], "policy": {"response_cache": CACHE}},
            {"model": "uncached", "variants": [variant("stable")]},
            {"model": "sleep", "variants": [variant("only", backend_model="demo_sleep", backend_version="")], "policy": {"response_cache": CACHE}},
            {"model": "fail", "variants": [variant("only", backend_model="demo_fail", backend_version="")], "policy": {"response_cache": CACHE}},
            {"model": "degraded", "variants": [variant("only", backend_model="demo_fail", backend_version="")],
             "policy": {"response_cache": CACHE, "fallback": [{"static_response": STATIC}]}},
            {"model": "short", "variants": [variant("stable")],
             "policy": {"response_cache": {"deterministic": True, "ttl": "0.5s"}}},
            {"model": "small", "variants": [variant("stable")],
             "policy": {"response_cache": {"deterministic": True, "max_bytes": 4096}}},
        ],
        "lifecycle": {"shutdown_grace": "2s"},
    }  # fmt: skip
    with GatewayProcess(config, admin=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address) as stub:
        yield stub


@pytest.fixture(scope="module")
def triton_client(triton):
    client = tc.InferenceServerClient(triton.address)
    yield client
    client.close()


def _count(client, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    inference = [s["inference_stats"] for s in stats]
    return sum(
        int(s.get(kind, {}).get("count", 0)) for s in inference for kind in ("success", "fail")
    )


def executions(client, model: str) -> int:
    """Requests Triton has run for `model`, successful or failed, once its statistics have
    settled (Triton updates them just after answering): the same count twice, 150 ms apart."""
    count = _count(client, model)
    while True:
        time.sleep(0.15)
        again = _count(client, model)
        if again == count:
            return count
        count = again


def call(stub, request) -> tuple[oip.ModelInferResponse, dict]:
    response, rpc = stub.ModelInfer.with_call(request, timeout=10)
    return response, dict(rpc.trailing_metadata())


def test_a_repeated_request_is_answered_from_the_cache(gateway, stub, triton_client):
    x = [9.0, 1.0, 2.0, 3.0]
    before = executions(triton_client, "demo_linear")
    first, first_trailers = call(stub, linear_request(x=x))
    second, trailers = call(stub, linear_request(x=x))
    assert executions(triton_client, "demo_linear") == before + 1  # one backend call for two
    assert "x-tensorgate-cache" not in first_trailers
    assert trailers["x-tensorgate-cache"] == "hit"
    assert trailers["x-tensorgate-variant"] == "stable"
    assert second.SerializeToString() == first.SerializeToString()
    assert second.model_name == "linear"
    # The request id is the caller's, not the first caller's.
    request = linear_request(x=x)
    request.id = "call-7"
    third, _ = call(stub, request)
    assert third.id == "call-7" and output(third) == output(first)
    # A different request is a miss; the same on an uncached route always reaches Triton.
    call(stub, linear_request(x=[9.0, 1.0, 2.0, 4.0]))
    assert executions(triton_client, "demo_linear") == before + 2
    for _ in range(2):
        _, trailers = call(stub, linear_request("uncached", x=x))
        assert "x-tensorgate-cache" not in trailers
    assert executions(triton_client, "demo_linear") == before + 4


def test_concurrent_identical_misses_make_one_backend_call(gateway, triton_client):
    async def burst() -> list[tuple[str, dict, float]]:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def one():
                rpc = stub.ModelInfer(sleep_request(0.3), timeout=10)
                response = await rpc
                return output(response), dict(await rpc.trailing_metadata())

            return await asyncio.gather(*(one() for _ in range(20)))

    before = executions(triton_client, "demo_sleep")
    started = time.monotonic()
    answers = asyncio.run(burst())
    elapsed = time.monotonic() - started
    assert executions(triton_client, "demo_sleep") == before + 1
    assert all(values == pytest.approx([0.3]) for values, _ in answers)
    assert sum(t.get("x-tensorgate-cache") == "hit" for _, t in answers) == 19
    assert elapsed < 2.0  # they waited for one 0.3 s call, not twenty in a row


def test_errors_and_degraded_answers_are_never_kept(gateway, stub, triton_client):
    before = executions(triton_client, "demo_fail")
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(sleep_request(-1.0, model="fail"), timeout=10)
        assert err.value.code() != grpc.StatusCode.OK
    assert executions(triton_client, "demo_fail") == before + 3
    for _ in range(3):
        response, trailers = call(stub, sleep_request(-1.0, model="degraded"))
        assert trailers["x-tensorgate-degraded"] == "static"
        assert "x-tensorgate-cache" not in trailers
        assert output(response) == [0.0, 0.0, 0.0]
    assert executions(triton_client, "demo_fail") == before + 6


def test_a_route_change_stops_reuse(gateway, stub, triton_client):
    x = [5.0, 5.0, 5.0, 5.0]
    call(stub, linear_request(x=x))
    _, trailers = call(stub, linear_request(x=x))
    assert trailers.get("x-tensorgate-cache") == "hit"
    with grpc.insecure_channel(gateway.admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.SetVariantWeights(
            admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 7}),
            metadata=ADMIN,
            timeout=10,
        )
    before = executions(triton_client, "demo_linear")
    _, trailers = call(stub, linear_request(x=x))
    assert "x-tensorgate-cache" not in trailers  # a new revision of the route: a miss
    assert executions(triton_client, "demo_linear") == before + 1
    _, trailers = call(stub, linear_request(x=x))
    assert trailers.get("x-tensorgate-cache") == "hit"


def test_ttl_and_byte_bound(gateway, stub):
    x = [1.0, 2.0, 3.0, 4.0]
    call(stub, linear_request("short", x=x))
    assert call(stub, linear_request("short", x=x))[1].get("x-tensorgate-cache") == "hit"
    time.sleep(0.6)
    assert "x-tensorgate-cache" not in call(stub, linear_request("short", x=x))[1]
    # 4 KiB holds about a dozen small answers: writing 40 distinct ones evicts the oldest.
    for k in range(40):
        call(stub, linear_request("small", x=[float(k), 0.0, 0.0, 0.0]))
    assert "x-tensorgate-cache" not in call(stub, linear_request("small", x=[0.0] * 4))[1]
    samples = scrape(gateway.metrics_url)
    assert metric(samples, "tensorgate_cache_evictions_total", model="small") >= 20
    assert 0 < metric(samples, "tensorgate_cache_bytes", model="small") <= 4096
    assert metric(samples, "tensorgate_cache_requests_total", model="linear", result="hit") >= 3
    assert metric(samples, "tensorgate_cache_requests_total", model="sleep", result="coalesced") == 19  # fmt: skip
    assert metric(samples, "tensorgate_cache_requests_total", model="fail", result="miss") == 3


def test_known_answer_through_the_cache(stub):
    x = [1.0, 2.0, 3.0, 4.0]
    for _ in range(2):
        response, _ = call(stub, linear_request("linear", x=x))
        assert output(response) == pytest.approx(Y_V1)


def test_a_cache_must_be_declared_deterministic():
    text = """
backends: [{name: t, kind: BACKEND_KIND_TRITON, address: "127.0.0.1:1"}]
routes:
  - model: m
    variants: [{name: a, backend: t, weight: 1}]
    policy: {response_cache: {max_bytes: 1000}}
"""
    with pytest.raises(ConfigError) as err:
        load_yaml(text)
    assert any(
        "routes[0].policy.response_cache.deterministic: must be true" in str(p)
        for p in err.value.problems
    )
