"""Merging OIP requests on the batch dimension and splitting the answer (adapters/codecs/batch.py).

The central property: for every OIP datatype, raw and typed contents, any batch sizes and any
non-batch shape (zero-size dims included), splitting a model's answer to the merged request gives,
byte for byte, the answer that model gives each request alone. The "model" here is elementwise
(each output row depends only on the same input row), which is what a batching model promises.
"""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from adapters.codecs.batch import batch_key, batch_size, merge, split
from gateway.errors import GatewayError

DATATYPES = list(oip_codec.NUMPY_DTYPE)
TYPED = list(oip_codec.CONTENTS_FIELD)  # FP16 / BF16 travel raw only
CASES = [(d, True) for d in DATATYPES] + [(d, False) for d in TYPED]
CASE_IDS = [f"{d}-{'raw' if r else 'typed'}" for d, r in CASES]


# --- building requests -------------------------------------------------------------------------


def _objects(items, shape):
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def array_of(datatype: str, shape: tuple[int, ...]):
    """Any value of `datatype` and `shape`, NaN payloads, infinities and -0.0 included."""
    if datatype == "BYTES":
        n = int(np.prod(shape))
        return st.lists(st.binary(max_size=6), min_size=n, max_size=n).map(
            lambda items: _objects(items, shape)
        )
    dtype = oip_codec.NUMPY_DTYPE[datatype]
    if dtype.kind == "f" or datatype == "BF16":  # every bit pattern
        bits = np.dtype(f"<u{dtype.itemsize}")
        return hnp.arrays(bits, shape).map(lambda a: a.view(dtype))
    return hnp.arrays(dtype, shape)


def add_tensor(request, name: str, datatype: str, array: np.ndarray, raw: bool) -> None:
    if raw:
        oip_codec.add_input(request, name, array, datatype)
        return
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    values = getattr(tensor.contents, oip_codec.CONTENTS_FIELD[datatype])
    values.extend(list(array.reshape(-1)) if datatype == "BYTES" else array.reshape(-1).tolist())


# --- the model ---------------------------------------------------------------------------------


def elementwise(datatype: str, array: np.ndarray) -> np.ndarray:
    """An affine / bitwise map applied per element, in the tensor's own datatype."""
    if datatype == "BYTES":
        return _objects([bytes(v)[::-1] + b"!" for v in array.reshape(-1)], array.shape)
    if datatype == "BOOL":
        return np.logical_not(array)
    dtype = array.dtype
    if dtype.kind == "f" or dtype == ml_dtypes.bfloat16:  # flip bits: exact, NaNs included
        bits = array.view(f"<u{dtype.itemsize}")
        return (bits ^ np.array(0x5A5A5A5A5A5A5A5A, dtype="<u8").astype(bits.dtype)).view(dtype)
    with np.errstate(over="ignore"):
        return (array * dtype.type(3) + dtype.type(1)).astype(dtype)  # wraps around


def run_model(request: oip.ModelInferRequest) -> oip.ModelInferResponse:
    """What a batching backend answers: one output per input ("OUT_" + name), elementwise, in the
    request's content kind, only the requested outputs when some are requested, echoing the id."""
    response = oip.ModelInferResponse(model_name="m", model_version="3", id=request.id)
    response.parameters["triton_final_response"].bool_param = True
    wanted = {o.name for o in request.outputs}
    raw = bool(request.raw_input_contents)
    for index, tensor in enumerate(request.inputs):
        name = "OUT_" + tensor.name
        if wanted and name not in wanted:
            continue
        value = elementwise(tensor.datatype, oip_codec.input_array(request, index))
        if raw:
            oip_codec.add_output(response, name, value, tensor.datatype)
        else:
            out = response.outputs.add(name=name, datatype=tensor.datatype, shape=value.shape)
            out.contents.SetInParent()
            values = getattr(out.contents, oip_codec.CONTENTS_FIELD[tensor.datatype])
            flat = value.reshape(-1)
            values.extend(list(flat) if tensor.datatype == "BYTES" else flat.tolist())
        response.outputs[-1].parameters["note"].string_param = "row-wise"
    return response


def serialized(message) -> bytes:
    # Map entries (parameters) have no defined order unless asked for: the tensors themselves
    # are compared as the wire carries them.
    return message.SerializeToString(deterministic=True)


# --- the property ------------------------------------------------------------------------------


@st.composite
def batchable_requests(draw, datatype: str, raw: bool):
    """2..5 compatible requests: same inputs (the parametrized datatype, maybe a second input of
    another datatype), same non-batch dims, each with its own batch size and data."""
    kinds = DATATYPES if raw else TYPED
    inputs = [("x", datatype)]
    if draw(st.booleans()):
        inputs.append(("y", draw(st.sampled_from(kinds))))
    rest = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    outputs = []
    if len(inputs) == 2 and draw(st.booleans()):
        outputs = ["OUT_" + draw(st.sampled_from(["x", "y"]))]
    requests = []
    for n in range(draw(st.integers(2, 5))):
        batch = draw(st.integers(1, 3))
        request = oip.ModelInferRequest(model_name="m", id=f"call-{n}")
        for name, dt in inputs:
            add_tensor(request, name, dt, draw(array_of(dt, (batch, *rest))), raw)
        for name in outputs:
            request.outputs.add(name=name)
        requests.append(request)
    return requests


