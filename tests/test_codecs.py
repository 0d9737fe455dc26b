"""Exact round trips of every OIP datatype through each codec (property-based)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import kserve_json, tensorproto
from adapters.codecs import oip as oip_codec
from gateway.errors import GatewayError

NUMERIC = [d for d in oip_codec.NUMPY_DTYPE if d != "BYTES"]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def arrays(datatype: str, *, finite: bool = False):
    if datatype == "BYTES":
        return shapes.flatmap(
            lambda shape: st.lists(
                st.binary(max_size=12), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
            ).map(lambda items: _objects(items, shape))
        )
    dtype = oip_codec.NUMPY_DTYPE[datatype]
    if datatype == "BF16":
        # hypothesis has no bfloat16: draw the 16-bit patterns
        bits = hnp.arrays(np.uint16, shapes)
        return bits.map(lambda a: a.view(dtype)).filter(
            lambda a: not finite or np.all(np.isfinite(a.astype(np.float32)))
        )
    elements = None
    if dtype.kind == "f":
        elements = st.floats(
            width=dtype.itemsize * 8, allow_nan=not finite, allow_infinity=not finite
        )
    return hnp.arrays(dtype, shapes, elements=elements)


def _objects(items, shape):
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaN payloads and -0.0 included) plus equal shape and dtype."""
    if a.shape != b.shape:
        return False
    if a.dtype == np.object_:
        return b.dtype == np.object_ and list(a.reshape(-1)) == list(b.reshape(-1))
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("datatype", list(oip_codec.NUMPY_DTYPE))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_oip_raw_round_trip(datatype, data):
    array = data.draw(arrays(datatype))
    request = oip.ModelInferRequest()
    oip_codec.add_input(request, "x", array, datatype)
    wire = oip.ModelInferRequest.FromString(request.SerializeToString())
    assert same(oip_codec.input_array(wire, 0), array)


@pytest.mark.parametrize("datatype", sorted(oip_codec.CONTENTS_FIELD))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_oip_typed_contents_round_trip(datatype, data):
    array = data.draw(arrays(datatype))
    tensor = oip.ModelInferRequest().inputs.add(
        name="x", datatype=datatype, shape=list(array.shape)
    )
    getattr(tensor.contents, oip_codec.CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    decoded = oip_codec.from_contents(datatype, tensor.shape, tensor.contents, "x")
    assert same(decoded, array)


@pytest.mark.parametrize("datatype", list(oip_codec.NUMPY_DTYPE))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_tensorproto_round_trip(datatype, data):
    from tensorgate.tfserving import tensorflow_pb2

    array = data.draw(arrays(datatype))
    proto = tensorproto.to_tensor_proto(array, datatype)
    wire = tensorflow_pb2.TensorProto.FromString(proto.SerializeToString())
    decoded, decoded_type = tensorproto.from_tensor_proto(wire, "x")
    assert decoded_type == datatype
    assert same(decoded, array)


def test_tensorproto_typed_values_and_fill():
    from tensorgate.tfserving import tensorflow_pb2 as tf

    proto = tf.TensorProto(dtype=tf.DT_FLOAT, float_val=[2.5])
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=3)
    array, _ = tensorproto.from_tensor_proto(proto)
    assert array.tolist() == [[2.5] * 3] * 2  # TF's single-value fill
    half = tf.TensorProto(dtype=tf.DT_HALF, half_val=[np.float16(1.5).view(np.uint16)])
    half.tensor_shape.dim.add(size=1)
    assert tensorproto.from_tensor_proto(half)[0].tolist() == [1.5]
    with pytest.raises(GatewayError, match="TensorFlow dtype DT_COMPLEX64 has no OIP datatype"):
        tensorproto.from_tensor_proto(tf.TensorProto(dtype=tf.DT_COMPLEX64), "z")


@pytest.mark.parametrize("datatype", list(oip_codec.NUMPY_DTYPE))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_kserve_json_round_trip(datatype, data):
    # JSON has no NaN/Infinity in its standard form: finite values only.
    array = data.draw(arrays(datatype, finite=True))
    body = json.dumps(kserve_json.to_json_tensor("x", array, datatype))
    name, decoded, decoded_type = kserve_json.from_json_tensor(json.loads(body), "test")
    assert (name, decoded_type) == ("x", datatype)
    if array.dtype.kind == "f" or datatype == "BF16":
        # -0.0 and 0.0 compare equal but must survive too: compare bit patterns
        assert decoded.shape == array.shape and decoded.tobytes() == array.tobytes()
    else:
        assert same(decoded, array)


def test_bad_inputs_name_the_tensor():
    with pytest.raises(GatewayError, match="tensor 'x': FP32\\[2\\] needs 8 bytes, got 4"):
        oip_codec.from_raw("FP32", [2], b"\0" * 4, "x")
    with pytest.raises(GatewayError, match="expected 2 BYTES elements, found 1"):
        oip_codec.from_raw("BYTES", [2], b"\x01\0\0\0a", "x")
    with pytest.raises(GatewayError, match="tensor 'y' has 3 values for shape \\[2\\]"):
        kserve_json.from_json_tensor(
            {"name": "y", "datatype": "INT32", "shape": [2], "data": [1, 2, 3]}, "out"
        )
