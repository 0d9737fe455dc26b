"""Cross-backend conformance: one linear model (the same integer W, b) on Triton, TF Serving and
TorchServe. The same OIP requests through the gateway must give byte-identical answers, in one
format, and the same error codes, whichever backend serves them."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from tests.builders import oip_stub, tfserving_backend, torchserve_backend, triton_backend, variant
from tests.gateway_process import GatewayProcess

W = np.array([[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]], dtype=np.float32)
B = np.array([1, 0, -1], dtype=np.float32)
SCHEMA = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}
ROUTES = ("on-triton", "on-tfserving", "on-torchserve")


@pytest.fixture(scope="module")
def gateway(triton, tfserving, torchserve):
    triton_v1 = variant(
        "triton", backend="triton", input_names={"x": "INPUT0"}, output_names={"y": "OUTPUT0"}
    )
    tf_v1 = variant("tfserving", backend="tfs", backend_model="linear")
    ts_v1 = variant("torchserve", backend="ts", backend_model="linear")
    config = {
        "backends": [
            triton_backend(triton.address, "triton"),
            tfserving_backend(tfserving.address),
            torchserve_backend(torchserve),
        ],
        "routes": [
            {"model": "on-triton", "variants": [{**triton_v1, "version": "1"}]},
            {"model": "on-tfserving", "variants": [{**tf_v1, "version": "1"}]},
            {"model": "on-torchserve", "schema": SCHEMA, "variants": [{**ts_v1, "version": "1"}]},
            # A Triton primary with a TorchServe canary (and TF Serving too), one interface.
            {"model": "mixed", "schema": SCHEMA, "variants": [{**triton_v1, "weight": 2}, tf_v1, ts_v1]},
        ],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config, rest=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address) as stub:
        yield stub


def request_for(model: str, x: np.ndarray, version: str = "") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    oip_codec.add_input(request, "x", x)
    return request


def test_identical_outputs_for_batch_sizes_1_to_64(stub):
    rng = np.random.default_rng(7)
    for batch in range(1, 65):
        x = rng.integers(-50, 50, size=(batch, 4)).astype(np.float32)
        expected = x @ W + B
        answers = []
        for model in ROUTES:
            response = stub.ModelInfer(request_for(model, x))
            # one answer format: public names, output y, FP32, shape [batch, 3], raw contents
            assert (response.model_name, [o.name for o in response.outputs]) == (model, ["y"])
            assert response.outputs[0].datatype == "FP32" and list(response.outputs[0].shape) == [
                batch,
                3,
            ]
            answers.append(response.raw_output_contents[0])
        assert answers[0] == answers[1] == answers[2], batch
        assert np.frombuffer(answers[0], np.float32).reshape(batch, 3).tolist() == expected.tolist()


def test_rest_gives_every_backend_the_same_answers_as_grpc(gateway, stub):
    """TorchServe and TF Serving over REST: the REST listener hands the call to the same
    adapters, which translate after it."""
    rng = np.random.default_rng(11)
    for batch in (1, 3, 17):
        x = rng.integers(-50, 50, size=(batch, 4)).astype(np.float32)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [batch, 4],
                            "data": x.reshape(-1).tolist()}]}  # fmt: skip
        for model in ROUTES:
            reply = httpx.post(f"{gateway.rest_url}/v2/models/{model}/infer", json=body, timeout=30)
            assert reply.status_code == 200, (model, reply.text)
            (out,) = reply.json()["outputs"]
            assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [batch, 3])
            grpc_answer = stub.ModelInfer(request_for(model, x)).raw_output_contents[0]
            assert np.array(out["data"], np.float32).tobytes() == grpc_answer, model
        bad = httpx.post(f"{gateway.rest_url}/v2/models/on-torchserve/infer", timeout=30,
                         json={"inputs": [{**body["inputs"][0], "name": "z"}]})  # fmt: skip
        assert bad.status_code == 400 and "z" in bad.json()["error"]


def test_mixed_route_answers_consistently(stub):
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    seen: dict[str, bytes] = {}
    for _ in range(60):
        response, call = stub.ModelInfer.with_call(request_for("mixed", x))
        variant = dict(call.trailing_metadata())["x-tensorgate-variant"]
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
            ("y", "FP32", [1, 3])
        ]
        seen[variant] = response.raw_output_contents[0]
    assert set(seen) == {"triton", "tfserving", "torchserve"}
    assert len(set(seen.values())) == 1
    assert np.frombuffer(next(iter(seen.values())), np.float32).tolist() == [4, 8, 12]


def _bad_requests(model: str) -> dict[str, tuple[oip.ModelInferRequest, grpc.StatusCode]]:
    wide = request_for(model, np.zeros((1, 5), np.float32))
    doubles = request_for(model, np.zeros((1, 4), np.float64))
    renamed = request_for(model, np.zeros((1, 4), np.float32))
    renamed.inputs[0].name = "z"
    short = request_for(model, np.zeros((1, 4), np.float32))
    short.raw_input_contents[0] = short.raw_input_contents[0][:8]
    return {
        "shape": (wide, grpc.StatusCode.INVALID_ARGUMENT),
        "datatype": (doubles, grpc.StatusCode.INVALID_ARGUMENT),
        "unknown input": (renamed, grpc.StatusCode.INVALID_ARGUMENT),
        "short raw data": (short, grpc.StatusCode.INVALID_ARGUMENT),
        "unknown version": (
            request_for(model, np.zeros((1, 4), np.float32), version="9"),
            grpc.StatusCode.NOT_FOUND,
        ),
    }


def test_same_error_codes_for_the_same_bad_inputs(stub):
    codes: dict[str, set] = {}
    for model in ROUTES:
        for label, (request, expected) in _bad_requests(model).items():
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request)
            codes.setdefault(label, set()).add(err.value.code())
            assert err.value.code() == expected, (model, label, err.value.details())
    assert all(len(found) == 1 for found in codes.values()), codes


def test_metadata_has_one_interface(stub):
    for model in ROUTES:
        meta = stub.ModelMetadata(oip.ModelMetadataRequest(name=model))
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 4])
        ], model
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("y", "FP32", [-1, 3])
        ], model
