"""numpy arrays <-> tensorflow.TensorProto (TF Serving's tensor form).

`tensor_content` (raw little-endian bytes) is the fast path for every fixed-size type, as TF
itself encodes them; typed `*_val` fields are read too, including TF's convention that a single
value fills the whole shape. DT_HALF and DT_BFLOAT16 typed values are 16-bit patterns in half_val.
"""

from __future__ import annotations

import numpy as np

from adapters.codecs.oip import NUMPY_DTYPE
from gateway.errors import invalid
from tensorgate.tfserving import tensorflow_pb2 as tf

TF_DTYPE: dict[str, int] = {
    "BOOL": tf.DT_BOOL,
    "UINT8": tf.DT_UINT8,
    "UINT16": tf.DT_UINT16,
    "UINT32": tf.DT_UINT32,
    "UINT64": tf.DT_UINT64,
    "INT8": tf.DT_INT8,
    "INT16": tf.DT_INT16,
    "INT32": tf.DT_INT32,
    "INT64": tf.DT_INT64,
    "FP16": tf.DT_HALF,
    "BF16": tf.DT_BFLOAT16,
    "FP32": tf.DT_FLOAT,
    "FP64": tf.DT_DOUBLE,
    "BYTES": tf.DT_STRING,
}
OIP_DATATYPE: dict[int, str] = {v: k for k, v in TF_DTYPE.items()}

_VAL_FIELD = {
    tf.DT_FLOAT: "float_val",
    tf.DT_DOUBLE: "double_val",
    tf.DT_INT32: "int_val",
    tf.DT_INT16: "int_val",
    tf.DT_INT8: "int_val",
    tf.DT_UINT8: "int_val",
    tf.DT_UINT16: "int_val",
    tf.DT_INT64: "int64_val",
    tf.DT_BOOL: "bool_val",
    tf.DT_UINT32: "uint32_val",
    tf.DT_UINT64: "uint64_val",
    tf.DT_HALF: "half_val",
    tf.DT_BFLOAT16: "half_val",
}


def to_tensor_proto(
    array: np.ndarray, datatype: str, out: tf.TensorProto | None = None
) -> tf.TensorProto:
    proto = out if out is not None else tf.TensorProto()
    proto.dtype = TF_DTYPE[datatype]
    for size in array.shape:
        proto.tensor_shape.dim.add(size=int(size))
    if datatype == "BYTES":
        proto.string_val.extend(
            v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)
        )
    else:
        proto.tensor_content = np.ascontiguousarray(array, dtype=NUMPY_DTYPE[datatype]).tobytes()
    return proto


def from_tensor_proto(proto: tf.TensorProto, name: str = "") -> tuple[np.ndarray, str]:
    """(array, OIP datatype) of a TensorProto."""
    datatype = OIP_DATATYPE.get(proto.dtype)
    if datatype is None:
        dtype_name = (
            tf.DataType.Name(proto.dtype) if proto.dtype in tf.DataType.values() else proto.dtype
        )
        raise invalid(f"tensor {name!r}: TensorFlow dtype {dtype_name} has no OIP datatype")
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"tensor {name!r}: unknown rank")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == "BYTES":
        values = list(proto.string_val)
        array = np.empty(count, dtype=np.object_)
        if len(values) == count:
            array[:] = values
        elif len(values) == 1:
            array[:] = values * count
        elif count:
            raise invalid(f"tensor {name!r}: {len(values)} string values for shape {list(shape)}")
        return array.reshape(shape), datatype
    dtype = NUMPY_DTYPE[datatype]
    if proto.tensor_content:
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise invalid(
                f"tensor {name!r}: tensor_content size does not match shape {list(shape)}"
            )
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape), datatype
    values = getattr(proto, _VAL_FIELD[proto.dtype])
    if proto.dtype in (tf.DT_HALF, tf.DT_BFLOAT16):
        flat = np.asarray(values, dtype=np.uint16).view(dtype)
    else:
        flat = np.asarray(values, dtype=dtype)
    if flat.size == count:
        return flat.reshape(shape), datatype
    if flat.size == 1 or (flat.size == 0 and count):
        fill = flat[0] if flat.size else np.zeros((), dtype=dtype)
        return np.full(shape, fill, dtype=dtype), datatype
    if count == 0:
        return np.zeros(shape, dtype=dtype), datatype
    raise invalid(f"tensor {name!r}: {flat.size} values for shape {list(shape)}")
