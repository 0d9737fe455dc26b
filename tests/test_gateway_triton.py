"""The gateway in front of a real Triton, exercised with stock clients."""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.builders import oip_stub, triton_backend, variant
from tests.gateway_process import GatewayProcess
from tests.oip import Y_V1, Y_V2, linear_request, output, sleep_request


@pytest.fixture(scope="module")
def gateway(triton):
    config = {
        "backends": [triton_backend(triton.address)],
        "routes": [
            {"model": "linear", "variants": [variant("stable", version="1", weight=80),
                                             variant("canary", backend_version="2", version="2", weight=20)]},
            # Renamed and pinned: public fraud v5 is demo_linear v2 on triton-a.
            {"model": "fraud", "variants": [variant("xgb", backend_version="2", version="5")]},
            {"model": "identity", "variants": [variant("only", backend_model="demo_identity", backend_version=None)]},
            {"model": "sleep", "variants": [variant("only", backend_model="demo_sleep", backend_version=None)]},
            {"model": "fail", "variants": [variant("only", backend_model="demo_fail", backend_version=None)]},
        ],
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        yield gw


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address) as stub:
        yield stub


def triton_inference_count(triton, model: str) -> int:
    with oip_stub(triton.address) as stub:
        stats = stub.ModelStatistics(oip.ModelStatisticsRequest(name=model))
    return sum(
        s.inference_stats.success.count + s.inference_stats.fail.count for s in stats.model_stats
    )


# --- every OIP RPC through stock tritonclient ------------------------------------------------


