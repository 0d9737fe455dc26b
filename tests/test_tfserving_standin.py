"""The TF Serving stand-in (tests/backends/tfserving*.py) answers like TF Serving.

Requests are made with the OFFICIAL tensorflow-serving-api stubs, inside the stand-in's venv
(TFServingStandIn.run_check): the gateway venv has neither TensorFlow nor those stubs. The first
run builds that venv (~90 s) and the models (~10 s); later runs reuse both.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.backends.tfserving import (
    TFServingStandIn,
    _get_model_status_request,
    available_versions,
)

X = [[1.0, 2.0, 3.0, 4.0]]
# Must match tests/backends/make_tf_models.py (and deploy/demo/models/demo_linear).
LINEAR_Y = {1: [4.0, 8.0, 12.0], 2: [17.0, 22.0, 39.0]}

# Check code shared by several tests; runs after CHECK_PRELUDE in the stand-in venv.
PREDICT_HELPERS = """
def predict_request(model="linear", version=None, label=None, signature=None, inputs=None,
                    output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if signature is not None:
        request.model_spec.signature_name = signature
    if inputs is None:
        inputs = {"x": tensor(np.array(X_DEFAULT, np.float32), types_pb2.DT_FLOAT)}
    for alias, proto in inputs.items():
        request.inputs[alias].CopyFrom(proto)
    request.output_filter.extend(output_filter)
    return request

def describe(response):
    return {
        "model_spec": {
            "name": response.model_spec.name,
            "version": response.model_spec.version.value
            if response.model_spec.HasField("version") else None,
            "signature_name": response.model_spec.signature_name,
        },
        "outputs": {
            alias: {
                "dtype": types_pb2.DataType.Name(t.dtype),
                "shape": [d.size for d in t.tensor_shape.dim],
                "float_val": list(t.float_val),
                "tensor_content": len(t.tensor_content),
            }
            for alias, t in response.outputs.items()
        },
    }

def predict_error(**kwargs):
    return rpc_error(lambda: prediction.Predict(predict_request(**kwargs), timeout=10))
""".replace("X_DEFAULT", repr(X))


@pytest.fixture(scope="module")
def standin(tfserving) -> Iterator[TFServingStandIn]:
    yield tfserving  # the session's stand-in (tests/conftest.py)


def check(server: TFServingStandIn, code: str) -> Any:
    """Runs ``code`` in the stand-in venv (official stubs); returns the JSON it emit()s last."""
    out = server.run_check(PREDICT_HELPERS + textwrap.dedent(code))
    return json.loads(out.strip().splitlines()[-1])


def test_harness_properties_and_raw_readiness_probe(standin: TFServingStandIn) -> None:
    assert standin.address == f"127.0.0.1:{standin.grpc_port}"
    assert standin.running and standin.pid
    assert standin.log_path.is_file()
    assert (standin.model_base / "linear" / "2" / "saved_model.pb").is_file()
    assert standin.startup_seconds is not None and standin.startup_seconds < 120
    # The harness's hand-built request is byte-identical to the official message...
    official = check(
        standin,
        """
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "linear"
        emit(request.SerializeToString().hex())
        """,
    )
    assert _get_model_status_request("linear").hex() == official
    # ...and the raw call works from the gateway venv, which has no TF Serving protos.
    with grpc.insecure_channel(standin.address) as channel:
        call = channel.unary_unary("/tensorflow.serving.ModelService/GetModelStatus")
        assert available_versions(call(_get_model_status_request("linear"), timeout=5)) == [2, 1]
        with pytest.raises(grpc.RpcError) as err:
            call(_get_model_status_request("nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_predict_linear_versions_and_default(standin: TFServingStandIn) -> None:
    result = check(
        standin,
        """
        emit({str(v): describe(prediction.Predict(predict_request(version=v), timeout=10))
              for v in (1, 2, None)})
        """,
    )
    for key, version in (("1", 1), ("2", 2), ("None", 2)):  # no version: the latest
        response = result[key]
        assert response["model_spec"] == {
            "name": "linear",
            "version": version,
            "signature_name": "serving_default",  # filled in although the request left it empty
        }
        y = response["outputs"]["y"]
        assert y["dtype"] == "DT_FLOAT"
        assert y["shape"] == [1, 3]
        assert y["float_val"] == LINEAR_Y[version]
        assert y["tensor_content"] == 0  # TF Serving's default encoding: typed *_val fields


def test_version_labels(standin: TFServingStandIn) -> None:
    result = check(
        standin,
        """
        emit({
            "stable": describe(prediction.Predict(predict_request(label="stable"), timeout=10)),
            "canary": describe(prediction.Predict(predict_request(label="canary"), timeout=10)),
            "unknown": predict_error(label="nope"),
            "other_model": predict_error(model="echo", label="stable"),
        })
        """,
    )
    assert result["stable"]["model_spec"]["version"] == 1
    assert result["stable"]["outputs"]["y"]["float_val"] == LINEAR_Y[1]
    assert result["canary"]["model_spec"]["version"] == 2
    assert result["canary"]["outputs"]["y"]["float_val"] == LINEAR_Y[2]
    assert result["unknown"] == ["INVALID_ARGUMENT", "Unrecognized servable version label: nope"]
    assert result["other_model"] == [
        "INVALID_ARGUMENT",
        "Unrecognized servable version label: stable",
    ]


def test_servable_not_found(standin: TFServingStandIn) -> None:
    result = check(
        standin,
        """
        emit({
            "model": predict_error(model="nope"),
            "model_version": predict_error(model="nope", version=1),
            "version": predict_error(version=3),
            "no_name": predict_error(model=""),
        })
        """,
    )
    assert result == {
        "model": ["NOT_FOUND", "Servable not found for request: Latest(nope)"],
        "model_version": ["NOT_FOUND", "Servable not found for request: Specific(nope, 1)"],
        "version": ["NOT_FOUND", "Servable not found for request: Specific(linear, 3)"],
        "no_name": ["INVALID_ARGUMENT", "ModelSpec has no name specified."],
    }


def test_unknown_signature(standin: TFServingStandIn) -> None:
    result = check(standin, 'emit(predict_error(signature="nope"))')
    assert result == ["FAILED_PRECONDITION", 'Serving signature key "nope" not found.']


def test_input_and_output_errors(standin: TFServingStandIn) -> None:
    result = check(
        standin,
        """
        x = tensor(np.array([[1, 2, 3, 4]], np.float32), types_pb2.DT_FLOAT)
        bad = tensor_pb2.TensorProto()
        bad.CopyFrom(x)
        bad.tensor_content = b"abc"  # 3 bytes for 4 floats
        emit({
            "missing": predict_error(inputs={}),
            "extra": predict_error(inputs={"x": x, "z": x}),
            "renamed": predict_error(inputs={"z": x}),
            "dtype": predict_error(
                inputs={"x": tensor(np.array([[1, 2, 3, 4]], np.int32), types_pb2.DT_INT32)}),
            "double": predict_error(
                inputs={"x": tensor(np.array([[1, 2, 3, 4]], np.float64), types_pb2.DT_DOUBLE)}),
            "shape": predict_error(
                inputs={"x": tensor(np.array([[1, 2, 3]], np.float32), types_pb2.DT_FLOAT)}),
            "parse": predict_error(inputs={"x": bad}),
            "filter_unknown": predict_error(output_filter=["q"]),
            "filter_duplicate": predict_error(output_filter=["y", "y"]),
            "filter_ok": describe(
                prediction.Predict(predict_request(output_filter=["y"]), timeout=10)),
        })
        """,
    )
    assert result["missing"] == [
        "INVALID_ARGUMENT",
        "input size does not match signature: 0!=1 len({}) != len({x}). Sent extra: {}. Missing but required: {x}.",
    ]
    assert result["extra"] == [
        "INVALID_ARGUMENT",
        "input size does not match signature: 2!=1 len({x,z}) != len({x}). Sent extra: {z}. Missing but required: {}.",
    ]
    assert result["renamed"] == [
        "INVALID_ARGUMENT",
        "input tensor alias not found in signature: z. Inputs expected to be in the set {x}.",
    ]
    assert result["dtype"] == [
        "INVALID_ARGUMENT",
        "Expects arg[0] to be float but int32 is provided",
    ]
    assert result["double"] == [
        "INVALID_ARGUMENT",
        "Expects arg[0] to be float but double is provided",
    ]
    assert result["shape"][0] == "INVALID_ARGUMENT"
    assert "[1,3]" in result["shape"][1] and "[-1,4]" in result["shape"][1]
    assert result["parse"] == ["INVALID_ARGUMENT", "tensor parsing error: x"]
    assert result["filter_unknown"] == [
        "INVALID_ARGUMENT",
        "output tensor alias not found in signature: q Outputs expected to be in the set {y}.",
    ]
    assert result["filter_duplicate"] == ["INVALID_ARGUMENT", "duplicate output tensor alias: y"]
    assert result["filter_ok"]["outputs"]["y"]["float_val"] == LINEAR_Y[2]


def test_get_model_metadata(standin: TFServingStandIn) -> None:
    result = check(
        standin,
        """
        def metadata(**spec):
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"])
            response = prediction.GetModelMetadata(request, timeout=10)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            assert response.metadata["signature_def"].Unpack(signatures)
            return {
                "type_url": response.metadata["signature_def"].type_url,
                "model_spec": [response.model_spec.name, response.model_spec.version.value,
                               response.model_spec.signature_name],
                "signatures": {
                    name: {
                        "method_name": sig.method_name,
                        "inputs": {k: [types_pb2.DataType.Name(t.dtype),
                                       None if t.tensor_shape.unknown_rank
                                       else [d.size for d in t.tensor_shape.dim]]
                                   for k, t in sig.inputs.items()},
                        "outputs": {k: [types_pb2.DataType.Name(t.dtype),
                                        None if t.tensor_shape.unknown_rank
                                        else [d.size for d in t.tensor_shape.dim]]
                                    for k, t in sig.outputs.items()},
                    }
                    for name, sig in signatures.signature_def.items()
                },
            }

        def metadata_error(request):
            return rpc_error(lambda: prediction.GetModelMetadata(request, timeout=10))

        spec = {"name": "linear"}
        emit({
            "linear": metadata(name="linear"),
            "linear_v1": metadata(name="linear", version={"value": 1}),
            "echo": metadata(name="echo"),
            "no_field": metadata_error(get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec)),
            "bad_field": metadata_error(get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def", "foo"])),
            "no_spec": metadata_error(get_model_metadata_pb2.GetModelMetadataRequest(
                metadata_field=["signature_def"])),
            "unknown": metadata_error(get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec={"name": "nope"}, metadata_field=["signature_def"])),
        })
        """,
    )
    linear = result["linear"]
    assert linear["type_url"] == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    assert linear["model_spec"] == ["linear", 2, ""]  # name + version, no signature_name
    assert result["linear_v1"]["model_spec"] == ["linear", 1, ""]
    assert linear["signatures"]["serving_default"] == {
        "method_name": "tensorflow/serving/predict",
        "inputs": {"x": ["DT_FLOAT", [-1, 4]]},
        "outputs": {"y": ["DT_FLOAT", [-1, 3]]},
    }
    # TF Serving lists every SignatureDef of the MetaGraphDef, the TF2 init op included.
    assert set(linear["signatures"]) == {"serving_default", "__saved_model_init_op"}
    echo = result["echo"]["signatures"]
    assert echo["echo_bfloat16"]["inputs"] == {"x": ["DT_BFLOAT16", None]}  # unknown rank
    assert echo["echo_string"]["outputs"] == {"y": ["DT_STRING", None]}
    assert len(echo) == 15  # 14 dtypes + __saved_model_init_op
    assert result["no_field"] == [
        "INVALID_ARGUMENT",
        "GetModelMetadataRequest must specify at least one metadata_field",
    ]
    assert result["bad_field"] == ["INVALID_ARGUMENT", "Metadata field foo is not supported"]
    assert result["no_spec"] == ["INVALID_ARGUMENT", "Missing ModelSpec"]
    assert result["unknown"] == ["NOT_FOUND", "Servable not found for request: Latest(nope)"]


def test_get_model_status(standin: TFServingStandIn) -> None:
    result = check(
        standin,
        """
        def status(**spec):
            request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
            response = model_service.GetModelStatus(request, timeout=10)
            return [[s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                     s.HasField("status"), s.status.error_code, s.status.error_message]
                    for s in response.model_version_status]

        def status_error(**spec):
            request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
            return rpc_error(lambda: model_service.GetModelStatus(request, timeout=10))

        emit({
            "linear": status(name="linear"),
            "linear_v1": status(name="linear", version={"value": 1}),
            "echo": status(name="echo"),
            "unknown": status_error(name="nope"),
            "unknown_version": status_error(name="linear", version={"value": 7}),
        })
        """,
    )
    assert result["linear"] == [[2, "AVAILABLE", True, 0, ""], [1, "AVAILABLE", True, 0, ""]]
    assert result["linear_v1"] == [[1, "AVAILABLE", True, 0, ""]]
    assert result["echo"] == [[1, "AVAILABLE", True, 0, ""]]
    assert result["unknown"] == ["NOT_FOUND", "Could not find any versions of model nope"]
    assert result["unknown_version"] == ["NOT_FOUND", "Could not find version 7 of model linear"]


def test_echo_round_trips_every_dtype(standin: TFServingStandIn) -> None:
    """Inputs sent as tensor_content come back, bit for bit, in TF Serving's typed fields."""
    result = check(
        standin,
        """
        import ml_dtypes
        T = types_pb2
        cases = {
            "bool": (T.DT_BOOL, "bool_val", np.array([[True, False], [False, True]])),
            "uint8": (T.DT_UINT8, "int_val", np.array([0, 7, 255], np.uint8)),
            "uint16": (T.DT_UINT16, "int_val", np.array([0, 65535], np.uint16)),
            "uint32": (T.DT_UINT32, "uint32_val", np.array([0, 2**32 - 1], np.uint32)),
            "uint64": (T.DT_UINT64, "uint64_val", np.array([0, 2**64 - 1], np.uint64)),
            "int8": (T.DT_INT8, "int_val", np.array([-128, 127], np.int8)),
            "int16": (T.DT_INT16, "int_val", np.array([-32768, 32767], np.int16)),
            "int32": (T.DT_INT32, "int_val", np.array([[-2**31], [2**31 - 1]], np.int32)),
            "int64": (T.DT_INT64, "int64_val", np.array([-2**63, 2**63 - 1], np.int64)),
            "half": (T.DT_HALF, "half_val", np.array([1.5, -65504, 2**-24], np.float16)),
            "bfloat16": (T.DT_BFLOAT16, "half_val",
                         np.array([1.5, -3.0, 2.0**100], ml_dtypes.bfloat16)),
            "float": (T.DT_FLOAT, "float_val", np.array([1.5, -1e30, 1e-40], np.float32)),
            "double": (T.DT_DOUBLE, "double_val", np.array([1e300, -2.5], np.float64)),
            "string": (T.DT_STRING, "string_val",
                       np.array([b"", b"abc", b"\\xff\\x00"], dtype=object)),
        }
        out = {}
        for name, (dtype, field, array) in cases.items():
            request = predict_request(model="echo", signature=f"echo_{name}",
                                      inputs={"x": tensor(array, dtype)})
            y = prediction.Predict(request, timeout=10).outputs["y"]
            values = list(getattr(y, field))
            if field == "half_val":
                got = np.array(values, np.uint16).view(array.dtype)
            elif dtype == T.DT_STRING:
                got = np.array(values, dtype=object)
            else:
                got = np.array(values, dtype=array.dtype)
            out[name] = {
                "dtype": y.dtype == dtype,
                "shape": [d.size for d in y.tensor_shape.dim] == list(array.shape),
                "equal": got.tobytes() == array.reshape(-1).tobytes() if dtype != T.DT_STRING
                         else got.tolist() == array.reshape(-1).tolist(),
                "typed_field_only": not y.tensor_content,
            }
        scalar = predict_request(model="echo", signature="echo_int32",
                                 inputs={"x": tensor(np.array(5, np.int32), T.DT_INT32)})
        y = prediction.Predict(scalar, timeout=10).outputs["y"]
        out["scalar"] = [len(y.tensor_shape.dim), list(y.int_val)]
        emit(out)
        """,
    )
    assert result.pop("scalar") == [0, [5]]
    ok = {"dtype": True, "shape": True, "equal": True, "typed_field_only": True}
    assert result == {name: ok for name in result}
    assert len(result) == 14


def test_restart_keeps_port(standin: TFServingStandIn) -> None:
    port = standin.grpc_port
    old_pid = standin.pid
    started = time.monotonic()
    standin.restart()
    assert time.monotonic() - started < 120
    assert standin.grpc_port == port and standin.pid != old_pid
    result = check(standin, "emit(describe(prediction.Predict(predict_request(), timeout=10)))")
    assert result["outputs"]["y"]["float_val"] == LINEAR_Y[2]
