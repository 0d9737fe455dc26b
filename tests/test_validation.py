"""Structural request validation on its own: every OIP datatype, raw and typed contents."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip

from gateway.errors import GatewayError
from gateway.layers.validation import CONTENTS_FIELD, DATATYPES, ELEMENT_SIZE, check_structure

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
