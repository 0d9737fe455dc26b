"""BACKEND_KIND_OIP: the gateway in front of a real Open Inference Protocol server that is not
Triton (KServe's Python model server 0.21, tests/backends/kserve.py), called with stock
tritonclient. What the server itself answers is pinned first (docs/backends-oip.md), then what
callers get through the gateway.

One KServe server and one gateway for the module (~3 s + ~2 s); a second KServe server is started
and killed by the test of a backend going down.
"""

from __future__ import annotations

import functools
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.utils import InferenceServerException

from adapters.oip import requested_only
from gateway.controlplane.config import ConfigError, from_dict
from gateway.controlplane.envoy.decide import decide
from tests.backends.kserve import KServeServer
from tests.backends.process import free_port
from tests.builders import backend, oip_stub, variant
from tests.gateway_process import GatewayProcess

X = np.array([[1.0, 2.0, 3.0, 4.0], [-0.5, 0.0, 0.25, 1e3]], dtype=np.float32)


@pytest.fixture(scope="module")
def kserve():
    with KServeServer() as server:
        yield server


@pytest.fixture(scope="module")
def kserve_stub(kserve):
    with oip_stub(kserve.address) as stub:
        yield stub


# A port for a second KServe server, started (and killed) by test_server_killed_is_unavailable.
LATE_PORT = free_port()


# Each route's one variant "v"; KServe models have no versions to name.
on_kserve = functools.partial(variant, "v", backend="kserve-a", backend_version=None)


def gateway_config(kserve_address: str) -> dict:
    return {
        "backends": [
            backend("BACKEND_KIND_OIP", kserve_address, "kserve-a"),
            # Nothing listens there: connection refused.
            backend("BACKEND_KIND_OIP", f"127.0.0.1:{free_port()}", "kserve-down"),
            backend("BACKEND_KIND_OIP", f"127.0.0.1:{LATE_PORT}", "kserve-late", per_try_timeout="2s"),
        ],
        "routes": [
            # Public version "1"; the server has no versions, so the variant names none.
            {"model": "linear", "variants": [on_kserve(backend_model="linear", version="1")]},
            {"model": "renamed", "variants": [on_kserve(
                backend_model="linear", input_names={"x": "input-0"}, output_names={"y": "output-0"})]},
            {"model": "multi", "variants": [on_kserve(backend_model="multi")]},
            {"model": "missing", "variants": [on_kserve(backend_model="no_such_model")]},
            {"model": "failing", "variants": [on_kserve(backend_model="failing")]},
            {"model": "not-ready", "variants": [on_kserve(backend_model="not_ready")]},
            {"model": "down", "variants": [on_kserve(backend_model="linear", backend="kserve-down")]},
            {"model": "late", "variants": [on_kserve(backend_model="linear", backend="kserve-late")]},
        ],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def gateway(kserve):
    gw = GatewayProcess(gateway_config(kserve.address))  # some backends are down: never "ready"
    with gw.start(wait="live"):
        yield gw


@pytest.fixture(scope="module")
def client(gateway):
    return tc.InferenceServerClient(gateway.address)


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address) as stub:
        yield stub


def linear_input(name: str = "input-0", array: np.ndarray = X) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def raw_request(model: str, version: str = "", name: str = "input-0") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.tobytes())
    return request


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


def trailer(err: grpc.RpcError, key: str) -> str | None:
    return dict(err.trailing_metadata() or ()).get(key)


# --- what the server answers (the facts docs/backends-oip.md states) ------------------------------


def test_the_server_as_documented(kserve_stub):
    err = rpc_error(kserve_stub.ModelConfig, oip.ModelConfigRequest(name="linear"))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    meta = kserve_stub.ModelMetadata(oip.ModelMetadataRequest(name="linear", version="7"))
    assert list(meta.versions) == [] and meta.platform == ""
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("output-0", "FP32", [-1, -1])
    ]
    # model_version is ignored everywhere: any version is "the" model.
    assert kserve_stub.ModelReady(oip.ModelReadyRequest(name="linear", version="7")).ready
    reply = kserve_stub.ModelInfer(raw_request("linear", version="7"))
    assert reply.model_version == ""
    assert (
        np.frombuffer(reply.raw_output_contents[0], np.float32).tolist()
        == (2 * X + 1).ravel().tolist()
    )
    # An unknown model is NOT_FOUND for ModelReady too (Triton: ready=false).
    err = rpc_error(kserve_stub.ModelReady, oip.ModelReadyRequest(name="nope"))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "Model with name nope does not exist.",
    )
    # Requested outputs are not honoured: every output comes back.
    request = oip.ModelInferRequest(model_name="multi")
    for name, values in (("a", [1.0, 2.0]), ("b", [10.0, 20.0])):
        request.inputs.add(name=name, datatype="FP32", shape=[2]).contents.fp32_contents[:] = values
    request.outputs.add(name="diff")
    assert [o.name for o in kserve_stub.ModelInfer(request).outputs] == ["sum", "diff"]
    # Parameters are accepted and handed to the model unread.
    request = raw_request("linear")
    request.parameters["priority"].int64_param = 1
    request.inputs[0].parameters["anything"].string_param = "x"
    assert len(kserve_stub.ModelInfer(request).outputs) == 1
    err = rpc_error(lambda: list(kserve_stub.ModelStreamInfer(iter([raw_request("linear")]))))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# --- through the gateway --------------------------------------------------------------------------