@pytest.mark.parametrize(("datatype", "raw"), CASES, ids=CASE_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_split_of_merged_answer_is_byte_identical_to_single_answers(datatype, raw, data):
    requests = data.draw(batchable_requests(datatype, raw))
    before = [r.SerializeToString() for r in requests]
    keys = {batch_key(r) for r in requests}
    assert len(keys) == 1 and None not in keys

    merged, sizes = merge(requests)

    assert sizes == [batch_size(r) for r in requests]
    assert merged.id == ""
    assert [t.shape[0] for t in merged.inputs] == [sum(sizes)] * len(merged.inputs)
    assert batch_key(merged) == batch_key(requests[0])
    parts = split(run_model(merged), sizes, [r.id for r in requests])
    assert len(parts) == len(requests)
    for request, part in zip(requests, parts, strict=True):
        assert serialized(part) == serialized(run_model(request))
    assert [r.SerializeToString() for r in requests] == before  # callers' requests untouched


@pytest.mark.parametrize(("datatype", "raw"), CASES, ids=CASE_IDS)
def test_merged_request_concatenates_rows(datatype, raw):
    rng = np.random.default_rng(7)
    requests, arrays = [], []
    for batch in (1, 3, 2):
        if datatype == "BYTES":
            array = _objects([bytes([i]) * i for i in range(batch * 2)], (batch, 2))
        else:
            bits = rng.integers(0, 256, size=batch * 2 * 8, dtype=np.uint8).tobytes()
            dtype = oip_codec.NUMPY_DTYPE[datatype]
            array = np.frombuffer(bits[: batch * 2 * dtype.itemsize], dtype=dtype).reshape(batch, 2)
        request = oip.ModelInferRequest(model_name="m")
        add_tensor(request, "x", datatype, array, raw)
        requests.append(request)
        arrays.append(array)
    merged, sizes = merge(requests)
    assert sizes == [1, 3, 2]
    expected = np.concatenate(arrays)
    got = oip_codec.input_array(merged, 0)
    assert got.shape == expected.shape == (6, 2)
    if datatype == "BYTES":
        assert list(got.reshape(-1)) == list(expected.reshape(-1))
    elif raw:
        assert got.tobytes() == expected.tobytes()
    else:  # typed contents go through Python numbers: compare as the codec reads them back
        assert got.tobytes() == np.asarray(expected.tolist(), dtype=expected.dtype).tobytes()


# --- batch_key ---------------------------------------------------------------------------------


def request_of(shape=(2, 3), datatype="FP32", name="x", raw=True, **fields):
    request = oip.ModelInferRequest(model_name="m", **fields)
    array = np.zeros(shape, dtype=oip_codec.NUMPY_DTYPE[datatype])
    add_tensor(request, name, datatype, array, raw)
    return request


def test_batch_key_same_for_compatible_requests():
    a = request_of((2, 3), id="a", model_version="1")
    b = request_of((5, 3), id="b", model_version="")
    assert batch_key(a) == batch_key(b)
    assert hash(batch_key(a)) == hash(batch_key(b))


@pytest.mark.parametrize(
    "other",
    [
        lambda: request_of((2, 4)),  # non-batch dim
        lambda: request_of((2, 3, 1)),  # rank
        lambda: request_of(datatype="FP64"),
        lambda: request_of(name="y"),
        lambda: request_of(raw=False),  # content kind
    ],
)
def test_batch_key_differs_on_tensor_differences(other):
    assert batch_key(request_of()) != batch_key(other())


def test_batch_key_input_order_outputs_and_parameters_matter():
    def two(order):
        request = oip.ModelInferRequest(model_name="m")
        for name in order:
            oip_codec.add_input(request, name, np.zeros((1, 2), np.float32))
        return request

    assert batch_key(two("ab")) != batch_key(two("ba"))

    base = request_of()
    with_output = request_of()
    with_output.outputs.add(name="OUT")
    assert batch_key(base) != batch_key(with_output)
    with_output_param = request_of()
    with_output_param.outputs.add(name="OUT").parameters["classification"].int64_param = 2
    assert batch_key(with_output) != batch_key(with_output_param)

    p1, p2, p3 = request_of(), request_of(), request_of()
    p1.parameters["priority"].int64_param = 1
    p2.parameters["priority"].int64_param = 2
    p3.parameters["priority"].uint64_param = 1
    assert len({batch_key(p) for p in (base, p1, p2, p3)}) == 4
    q1, q2 = request_of(), request_of()  # map insertion order is not part of the key
    q1.parameters["a"].int64_param = 1
    q1.parameters["b"].string_param = "x"
    q2.parameters["b"].string_param = "x"
    q2.parameters["a"].int64_param = 1
    assert batch_key(q1) == batch_key(q2)

    i1, i2 = request_of(), request_of()
    i1.inputs[0].parameters["k"].bool_param = True
    assert batch_key(i1) != batch_key(i2)


def test_unbatchable_requests_have_no_key():
    assert batch_key(oip.ModelInferRequest(model_name="m")) is None  # no inputs
    assert batch_key(request_of(())) is None  # scalar: no batch dimension
    assert batch_key(request_of((0, 3))) is None  # batch of 0
    mixed = request_of((2, 3))
    oip_codec.add_input(mixed, "y", np.zeros((3, 3), np.float32))
    assert batch_key(mixed) is None  # inputs disagree on the batch size
    short = request_of((2, 3))
    short.inputs.add(name="y", datatype="FP32", shape=[2, 3])  # raw contents not one per input
    assert batch_key(short) is None
    half = oip.ModelInferRequest(model_name="m")
    half.inputs.add(name="x", datatype="FP16", shape=[1]).contents.SetInParent()
    assert batch_key(half) is None  # FP16 cannot be typed
    for name in ("sequence_id", "sequence_start", "sequence_end"):
        sequence = request_of()
        sequence.parameters[name].int64_param = 1
        assert batch_key(sequence) is None


# --- split errors ------------------------------------------------------------------------------


def test_output_without_batch_dimension_fails_the_batch():
    response = oip.ModelInferResponse(model_name="m")
    oip_codec.add_output(response, "OUT", np.zeros((3, 2), np.float32))
    oip_codec.add_output(response, "LABELS", np.zeros((4,), np.int32))
    with pytest.raises(GatewayError) as info:
        split(response, [1, 2])
    assert info.value.code is grpc.StatusCode.INTERNAL
    assert "backend answered output 'LABELS' with first dimension 4 for a batch of 3" in str(
        info.value
    )

    scalar = oip.ModelInferResponse(model_name="m")
    oip_codec.add_output(scalar, "S", np.float32(1.0).reshape(()))
    with pytest.raises(GatewayError, match="'S' with first dimension none"):
        split(scalar, [1, 1])


def test_malformed_answers_fail_the_batch():
    truncated = oip.ModelInferResponse()
    truncated.outputs.add(name="B", datatype="BYTES", shape=[2])
    truncated.raw_output_contents.append(oip_codec.pack_bytes([b"ab", b"cd"])[:-1])
    with pytest.raises(GatewayError, match="truncated BYTES") as info:
        split(truncated, [1, 1])
    assert info.value.code is grpc.StatusCode.INTERNAL

    extra = oip.ModelInferResponse()
    extra.outputs.add(name="B", datatype="BYTES", shape=[2])
    extra.raw_output_contents.append(oip_codec.pack_bytes([b"ab", b"cd", b"ef"]))
    with pytest.raises(GatewayError, match="more BYTES than its shape"):
        split(extra, [1, 1])

    short = oip.ModelInferResponse()
    short.outputs.add(name="F", datatype="FP32", shape=[2, 2])
    short.raw_output_contents.append(b"\0" * 12)
    with pytest.raises(GatewayError, match="12 bytes"):
        split(short, [1, 1])

    typed = oip.ModelInferResponse()
    typed.outputs.add(name="I", datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, 2])
    with pytest.raises(GatewayError, match=r"2 elements in contents\.int_contents"):
        split(typed, [1, 1])

    missing = oip.ModelInferResponse()
    missing.outputs.add(name="I", datatype="INT32", shape=[2, 2])
    with pytest.raises(GatewayError, match="without data"):
        split(missing, [1, 1])

    uneven = oip.ModelInferResponse()
    oip_codec.add_output(uneven, "A", np.zeros((2,), np.float32))
    uneven.outputs.add(name="B", datatype="FP32", shape=[2])
    with pytest.raises(GatewayError, match="2 outputs with 1 raw_output_contents"):
        split(uneven, [1, 1])


def test_split_keeps_response_fields_and_sets_ids():
    response = oip.ModelInferResponse(model_name="m", model_version="7", id="")
    response.parameters["p"].string_param = "v"
    oip_codec.add_output(response, "OUT", np.arange(6, dtype=np.int64).reshape(3, 2))
    first, second = split(response, [2, 1], ["a", "b"])
    assert (first.model_name, first.model_version, first.id) == ("m", "7", "a")
    assert second.id == "b" and second.parameters["p"].string_param == "v"
    assert oip_codec.output_array(first, 0).tolist() == [[0, 1], [2, 3]]
    assert oip_codec.output_array(second, 0).tolist() == [[4, 5]]
    assert [p.id for p in split(response, [1, 2])] == ["", ""]