def test_sync_client_all_rpcs(gateway):
    client = tc.InferenceServerClient(gateway.address)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().name == "tensorgate"
    assert client.is_model_ready("linear")
    assert client.is_model_ready("linear", "2")
    assert not client.is_model_ready("linear", "9")
    assert not client.is_model_ready("no-such-model")

    meta = client.get_model_metadata("linear")
    assert meta.name == "linear"
    assert list(meta.versions) == ["1", "2"]
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        ("INPUT0", "FP32", [-1, 4])
    ]
    assert client.get_model_config("linear").config.name == "linear"

    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    inp = tc.InferInput("INPUT0", x.shape, "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("linear", [inp], model_version="1")
    assert result.as_numpy("OUTPUT0").tolist() == [Y_V1]
    assert result.get_response().model_name == "linear"
    assert result.get_response().model_version == "1"
    assert client.infer("linear", [inp], model_version="2").as_numpy("OUTPUT0").tolist() == [Y_V2]
    assert client.infer("linear", [inp]).as_numpy("OUTPUT0").tolist() in ([Y_V1], [Y_V2])


async def test_aio_client_all_rpcs(gateway):
    client = tc_aio.InferenceServerClient(gateway.address)
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("fraud", "5")
        assert (await client.get_model_metadata("fraud")).versions == ["5"]
        ids = np.array([3, 1, 4], dtype=np.int32)
        words = np.array([b"tensor", b"gate", b""], dtype=np.object_)
        inputs = [
            tc_aio.InferInput("INPUT0", [3], "INT32"),
            tc_aio.InferInput("INPUT1", [3], "BYTES"),
        ]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(words)
        result = await client.infer("identity", inputs)
        assert result.as_numpy("OUTPUT0").tolist() == [3, 1, 4]
        assert result.as_numpy("OUTPUT1").tolist() == [b"tensor", b"gate", b""]
        batch = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
        inp = tc_aio.InferInput("INPUT0", batch.shape, "FP32")
        inp.set_data_from_numpy(batch)
        result = await client.infer("linear", [inp], model_version="1")
        w1 = np.array([[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]], dtype=np.float32)
        assert np.array_equal(result.as_numpy("OUTPUT0"), batch @ w1 + np.array([1, 0, -1]))
    finally:
        await client.close()


# --- routing -----------------------------------------------------------------------------------


def test_version_pinning_and_variant_header(stub):
    response, call = stub.ModelInfer.with_call(linear_request(version="2"))
    assert output(response) == Y_V2
    headers = dict(call.trailing_metadata())
    assert headers["x-tensorgate-variant"] == "canary"
    assert headers["x-tensorgate-backend"] == "triton-a"


def test_renamed_and_pinned_variant(stub):
    response, call = stub.ModelInfer.with_call(linear_request(model="fraud", version="5"))
    assert output(response) == Y_V2
    assert (response.model_name, response.model_version) == ("fraud", "5")
    assert dict(call.trailing_metadata())["x-tensorgate-variant"] == "xgb"


async def test_weighted_split_80_20(gateway):
    calls = 2400
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        seen: collections.Counter[str] = collections.Counter()
        outputs: collections.Counter[str] = collections.Counter()

        async def worker(n: int) -> None:
            for _ in range(n):
                call = stub.ModelInfer(linear_request())
                response = await call
                variant = dict(await call.trailing_metadata())["x-tensorgate-variant"]
                seen[variant] += 1
                # The header must tell the truth: the answer is that version's output.
                outputs[
                    variant
                    + (
                        "-ok"
                        if output(response) == (Y_V1 if variant == "stable" else Y_V2)
                        else "-wrong"
                    )
                ] += 1

        await asyncio.gather(*(worker(calls // 16) for _ in range(16)))
    assert sum(seen.values()) == calls
    share = seen["stable"] / calls
    assert 0.76 <= share <= 0.84, seen
    assert outputs["stable-wrong"] == outputs["canary-wrong"] == 0


def test_route_key_is_sticky(stub):
    chosen: dict[str, set[str]] = {}
    for i in range(60):
        key = f"user-{i}"
        for _ in range(4):
            _, call = stub.ModelInfer.with_call(
                linear_request(), metadata=(("x-tensorgate-route-key", key),)
            )
            chosen.setdefault(key, set()).add(
                dict(call.trailing_metadata())["x-tensorgate-variant"]
            )
    assert all(len(v) == 1 for v in chosen.values()), chosen
    assert {next(iter(v)) for v in chosen.values()} == {"stable", "canary"}


def test_unknown_model_and_version_are_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear_request(model="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear_request(version="7"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no version '7'" in err.value.details() and "1, 2" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(oip.ModelMetadataRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelConfig(oip.ModelConfigRequest(name=""))
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "name is required" in err.value.details()
    )


# --- validation: INVALID_ARGUMENT, and Triton never sees the request ---------------------------


def _bad_requests() -> list[tuple[str, oip.ModelInferRequest, str]]:
    cases = []

    def case(label: str, expect: str):
        request = linear_request(version="1")
        cases.append((label, request, expect))
        return request

    r = case("no inputs", "has no inputs")
    del r.inputs[:]
    del r.raw_input_contents[:]
    r = case("bad datatype", "'FLOAT32' is not an Open Inference Protocol datatype")
    r.inputs[0].datatype = "FLOAT32"
    r = case(
        "raw length",
        "input 'INPUT0': shape [1,4] of FP32 needs 16 bytes, raw_input_contents[0] has 12",
    )
    r.raw_input_contents[0] = r.raw_input_contents[0][:12]
    r = case("shape vs raw", "needs 20 bytes")
    r.inputs[0].shape[:] = [1, 5]
    r = case("duplicate", "input 'INPUT0' appears more than once")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(r.raw_input_contents[0])
    r = case("raw count", "2 raw_input_contents for 1 inputs")
    r.raw_input_contents.append(b"")
    r = case(
        "typed count", "input 'INPUT0': shape [1,4] needs 4 elements, contents.fp32_contents has 3"
    )
    del r.raw_input_contents[:]
    r.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    r = case(
        "typed wrong field", "datatype FP32 takes contents.fp32_contents, got contents.int_contents"
    )
    del r.raw_input_contents[:]
    r.inputs[0].contents.int_contents.extend([1, 2, 3, 4])
    r = case("no data", "input 'INPUT0' has no data")
    del r.raw_input_contents[:]
    r = case("missing input (schema)", "model 'linear' has no input 'WRONG' (inputs: INPUT0)")
    r.inputs[0].name = "WRONG"
    r = case("datatype vs model", "input 'INPUT0': model 'linear' expects FP32, request has FP64")
    r.inputs[0].datatype = "FP64"
    r.raw_input_contents[0] = np.zeros(4, dtype=np.float64).tobytes()
    r = case("negative dim", "has a negative dimension")
    r.inputs[0].shape[:] = [-1, 4]
    return cases


def test_validation_errors_never_reach_triton(stub, triton):
    before = triton_inference_count(triton, "demo_linear")
    for label, request, expect in _bad_requests():
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert expect in err.value.details(), (label, err.value.details())
    assert triton_inference_count(triton, "demo_linear") == before
    stub.ModelInfer(linear_request(version="1"))  # and the counter does move for a good call
    assert triton_inference_count(triton, "demo_linear") == before + 1


def test_missing_required_input_named(stub):
    request = oip.ModelInferRequest(model_name="identity")
    request.inputs.add(
        name="INPUT1", datatype="BYTES", shape=[1], contents={"bytes_contents": [b"x"]}
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requires input(s) 'INPUT0'" in err.value.details()


def test_oversized_request(triton):
    config = {"backends": [triton_backend(triton.address)], "limits": {"max_request_bytes": 65536},
              "routes": [{"model": "linear", "variants": [variant("stable", version="1")]}]}  # fmt: skip
    with GatewayProcess(config) as gw, oip_stub(gw.address) as stub:
        big = linear_request(x=[0.0] * 4)
        big.inputs[0].shape[:] = [5000, 4]
        big.raw_input_contents[0] = bytes(5000 * 16)  # 80 kB: over the limit, under 2x
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(big)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the gateway's limit of 65536 bytes" in err.value.details()
        huge = linear_request()
        huge.inputs[0].shape[:] = [10000, 4]
        huge.raw_input_contents[0] = bytes(10000 * 16)  # 160 kB: gRPC's own ceiling (2x)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(huge)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert output(stub.ModelInfer(linear_request(version="1"))) == Y_V1


# --- backend errors ----------------------------------------------------------------------------


def test_backend_error_keeps_code_and_message(stub):
    request = sleep_request(-1.0, model="fail")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "demo_fail: INPUT0 must be >= 0" in err.value.details()


def test_deadline_is_passed_to_backend(stub):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(sleep_request(2.0), timeout=0.5)
    elapsed = time.monotonic() - start
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.45 <= elapsed < 1.5


def test_refused_backend_is_unavailable_never_unknown():
    from tests.backends.triton import free_port

    dead = f"127.0.0.1:{free_port()}"
    config = {"backends": [triton_backend(dead, "dead")],
              "routes": [{"model": "linear", "variants": [variant("a", backend="dead", backend_model=None, backend_version=None)]}]}  # fmt: skip
    with GatewayProcess(config).start(wait="live") as gw, oip_stub(gw.address) as stub:
        # The gateway is ready (started, not draining); the model is not.
        assert stub.ServerReady(oip.ServerReadyRequest()).ready
        assert not stub.ModelReady(oip.ModelReadyRequest(name="linear")).ready
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(linear_request())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "backend 'dead' unavailable" in err.value.details()
    # Opt-in: ready only while every route can answer.
    strict = {**config, "lifecycle": {"readiness": "READINESS_ALL_ROUTES"}}
    with GatewayProcess(strict).start(wait="live") as gw, oip_stub(gw.address) as stub:
        time.sleep(0.5)  # past the first probe round
        assert not stub.ServerReady(oip.ServerReadyRequest()).ready


# --- health, reflection, metrics -------------------------------------------------------------


def test_health_overall_and_per_service(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        liveness = health.Check(health_pb2.HealthCheckRequest(service="tensorgate.liveness"))
        assert liveness.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        infer = service.methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert "raw_input_contents" in infer.input_type.fields_by_name


def test_metrics_by_model_variant_backend_code(gateway, stub):
    stub.ModelInfer(linear_request(version="2"))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(linear_request(model="nope"))
    text = urllib.request.urlopen(gateway.metrics_url, timeout=5).read().decode()
    assert (
        'tensorgate_requests_total{backend="triton-a",code="OK",model="linear",protocol="grpc",variant="canary"}'
        in text
    )
    assert (
        'tensorgate_requests_total{backend="",code="NOT_FOUND",model="_unrouted",protocol="grpc",variant=""}'
        in text
    )
    assert (
        'tensorgate_request_duration_seconds_bucket{backend="triton-a",code="OK",le="0.005",model="linear",protocol="grpc",variant="canary"}'
        in text
    )
    assert 'tensorgate_requests_in_flight{model="linear"} 0.0' in text
    assert 'tensorgate_backend_up{backend="triton-a"} 1.0' in text


def test_stock_client_errors_are_readable(gateway):
    client = tc.InferenceServerClient(gateway.address)
    inp = tc.InferInput("INPUT0", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("linear", [inp])
    assert "INVALID_ARGUMENT" in str(err.value.status()) or "shape [1,3]" in err.value.message()


# --- statistics and the repository index (issue 13) --------------------------------------------


def test_inference_statistics_through_stock_tritonclient(gateway):
    """tritonclient's get_inference_statistics, answered from the gateway's own counts: the
    public model and version, successes, failures, the backend calls behind them."""
    client = tc.InferenceServerClient(gateway.address)
    before = client.get_inference_statistics("fraud", "5", as_json=True)
    before_ok = int(
        before["model_stats"][0]["inference_stats"]["success"].get("count", 0)
        if before.get("model_stats")
        else 0
    )
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    inp = tc.InferInput("INPUT0", x.shape, "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(7):
        client.infer("fraud", [inp])
    stats = client.get_inference_statistics("fraud", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("fraud", "5")]
    fraud = stats[0]
    assert int(fraud["inference_stats"]["success"]["count"]) == before_ok + 7
    assert int(fraud["inference_count"]) == before_ok + 7
    assert int(fraud["execution_count"]) >= 7
    assert int(fraud["inference_stats"]["success"]["ns"]) > 7 * 10_000  # > 10 us each
    assert int(fraud["last_inference"]) > 1_700_000_000_000  # ms since the epoch
    # a failing model counts failures
    failing = tc.InferInput("INPUT0", [1, 4], "FP32")
    failing.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException):
        client.infer("fail", [failing])
    fail_stats = client.get_inference_statistics("fail", as_json=True)["model_stats"][0]
    assert int(fail_stats["inference_stats"]["fail"]["count"]) >= 1
    # all models, and an unknown one
    names = {s["name"] for s in client.get_inference_statistics(as_json=True)["model_stats"]}
    assert {"fraud", "fail"} <= names
    with pytest.raises(InferenceServerException, match="no-such"):
        client.get_inference_statistics("no-such-model")


def test_repository_index_lists_public_models(gateway):
    client = tc.InferenceServerClient(gateway.address)
    index = client.get_model_repository_index(as_json=True)["models"]
    entries = {(m["name"], m.get("version", "")): m["state"] for m in index}
    assert entries[("linear", "1")] == "READY" and entries[("linear", "2")] == "READY"
    assert entries[("fraud", "5")] == "READY"
    assert ("demo_linear", "1") not in entries  # backend names stay private
