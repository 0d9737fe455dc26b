"""The TorchServe adapter through its whole call: the body TorchServe gets (orjson, values as
the old json.dumps body carried them) and a real TorchServe, directly, behind the fault proxy
(resets, a hung peer, refused connects) and restarted (tests/test_torchserve_transport.py tests
the transport alone)."""

from __future__ import annotations

import asyncio
import json

import grpc
import ml_dtypes
import numpy as np
import pytest
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as oip

from adapters.base import BackendError
from adapters.codecs import oip as oip_codec
from adapters.torchserve import TorchServeAdapter
from gateway.dataplane.target import Target
from tensorgate.config.v1 import config_pb2
from tests.faults.proxy import FaultProxy

LINEAR_SCHEMA = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


# ------------------------------------------------------------------ the body, as TorchServe gets it


def adapter_at(address: str, *, connect_timeout: str = "5s") -> TorchServeAdapter:
    backend = json_format.ParseDict(
        {"name": "ts", "kind": "BACKEND_KIND_TORCHSERVE", "address": address,
         "connection": {"connect_timeout": connect_timeout}},
        config_pb2.Backend(),
    )  # fmt: skip
    return TorchServeAdapter(backend)


def target(model: str, version: str = "1", schema=None, contract=None) -> Target:
    options = None
    if contract is not None:
        options = config_pb2.TorchServeVariant(body_contract=contract)
    return Target(
        model=model, variant="v", backend="ts", backend_model=model, backend_version=version,
        version=version, weight=1, options=options,
        schema=json_format.ParseDict(schema, config_pb2.ModelSchema()) if schema else None,
    )  # fmt: skip


def old_value(array: np.ndarray, datatype: str) -> list:
    """The `data` list the adapter sent before orjson: tolist(), FP16/BF16 through float32."""
    flat = array.reshape(-1)
    return (flat.astype(np.float32) if datatype in ("FP16", "BF16") else flat).tolist()


BODY_CASES = {
    "FP32": np.array([[0.1, 1e-5, 3.4e38], [-0.0, 7.0, 1 / 3]], np.float32),
    "FP32-nonfinite": np.array([np.nan, np.inf, -np.inf, 1.5], np.float32),
    "FP64": np.array([0.1, 1e300, 5e-324, -2.5]),
    "FP16": np.array([0.1, 65504, -6e-8], np.float16),
    "BF16": np.array([1.5, -2.0, 3.140625, 1e30], ml_dtypes.bfloat16),
    "INT64": np.array([-(2**63), 2**63 - 1, 0], np.int64),
    "INT8": np.array([[-128, 127]], np.int8),
    "UINT8": np.array([0, 255], np.uint8),
    "BOOL": np.array([True, False]),
    "BYTES": np.array([b"a\xff\x00", b""], dtype=np.object_),
}


@pytest.mark.parametrize("case", BODY_CASES)
def test_bodies_carry_the_values_the_old_encoding_did(case):
    array = BODY_CASES[case]
    datatype = case.split("-")[0]
    request = oip.ModelInferRequest(model_name="echo", id="r1")
    oip_codec.add_input(request, "x", array, datatype)
    request.outputs.add(name="y")
    adapter = adapter_at("127.0.0.1:9")
    body = adapter._body(request, config_pb2.BODY_CONTRACT_OIP_JSON)
    sent = json.loads(body)  # Python's json: what the handler reads (NaN included)
    tensor = sent["inputs"][0]
    assert sent["id"] == "r1" and sent["outputs"] == [{"name": "y"}]
    assert tensor["shape"] == list(array.shape) and tensor["datatype"] == datatype
    if datatype == "BYTES":
        assert tensor["data"] == [{"b64": "Yf8A"}, {"b64": ""}]
    else:  # the same numbers, bit for bit, in the JSON types the old body had
        expected = old_value(array, datatype)
        assert json.dumps(tensor["data"]) == json.dumps(expected)
    if datatype in ("FP32", "FP64", "FP16", "BF16", "INT64", "INT8", "UINT8", "BOOL"):
        instances = json.loads(adapter._body(request, config_pb2.BODY_CONTRACT_INSTANCES_JSON))
        old = array.astype(np.float64 if array.dtype.kind == "f" else array.dtype).tolist()
        assert json.dumps(instances["instances"]) == json.dumps(old)


# ------------------------------------------------------------------ a real TorchServe


def linear_call(version: str = "1") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="linear")
    oip_codec.add_input(request, "x", np.array([[1, 2, 3, 4]], np.float32))
    return request


Y_V1 = [[4.0, 8.0, 12.0]]


