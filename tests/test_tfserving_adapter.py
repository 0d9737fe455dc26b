"""The gateway in front of TF Serving (the protocol-faithful stand-in: official stubs, real
SavedModels), called with stock tritonclient: the caller speaks OIP and cannot tell."""

from __future__ import annotations

import functools

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from tests.builders import oip_stub, tfserving_backend, variant
from tests.gateway_process import GatewayProcess
from tests.oip import Y_V1, Y_V2, linear_request, output

TF_NAME = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "half",
    "BF16": "bfloat16", "FP32": "float", "FP64": "double", "BYTES": "string",
}  # fmt: skip


tf_variant = functools.partial(variant, backend="tfs", backend_version=None)


@pytest.fixture(scope="module")
def gateway(tfserving):
    routes = [
        {
            "model": "linear",
            "variants": [
                tf_variant("v1", backend_model="linear", backend_version="1", version="1"),
                tf_variant(
                    "v2", backend_model="linear", backend_version="2", version="2", weight=0
                ),
                tf_variant(
                    "labelled",
                    backend_model="linear",
                    tfserving={"version_label": "canary"},
                    version="3",
                    weight=0,
                ),
            ],
        },
        {"model": "missing", "variants": [tf_variant("x", backend_model="no_such_model")]},
        {
            "model": "badsig",
            "variants": [
                tf_variant("x", backend_model="linear", tfserving={"signature_name": "nope"})
            ],
        },
    ]
    routes += [
        {"model": f"echo-{dt.lower()}", "variants": [tf_variant("x", backend_model="echo", tfserving={"signature_name": f"echo_{name}"})]}
        for dt, name in TF_NAME.items()
    ]  # fmt: skip
    config = {
        "backends": [tfserving_backend(tfserving.address)],
        "routes": routes,
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }
    gw = GatewayProcess(config)  # some routes point at missing models: never "ready"
    with gw.start(wait="live"):
        yield gw


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address) as stub:
        yield stub


def test_versions_labels_and_metadata(gateway, stub):
    assert output(stub.ModelInfer(linear_x(version="1"))) == Y_V1
    assert output(stub.ModelInfer(linear_x(version="2"))) == Y_V2
    response = stub.ModelInfer(linear_x(version="3"))  # version_label "canary" = 2
    assert output(response) == Y_V2 and (response.model_name, response.model_version) == (
        "linear",
        "3",
    )
    batch = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    request = oip.ModelInferRequest(model_name="linear", model_version="1")
    oip_codec.add_input(request, "x", batch)
    got = oip_codec.output_array(stub.ModelInfer(request), 0)
    w1 = np.array([[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]], np.float32)
    assert np.array_equal(got, batch @ w1 + np.array([1, 0, -1], np.float32))
    client = tc.InferenceServerClient(gateway.address)
    meta = client.get_model_metadata("linear", "1")
    assert meta.platform == "tensorflow_serving"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 3])]
    assert client.is_model_ready("linear", "1") and not client.is_model_ready("missing")
    with pytest.raises(Exception, match="ModelConfig is a Triton extension"):
        client.get_model_config("linear")


def linear_x(model: str = "linear", version: str = "") -> oip.ModelInferRequest:
    request = linear_request(model=model, version=version)
    request.inputs[0].name = "x"
    return request


def test_tf_serving_errors_pass_through(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear_x("missing"))  # a misrouted variant: the gateway's fault
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no_such_model" not in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear_x("badsig"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:  # the gateway's schema check, from the SignatureDef
        stub.ModelInfer(linear_request(version="1"))  # input named INPUT0, the signature says x
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'linear' has no input 'INPUT0' (inputs: x)" in err.value.details()


def _sample(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(3, dtype=np.object_)
        array[:] = [b"tensor", b"", b"\x00\xffgate"]
        return array
    if datatype == "BOOL":
        return np.array([[True, False], [False, True]])
    if datatype == "BF16":
        return np.array([1.5, -2.0, 3.140625], dtype=ml_dtypes.bfloat16)
    dtype = oip_codec.NUMPY_DTYPE[datatype]
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
    return np.array([[info.min, 0, 1], [info.max, 2, 3]], dtype=dtype)


@pytest.mark.parametrize("datatype", list(TF_NAME))
def test_every_datatype_round_trips_exactly(stub, datatype):
    array = _sample(datatype)
    request = oip.ModelInferRequest(model_name=f"echo-{datatype.lower()}")
    oip_codec.add_input(request, "x", array, datatype)
    response = stub.ModelInfer(request)
    assert response.outputs[0].datatype == datatype
    got = oip_codec.output_array(response, 0)
    assert got.shape == array.shape
    if datatype == "BYTES":
        assert list(got.reshape(-1)) == list(array.reshape(-1))
    else:
        assert got.tobytes() == array.tobytes()