def test_infer_with_stock_tritonclient(client):
    result = client.infer("linear", [linear_input()])
    assert np.array_equal(result.as_numpy("output-0"), 2 * X + 1)
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("linear", "1")
    pinned = client.infer("linear", [linear_input()], model_version="1", request_id="req-9")
    assert np.array_equal(pinned.as_numpy("output-0"), 2 * X + 1)
    assert pinned.get_response().id == "req-9"
    with pytest.raises(InferenceServerException) as err:
        client.infer("linear", [linear_input()], model_version="2")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_typed_contents_and_empty_input(stub):
    request = oip.ModelInferRequest(model_name="linear")
    tensor = request.inputs.add(name="input-0", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents[:] = [1.5, -2.0, 0.0]
    reply = stub.ModelInfer(request)
    assert [(o.name, list(o.shape)) for o in reply.outputs] == [("output-0", [1, 3])]
    assert list(reply.outputs[0].contents.fp32_contents) == [4.0, -3.0, 1.0]
    # No data for an input with no elements: this server needs none (Triton does).
    request = oip.ModelInferRequest(model_name="linear")
    request.inputs.add(name="input-0", datatype="FP32", shape=[0, 4])
    assert list(stub.ModelInfer(request).outputs[0].shape) == [0, 4]


def test_metadata_and_config(client):
    meta = client.get_model_metadata("linear")
    assert (meta.name, list(meta.versions), meta.platform) == ("linear", ["1"], "")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input-0", "FP32", [-1, -1])
    ]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("output-0", "FP32")]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config("linear")
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "backend 'kserve-a' does not implement ModelConfig" in err.value.message()
    assert "ModelMetadata describes this model" in err.value.message()


def test_model_ready(client):
    assert client.is_server_ready()
    assert client.is_model_ready("linear") and client.is_model_ready("linear", "1")
    assert not client.is_model_ready("not-ready")
    assert not client.is_model_ready("missing")  # the server's NOT_FOUND: not ready
    assert not client.is_model_ready("down")


