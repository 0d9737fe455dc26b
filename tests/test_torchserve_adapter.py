"""The gateway in front of a real TorchServe (REST, OIP JSON handler), called with OIP clients."""

from __future__ import annotations

import functools

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from tests.builders import oip_stub, torchserve_backend, variant
from tests.gateway_process import GatewayProcess
from tests.oip import Y_V1, Y_V2, linear_request, output

LINEAR_SCHEMA = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}
TORCH_TYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"]


ts_variant = functools.partial(variant, backend="ts", backend_version=None)


@pytest.fixture(scope="module")
def gateway(torchserve):
    config = {
        "backends": [torchserve_backend(torchserve)],
        "routes": [
            {"model": "linear", "schema": LINEAR_SCHEMA, "variants": [
                ts_variant("v1", backend_model="linear", backend_version="1", version="1"),
                ts_variant("v2", backend_model="linear", backend_version="2", version="2", weight=0),
            ]},
            {"model": "linear-instances", "schema": LINEAR_SCHEMA, "variants": [
                ts_variant("x", backend_model="linear_instances", torchserve={"body_contract": "BODY_CONTRACT_INSTANCES_JSON"}),
            ]},
            {"model": "echo", "variants": [ts_variant("x", backend_model="echo")]},
            {"model": "missing", "variants": [ts_variant("x", backend_model="no_such_model")]},
        ],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }  # fmt: skip
    gw = GatewayProcess(config)  # some routes point at missing models: never "ready"
    with gw.start(wait="live"):
        yield gw


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address) as stub:
        yield stub


def linear_x(model: str = "linear", version: str = "", x=None) -> oip.ModelInferRequest:
    request = linear_request(model=model, version=version, **({"x": x} if x is not None else {}))
    request.inputs[0].name = "x"
    return request


def test_versions_contracts_metadata_readiness(gateway, stub):
    assert output(stub.ModelInfer(linear_x(version="1"))) == Y_V1
    response = stub.ModelInfer(linear_x(version="2"))
    assert (
        output(response) == Y_V2
        and response.outputs[0].name == "y"
        and list(response.outputs[0].shape) == [1, 3]
    )
    assert output(stub.ModelInfer(linear_x("linear-instances"))) == Y_V1
    batch = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    for model in ("linear", "linear-instances"):
        request = oip.ModelInferRequest(
            model_name=model, model_version="1" if model == "linear" else ""
        )
        oip_codec.add_input(request, "x", batch)
        got = oip_codec.output_array(stub.ModelInfer(request), 0)
        w1 = np.array([[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]], np.float32)
        assert np.array_equal(got, batch @ w1 + np.array([1, 0, -1], np.float32)), model
    client = tc.InferenceServerClient(gateway.address)
    meta = client.get_model_metadata("linear")  # from the route's declared schema
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 3])]
    assert client.is_model_ready("linear", "1") and client.is_model_ready("linear", "2")
    assert not client.is_model_ready("missing")
    with pytest.raises(Exception, match="ModelConfig is a Triton extension"):
        client.get_model_config("linear")


def test_torchserve_errors_map_to_grpc_codes(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear_x("missing"))  # TorchServe's 404 for a misrouted variant
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no_such_model" not in err.value.details()
    bad = oip.ModelInferRequest(model_name="echo")
    oip_codec.add_input(bad, "x", np.array([1, 2], dtype=np.uint32))
    with pytest.raises(grpc.RpcError) as err:  # torch has no uint32: refused before the call
        stub.ModelInfer(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "input 'x': datatype UINT32 is not supported by TorchServe backend 'ts'"
        in err.value.details()
    )
    words = oip.ModelInferRequest(model_name="echo")
    oip_codec.add_input(words, "x", np.array([b"a"], dtype=np.object_), "BYTES")
    with pytest.raises(grpc.RpcError) as err:  # the handler answers 400: INVALID_ARGUMENT
        stub.ModelInfer(words)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "TorchServe 400" in err.value.details()
    )


@pytest.mark.parametrize("datatype", TORCH_TYPES)
def test_datatypes_round_trip_exactly(stub, datatype):
    dtype = oip_codec.NUMPY_DTYPE[datatype]
    if datatype == "BOOL":
        array = np.array([[True, False], [False, True]])
    elif datatype == "BF16":
        array = np.array([1.5, -2.0, 3.140625], dtype=dtype)
    else:
        info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
        array = np.array([[info.min, 0, 1], [info.max, 2, 3]], dtype=dtype)
    request = oip.ModelInferRequest(model_name="echo")
    oip_codec.add_input(request, "x", array, datatype)
    response = stub.ModelInfer(request)
    assert response.outputs[0].datatype == datatype
    got = oip_codec.output_array(response, 0)
    assert got.shape == array.shape and got.tobytes() == array.tobytes()