async def test_adapter_through_faults(torchserve):
    with FaultProxy(torchserve.inference_url.removeprefix("http://")) as proxy:
        adapter = adapter_at(proxy.address, connect_timeout="1s")
        linear = target("linear", schema=LINEAR_SCHEMA)
        try:
            answers = await asyncio.gather(
                *(adapter.infer(linear_call(), timeout=10, target=linear) for _ in range(40))
            )
            assert all(oip_codec.output_array(a, 0).tolist() == Y_V1 for a in answers)
            assert proxy.connections_accepted <= 40  # one per call in flight at most...
            before = proxy.connections_accepted
            for _ in range(20):
                await adapter.infer(linear_call(), timeout=10, target=linear)
            assert proxy.connections_accepted == before  # ...then kept alive and reused

            proxy.reset()  # connections reset, and every new one
            with pytest.raises(BackendError) as err:
                await adapter.infer(linear_call(), timeout=5, target=linear)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "backend 'ts' unavailable" in err.value.message
            proxy.heal()
            await adapter.infer(linear_call(), timeout=10, target=linear)

            proxy.blackhole()  # a hung TorchServe
            with pytest.raises(BackendError) as err:
                await adapter.infer(linear_call(), timeout=0.5, target=linear)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert err.value.message == "backend 'ts' did not answer in time"
            proxy.refuse()
            with pytest.raises(BackendError) as err:
                await adapter.infer(linear_call(), timeout=5, target=linear)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert not await adapter.ready()
            proxy.heal()
            assert await adapter.ready()
            answer = await adapter.infer(linear_call(), timeout=10, target=linear)
            assert oip_codec.output_array(answer, 0).tolist() == Y_V1
        finally:
            await adapter.close()


async def test_adapter_answers_and_errors_from_torchserve(torchserve):
    adapter = adapter_at(torchserve.inference_url.removeprefix("http://"))
    try:
        echo = target("echo")
        request = oip.ModelInferRequest(model_name="echo")
        values = np.array([[np.nan, np.inf, -np.inf, 0.1, 3.4e38]], np.float32)
        oip_codec.add_input(request, "x", values)
        got = oip_codec.output_array(await adapter.infer(request, timeout=10, target=echo), 0)
        assert got.dtype == np.float32 and got.tobytes() == values.tobytes()  # NaN both ways

        pixels = np.random.default_rng(1).integers(0, 256, (5, 700)).astype(np.float32)
        request = oip.ModelInferRequest(model_name="echo")
        oip_codec.add_input(request, "x", pixels)
        got = oip_codec.output_array(await adapter.infer(request, timeout=10, target=echo), 0)
        assert np.array_equal(got, pixels)

        instances = target(
            "linear_instances", schema=LINEAR_SCHEMA,
            contract=config_pb2.BODY_CONTRACT_INSTANCES_JSON,
        )  # fmt: skip
        answer = await adapter.infer(linear_call(), timeout=10, target=instances)
        assert oip_codec.output_array(answer, 0).tolist() == Y_V1

        with pytest.raises(BackendError) as err:
            await adapter.infer(linear_call(), timeout=10, target=target("no_such_model"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert err.value.message.startswith("TorchServe 404: ")
        words = oip.ModelInferRequest(model_name="echo")
        oip_codec.add_input(words, "x", np.array([b"a"], dtype=np.object_), "BYTES")
        with pytest.raises(BackendError) as err:  # the handler refuses BYTES: 400
            await adapter.infer(words, timeout=10, target=echo)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message.startswith("TorchServe 400: ") and "BYTES" in err.value.message
    finally:
        await adapter.close()


def test_adapter_survives_a_torchserve_restart():
    from tests.backends.torchserve import TorchServe

    async def calls(adapter: TorchServeAdapter, n: int) -> None:
        linear = target("linear", schema=LINEAR_SCHEMA)
        answers = await asyncio.gather(
            *(adapter.infer(linear_call(), timeout=10, target=linear) for _ in range(n))
        )
        assert all(oip_codec.output_array(a, 0).tolist() == Y_V1 for a in answers)

    async def scenario(ts: TorchServe) -> None:
        adapter = adapter_at(ts.inference_url.removeprefix("http://"))
        try:
            await calls(adapter, 8)  # eight idle keep-alive connections in the pool
            await asyncio.to_thread(ts.restart)  # same port; the old connections are gone
            await calls(adapter, 8)  # no call fails on a connection of the old server
        finally:
            await adapter.close()

    with TorchServe(models=[("linear", "1")], workers=1) as ts:
        asyncio.run(scenario(ts))


async def test_backend_calls_ignore_proxy_environment(torchserve, monkeypatch):
    # The route table names the backend's address; a proxy in the environment is not asked.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    backend = json_format.ParseDict(
        {"name": "ts", "kind": "BACKEND_KIND_TORCHSERVE",
         "address": torchserve.inference_url.removeprefix("http://"),
         "torchserve": {"management_address": torchserve.management_url.removeprefix("http://")}},
        config_pb2.Backend(),
    )  # fmt: skip
    adapter = TorchServeAdapter(backend)
    try:
        answer = await adapter.infer(
            linear_call(), timeout=10, target=target("linear", schema=LINEAR_SCHEMA)
        )
        assert oip_codec.output_array(answer, 0).tolist() == Y_V1
        assert await adapter.ready() and await adapter.ready("linear", "1")
    finally:
        await adapter.close()