def test_schema_check_from_metadata(stub):
    err = rpc_error(stub.ModelInfer, raw_request("linear", name="x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'linear' has no input 'x' (inputs: input-0)" in err.details()
    request = oip.ModelInferRequest(model_name="linear")
    request.inputs.add(name="input-0", datatype="INT32", shape=[2]).contents.int_contents[:] = [
        1,
        2,
    ]
    err = rpc_error(stub.ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input-0': model 'linear' expects FP32, request has INT32" in err.details()


def test_server_errors_pass_through(stub):
    # The backend's NOT_FOUND for a name the route table chose is the gateway's fault: the
    # caller gets UNAVAILABLE (so fallbacks take over) and never the backend's private name.
    err = rpc_error(stub.ModelInfer, raw_request("missing"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "route table names a model its backend does not have" in err.details()
    assert "no_such_model" not in err.details()
    assert trailer(err, "x-tensorgate-backend") == "kserve-a"
    err = rpc_error(stub.ModelInfer, raw_request("failing"))
    assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "Internal server error")
    # `failing` lists no tensors in its metadata: no schema check, the server's own refusal.
    request = oip.ModelInferRequest(model_name="failing")
    request.inputs.add(name="i", datatype="INT32", shape=[1]).contents.int_contents[:] = [1]
    err = rpc_error(stub.ModelInfer, request)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "failing refuses INT32 inputs",
    )
    err = rpc_error(stub.ModelMetadata, oip.ModelMetadataRequest(name="missing"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_backend_down_is_unavailable_naming_it(stub, client):
    err = rpc_error(stub.ModelInfer, raw_request("down"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend 'kserve-down' unavailable" in err.details()
    with pytest.raises(InferenceServerException) as meta_err:
        client.get_model_metadata("down")
    assert meta_err.value.status() == "StatusCode.UNAVAILABLE"
    assert "backend 'kserve-down' unavailable" in meta_err.value.message()


def test_server_killed_is_unavailable(stub):
    with KServeServer(grpc_port=LATE_PORT) as late:
        deadline = time.monotonic() + 15  # the gateway reconnects within its 2 s backoff
        while True:
            try:
                reply = stub.ModelInfer(raw_request("late"), timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert (
            np.frombuffer(reply.raw_output_contents[0], np.float32).tolist()
            == (2 * X + 1).ravel().tolist()
        )
        late.kill()
        err = rpc_error(stub.ModelInfer, raw_request("late"), timeout=10)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "backend 'kserve-late' unavailable" in err.details()


def test_output_names_rename_the_servers_names(client):
    result = client.infer("renamed", [linear_input("x")], outputs=[tc.InferRequestedOutput("y")])
    assert np.array_equal(result.as_numpy("y"), 2 * X + 1)
    assert result.as_numpy("output-0") is None
    meta = client.get_model_metadata("renamed")
    assert [t.name for t in meta.inputs] == ["x"] and [t.name for t in meta.outputs] == ["y"]
    with pytest.raises(InferenceServerException) as err:
        client.infer("renamed", [linear_input("x")], outputs=[tc.InferRequestedOutput("z")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model 'renamed' has no output 'z' (outputs: y)" in err.value.message()


def test_answers_carry_only_requested_outputs(client):
    a = tc.InferInput("a", [2], "FP32")
    a.set_data_from_numpy(np.array([1.0, 2.0], np.float32))
    b = tc.InferInput("b", [2], "FP32")
    b.set_data_from_numpy(np.array([10.0, 20.0], np.float32))
    both = client.infer("multi", [a, b])
    assert [o.name for o in both.get_response().outputs] == ["sum", "diff"]
    only = client.infer("multi", [a, b], outputs=[tc.InferRequestedOutput("diff")])
    assert [o.name for o in only.get_response().outputs] == ["diff"]
    assert only.as_numpy("diff").tolist() == [-9.0, -18.0]


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"parameters": {"custom": "x"}}, "request: parameter 'custom'"),
        ({"priority": 1}, "request: parameter 'priority'"),  # a Triton extension
        ({"sequence_id": 5}, "request: parameter 'sequence_"),  # sequence_id and _start
    ],
)
def test_parameters_are_refused_naming_them(client, kwargs, where):
    with pytest.raises(InferenceServerException) as err:
        client.infer("linear", [linear_input()], **kwargs)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert where in err.value.message()
    assert "(OIP server accepts here: none)" in err.value.message()


def test_input_and_output_parameters_are_refused(stub):
    request = raw_request("linear")
    request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    err = rpc_error(stub.ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input-0': parameter 'shared_memory_region' is not accepted" in err.details()
    request = raw_request("linear")
    request.outputs.add(name="output-0").parameters["classification"].int64_param = 1
    err = rpc_error(stub.ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output 'output-0': parameter 'classification' is not accepted" in err.details()


def test_stream_requests_take_the_unary_path(stub):
    """The OIP server has no Triton-shaped stream (it used to be refused: "has no streaming
    inference"): its models answer once, so the gateway runs each stream request through
    ModelInfer's path and writes the answer to the stream."""
    request = raw_request("linear")
    request.id = "s-1"
    replies = list(stub.ModelStreamInfer(iter([request]), timeout=10))
    assert len(replies) == 1 and not replies[0].error_message, replies
    unary = stub.ModelInfer(raw_request("linear"), timeout=10)
    answer = replies[0].infer_response
    assert answer.id == "s-1"
    assert answer.raw_output_contents == unary.raw_output_contents
    assert (answer.model_name, answer.model_version) == (unary.model_name, unary.model_version)


# --- config and data-plane choice (no server needed) ----------------------------------------------


def test_config_kind_and_envoy_path():
    config = from_dict(gateway_config("127.0.0.1:1"))
    assert config.backends[0].kind == 4  # BACKEND_KIND_OIP
    decisions = {d.model: d for d in decide(config)}
    assert decisions["linear"].path == "gateway"
    with pytest.raises(ConfigError) as err:
        bad = gateway_config("127.0.0.1:1")
        bad["backends"][0]["torchserve"] = {"management_address": "127.0.0.1:2"}
        from_dict(bad)
    assert "backends[0].torchserve: options for another backend kind than OIP" in str(err.value)


def test_requested_only_keeps_what_it_cannot_pair():
    request = oip.ModelInferRequest()
    request.outputs.add(name="b")
    response = oip.ModelInferResponse()
    for name in ("a", "b", "c"):
        response.outputs.add(name=name)
    response.raw_output_contents[:] = [b"A", b"B", b"C"]
    trimmed = oip.ModelInferResponse()
    trimmed.CopyFrom(response)
    requested_only(request, trimmed)
    assert [o.name for o in trimmed.outputs] == ["b"] and list(trimmed.raw_output_contents) == [
        b"B"
    ]
    request.outputs.add(name="zz")  # not in the answer: left as the server sent it
    assert requested_only(request, response) is response and len(response.outputs) == 3
