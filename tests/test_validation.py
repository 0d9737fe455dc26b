"""Request validation on its own: every OIP datatype, raw and typed contents; name bounds;
the parameter allowlists; checks against a model's description (inputs, outputs, batching)."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip

from adapters import parameters
from adapters.base import ModelSpec, TensorSpec
from adapters.parameters import check_parameters
from gateway.dataplane.layers.validation import (
    CONTENTS_FIELD,
    DATATYPES,
    ELEMENT_SIZE,
    MAX_ID_BYTES,
    MAX_NAME_BYTES,
    MAX_VERSION_BYTES,
    SpecCache,
    _public,
    check_name,
    check_schema,
    check_structure,
    schema,
)
from gateway.dataplane.pipeline import InferCall
from gateway.dataplane.target import Target
from gateway.errors import GatewayError
from tensorgate.config.v1 import config_pb2

NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BF16": np.uint16,
}  # fmt: skip


def check(request: oip.ModelInferRequest) -> None:
    check_structure(request, max_request_bytes=1 << 20, max_inputs=8)


def raw_request(datatype: str, shape: list[int]) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    count = int(np.prod(shape))
    if datatype == "BYTES":
        data = b"".join(len(v).to_bytes(4, "little") + v for v in [b"ab"] * count)
    else:
        data = np.zeros(count, dtype=NUMPY[datatype]).tobytes()
    request.raw_input_contents.append(data)
    return request


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4)


@given(datatype=st.sampled_from(DATATYPES), shape=shapes)
def test_well_formed_raw_requests_pass(datatype, shape):
    check(raw_request(datatype, shape))


@given(datatype=st.sampled_from(sorted(CONTENTS_FIELD)), shape=shapes)
def test_well_formed_typed_requests_pass(datatype, shape):
    request = oip.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    values = [b"v"] if datatype == "BYTES" else [True] if datatype == "BOOL" else [1]
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values * int(np.prod(shape)))
    if int(np.prod(shape)) == 0:
        tensor.ClearField("contents")
    check(request)


@given(
    datatype=st.sampled_from(sorted(ELEMENT_SIZE)),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    delta=st.sampled_from([-1, 1]),
)
def test_raw_byte_count_mismatch_names_input_and_sizes(datatype, shape, delta):
    request = raw_request(datatype, shape)
    data = request.raw_input_contents[0]
    request.raw_input_contents[0] = data[:-1] if delta < 0 else data + b"\0"
    with pytest.raises(GatewayError) as err:
        check(request)
    expected = int(np.prod(shape)) * ELEMENT_SIZE[datatype]
    dims = ",".join(map(str, shape))
    assert f"input 'x': shape [{dims}] of {datatype}" in err.value.message
    assert f"needs {expected} bytes" in err.value.message


def test_bytes_element_count_mismatch():
    request = raw_request("BYTES", [3])
    request.inputs[0].shape[:] = [4]
    with pytest.raises(
        GatewayError, match="needs 4 BYTES elements, raw_input_contents\\[0\\] has 3"
    ):
        check(request)
    request.raw_input_contents[0] = b"\x05\0\0\0ab"
    with pytest.raises(GatewayError, match="not a sequence of 4-byte"):
        check(request)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_needs_raw(datatype):
    request = oip.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype=datatype, shape=[1], contents={"fp32_contents": [1.0]})
    with pytest.raises(
        GatewayError, match=f"input 'h': {datatype} data must be sent in raw_input_contents"
    ):
        check(request)


def test_limits():
    request = raw_request("FP32", [300000])  # 1.2 MB > 1 MiB
    with pytest.raises(GatewayError, match="over the gateway's limit of 1048576 bytes"):
        check(request)
    request = oip.ModelInferRequest(model_name="m")
    for i in range(9):
        request.inputs.add(name=f"x{i}", datatype="FP32", shape=[0])
    with pytest.raises(GatewayError, match="9 inputs, over the limit of 8"):
        check(request)
    request = raw_request("FP32", [1])
    request.outputs.add(name="y")
    request.outputs.add(name="y")
    with pytest.raises(GatewayError, match="output 'y' is requested more than once"):
        check(request)
    with pytest.raises(GatewayError, match="model_name is required"):
        check(oip.ModelInferRequest())


# --- name bounds: caller strings never grow a status message -------------------------------


def test_name_bounds_are_enforced_in_bytes():
    assert (MAX_NAME_BYTES, MAX_VERSION_BYTES, MAX_ID_BYTES) == (256, 64, 256)
    check_name("model_name", "m" * 256)
    check_name("model_name", "é" * 128)  # 256 bytes
    with pytest.raises(GatewayError, match="model_name is 258 bytes, over the limit of 256 bytes"):
        check_name("model_name", "é" * 129)
    with pytest.raises(GatewayError, match="version is 65 bytes, over the limit of 64 bytes"):
        check_name("version", "1" * 65, MAX_VERSION_BYTES)


@given(st.text(min_size=0, max_size=400), st.integers(1, 300))
def test_check_name_accepts_exactly_what_fits_and_stays_short(value, limit):
    size = len(value.encode("utf-8", "surrogatepass"))
    if size <= limit:
        check_name("f", value, limit)
        return
    with pytest.raises(GatewayError) as err:
        check_name("f", value, limit)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.message) < 500


def test_huge_model_name_is_invalid_argument_with_a_short_message():
    request = raw_request("FP32", [1])
    request.model_name = "m" * 100_000
    with pytest.raises(GatewayError) as err:
        check(request)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("model_name is 100000 bytes, over the limit of 256 bytes")
    assert len(err.value.message) < 250


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda r: setattr(r, "model_version", "9" * 65), "model_version is 65 bytes"),
        (lambda r: setattr(r, "id", "i" * 257), "id is 257 bytes, over the limit of 256"),
        (lambda r: setattr(r.inputs[0], "name", "x" * 257), "inputs[0].name is 257 bytes"),
        (lambda r: r.outputs.add(name="y" * 300), "outputs[0].name is 300 bytes"),
        (
            lambda r: r.parameters["p" * 257].CopyFrom(oip.InferParameter(bool_param=True)),
            "request parameter name is 257 bytes",
        ),
        (
            lambda r: r.inputs[0].parameters["p" * 257].CopyFrom(oip.InferParameter()),
            "input 'x' parameter name is 257 bytes",
        ),
        (
            lambda r: r.outputs.add(name="y").parameters["p" * 999].CopyFrom(oip.InferParameter()),
            "output 'y' parameter name is 999 bytes",
        ),
    ],
)
def test_every_caller_name_is_bounded(edit, expect):
    request = raw_request("FP32", [1])
    edit(request)
    with pytest.raises(GatewayError, match=re.escape(expect)) as err:
        check(request)
    assert len(err.value.message) < 250


def test_long_strings_are_quoted_cut_short():
    request = raw_request("FP32", [1])
    request.inputs[0].datatype = "F" * 250  # not a name: bounded by the request size only
    with pytest.raises(GatewayError, match=r"\.\.\.\(\+170 more\) is not an Open Inference"):
        check(request)


# --- parameters: an allowlist per backend kind ---------------------------------------------


def with_params(where: str, name: str, **value) -> oip.ModelInferRequest:
    request = raw_request("FP32", [1])
    if where == "request":
        params = request.parameters
    elif where == "input":
        params = request.inputs[0].parameters
    else:
        params = request.outputs.add(name="y").parameters
    params[name].CopyFrom(oip.InferParameter(**value))
    return request


@pytest.mark.parametrize("where", ["request", "input", "output"])
@pytest.mark.parametrize(
    "name", ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"]
)
def test_shared_memory_is_refused_everywhere(where, name):
    request = with_params(where, name, string_param="someone-elses-region")
    label = {"request": "request", "input": "input 'x'", "output": "output 'y'"}[where]
    for rules in (parameters.TRITON, parameters.TFSERVING, parameters.TORCHSERVE):
        with pytest.raises(GatewayError) as err:
            check_parameters(request, rules)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message.startswith(f"{label}: parameter {name!r} is not accepted: ")
        assert "shared-memory regions" in err.value.message


@pytest.mark.parametrize("name", ["binary_data", "binary_data_size", "binary_data_output"])
def test_http_only_binary_data_is_refused(name):
    with pytest.raises(GatewayError, match="belong to the HTTP protocol"):
        check_parameters(with_params("output", name, bool_param=True), parameters.TRITON)


def test_wrong_value_types_and_ranges_are_named():
    cases = [
        (("request", "priority"), {"string_param": "high"},
         "request: parameter 'priority' must be int64_param or uint64_param, got string_param"),
        (("request", "priority"), {"int64_param": -1},
         "request: parameter 'priority' must be >= 0, got -1"),
        (("request", "sequence_id"), {"uint64_param": 5},
         "parameter 'sequence_id' must be int64_param or string_param, got uint64_param"),
        (("request", "sequence_start"), {"int64_param": 1},
         "parameter 'sequence_start' must be bool_param, got int64_param"),
        (("request", "timeout"), {"double_param": 1.5},
         "parameter 'timeout' must be int64_param, got double_param"),
        (("request", "timeout"), {},
         "parameter 'timeout' must be int64_param, got no value"),
        (("output", "classification"), {"int64_param": 0},
         "output 'y': parameter 'classification' must be >= 1, got 0"),
        (("request", "my_custom"), {"int64_param": 1},
         "request: parameter 'my_custom' is not accepted: not on the gateway's allowlist "
         "(Triton accepts here: priority, sequence_end, sequence_id, sequence_start, timeout)"),
        (("input", "classification"), {"int64_param": 2},
         "input 'x': parameter 'classification' is not accepted: not on the gateway's allowlist "
         "(Triton accepts here: none)"),
    ]  # fmt: skip
    for (where, name), value, expect in cases:
        with pytest.raises(GatewayError) as err:
            check_parameters(with_params(where, name, **value), parameters.TRITON)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert expect in err.value.message, (name, err.value.message)


def test_triton_allowlist_passes_what_triton_honours_over_grpc():
    request = raw_request("FP32", [1])
    for name, value in {
        "sequence_id": {"string_param": "session-7"},
        "sequence_start": {"bool_param": True},
        "sequence_end": {"bool_param": False},
        "priority": {"uint64_param": 3},
        "timeout": {"int64_param": 250_000},
    }.items():
        request.parameters[name].CopyFrom(oip.InferParameter(**value))
    request.outputs.add(name="y").parameters["classification"].int64_param = 3
    check_parameters(request, parameters.TRITON)
    request.parameters["sequence_id"].int64_param = 42
    request.parameters["priority"].int64_param = 0
    check_parameters(request, parameters.TRITON)
    for rules in (parameters.TFSERVING, parameters.TORCHSERVE):  # they forward none
        with pytest.raises(GatewayError, match=f"{rules.backend} accepts here: none"):
            check_parameters(request, rules)


KIND_VALUES = {
    "bool_param": st.booleans(),
    "int64_param": st.integers(-(2**63), 2**63 - 1),
    "string_param": st.text(max_size=8),
    "double_param": st.floats(allow_nan=False),
    "uint64_param": st.integers(0, 2**64 - 1),
}


@given(
    where=st.sampled_from(["request", "input", "output"]),
    name=st.sampled_from(
        ["sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "classification",
         "shared_memory_region", "binary_data_output", "triton_x", "custom"]
    ),
    kind_value=st.sampled_from(sorted(KIND_VALUES)).flatmap(
        lambda kind: KIND_VALUES[kind].map(lambda v: (kind, v))
    ),
)  # fmt: skip
def test_a_parameter_passes_only_when_its_place_name_kind_and_value_are_allowed(
    where, name, kind_value
):
    kind, value = kind_value
    request = with_params(where, name, **{kind: value})
    table = {"request": parameters.TRITON.request, "input": parameters.TRITON.inputs,
             "output": parameters.TRITON.outputs}[where]  # fmt: skip
    rule = table.get(name)
    allowed = (
        rule is not None and kind in rule.kinds and (rule.minimum is None or value >= rule.minimum)
    )
    if allowed:
        check_parameters(request, parameters.TRITON)
    else:
        with pytest.raises(GatewayError) as err:
            check_parameters(request, parameters.TRITON)
        assert f"parameter {name!r}" in err.value.message


# --- the model's description: inputs, outputs, batching --------------------------------------

BATCHING = ModelSpec(
    inputs=(
        TensorSpec("INPUT0", "INT32", (-1, -1)),
        TensorSpec("INPUT1", "BYTES", (-1, -1), optional=True),
    ),
    outputs=(TensorSpec("OUTPUT0", "INT32", (-1, -1)), TensorSpec("OUTPUT1", "BYTES", (-1, -1))),
    max_batch_size=8,
)


def int_request(*shapes: list[int], names=("INPUT0",)) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    for name, shape in zip(names, shapes, strict=True):
        request.inputs.add(name=name, datatype="INT32", shape=shape)
        request.raw_input_contents.append(np.zeros(int(np.prod(shape)), np.int32).tobytes())
    return request


@given(batch=st.integers(0, 12), width=st.integers(0, 5))
def test_batch_size_is_between_1_and_max_batch_size(batch, width):
    request = int_request([batch, width])
    if 1 <= batch <= 8:
        check_schema(request, "m", BATCHING)  # a 0 in the other -1 dimension is fine (Triton)
    else:
        with pytest.raises(GatewayError) as err:
            check_schema(request, "m", BATCHING)
        assert err.value.message == (
            f"input 'INPUT0': batch size {batch} (first dimension of [{batch},{width}]) is "
            "outside 1..8, model 'm''s max_batch_size"
        )


def test_inputs_of_a_batching_model_share_the_batch_size():
    request = int_request([2, 1], [3, 1], names=("INPUT0", "INPUT1"))
    request.inputs[1].datatype = "BYTES"
    with pytest.raises(GatewayError, match="input 'INPUT1': batch size 3 differs from input "):
        check_schema(request, "m", BATCHING)


def test_zero_elements_pass_where_the_model_takes_them():
    no_batch = ModelSpec((TensorSpec("INPUT0", "INT32", (-1,)),), None, 0)
    check_schema(int_request([0]), "m", no_batch)  # Triton answers an empty tensor
    with pytest.raises(GatewayError, match="does not match model 'm' input shape"):
        check_schema(int_request([1, 0]), "m", ModelSpec((TensorSpec("INPUT0", "INT32", (-1, 4)),)))


def test_unknown_requested_output():
    request = int_request([1, 1])
    request.outputs.add(name="OUTPUT1")
    check_schema(request, "m", BATCHING)
    request.outputs.add(name="NOPE")
    with pytest.raises(
        GatewayError, match=re.escape("model 'm' has no output 'NOPE' (outputs: OUTPUT0, OUTPUT1)")
    ):
        check_schema(request, "m", BATCHING)
    unknown_outputs = ModelSpec(BATCHING.inputs, None, 8)  # the backend lists none: not checked
    check_schema(request, "m", unknown_outputs)


def test_public_names_map_inputs_and_outputs():
    spec = _public(BATCHING, (("ids", "INPUT0"),), (("out", "OUTPUT0"),))
    assert [t.name for t in spec.inputs] == ["ids", "INPUT1"]
    assert [t.name for t in spec.outputs] == ["out", "OUTPUT1"]
    assert _public(BATCHING, (("ids", "INPUT0"),), (("out", "OUTPUT0"),)) is spec  # cached
    request = int_request([1, 1], names=("ids",))
    request.outputs.add(name="out")
    check_schema(request, "m", spec)
    request.outputs[0].name = "OUTPUT0"  # the backend's name is not the public one
    with pytest.raises(GatewayError, match="has no output 'OUTPUT0' \\(outputs: OUTPUT1, out\\)"):
        check_schema(request, "m", spec)


# --- the schema layer: parameters first, whatever the backend can describe ------------------


class FakeAdapter:
    name = "fake"
    parameters = parameters.TRITON

    def __init__(self, spec: ModelSpec | None) -> None:
        self.spec = spec
        self.described = 0

    async def model_spec(self, model, version, target=None):
        self.described += 1
        return self.spec


async def run_schema_layer(adapter, request, target) -> list:
    sent = []

    async def inner(call):
        sent.append(call.request)
        return oip.ModelInferResponse()

    service = schema(lambda: {"fake": adapter}, SpecCache())(inner)
    await service(InferCall(request=request, model="m", version="", target=target))
    return sent


async def test_schema_layer_checks_parameters_even_when_the_model_is_not_described():
    target = Target("m", "v", "fake", "m_backend", "", "", 1)
    request = int_request([1, 1])
    request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(GatewayError, match="input 'INPUT0': parameter 'shared_memory_region'"):
        await run_schema_layer(FakeAdapter(None), request, target)
    del request.inputs[0].parameters["shared_memory_region"]
    assert len(await run_schema_layer(FakeAdapter(None), request, target)) == 1


async def test_schema_layer_maps_backend_names_and_checks_batches():
    target = Target(
        "m", "v", "fake", "m_backend", "", "", 1,
        input_names=(("ids", "INPUT0"),), output_names=(("out", "OUTPUT0"),),
    )  # fmt: skip
    adapter = FakeAdapter(BATCHING)
    request = int_request([9, 1], names=("ids",))
    with pytest.raises(GatewayError, match="input 'ids': batch size 9"):
        await run_schema_layer(adapter, request, target)
    request = int_request([8, 1], names=("ids",))
    request.outputs.add(name="out")
    assert len(await run_schema_layer(adapter, request, target)) == 1


def test_declared_schema_spec_is_built_once_per_schema():
    schema_msg = config_pb2.ModelSchema()
    schema_msg.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    schema_msg.outputs.add(name="y", datatype="FP32", shape=[-1, 3])
    cache = SpecCache()
    spec = cache.declared(schema_msg)
    assert spec == ModelSpec(
        (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),), 0
    )
    assert cache.declared(schema_msg) is spec


UNKNOWN_FIELD = b"\xb8\x3e\x01"  # field 999, varint 1: not in any OIP message


def _with_unknown(place: str) -> oip.ModelInferRequest:
    request = raw_request("FP32", [1])
    junk = oip.InferParameter.FromString(UNKNOWN_FIELD)
    if place == "the request":
        request.MergeFromString(UNKNOWN_FIELD)
    elif place == "request parameter 'k'":
        request.parameters["k"].CopyFrom(junk)
    elif place == "input 'x'":
        request.inputs[0].MergeFromString(UNKNOWN_FIELD)
    elif place == "input 'x' parameter 'k'":
        request.inputs[0].parameters["k"].CopyFrom(junk)
    elif place == "output 'y'":
        request.outputs.add(name="y").MergeFromString(UNKNOWN_FIELD)
    elif place == "output 'y' parameter 'k'":
        request.outputs.add(name="y").parameters["k"].CopyFrom(junk)
    return request


@pytest.mark.parametrize(
    "place",
    ["the request", "request parameter 'k'", "input 'x'", "input 'x' parameter 'k'",
     "output 'y'", "output 'y' parameter 'k'"],
)  # fmt: skip
def test_an_unknown_field_is_refused_naming_where_it_is(place):
    check(raw_request("FP32", [1]))  # the same request without it passes
    with pytest.raises(GatewayError) as refused:
        check(_with_unknown(place))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.message.startswith(
        f"{place} has fields the Open Inference Protocol does not define (field number(s) 999"
    ), refused.value.message
