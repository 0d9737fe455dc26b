"""Open Inference Protocol tensors <-> numpy arrays.

OIP carries data either as `raw_input_contents` / `raw_output_contents` (little-endian bytes;
BYTES elements each prefixed with a 4-byte little-endian length) or as typed `contents`. BF16 has
no numpy dtype of its own; ml_dtypes (a tritonclient dependency) provides one.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from tritonclient.grpc import service_pb2 as oip

from gateway.errors import invalid

NUMPY_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in NUMPY_DTYPE.items() if k != "BYTES"}

# InferTensorContents field per datatype; FP16 / BF16 travel raw only.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def data_fields(datatype: str) -> str:
    """Where an input of `datatype` may carry its data, for messages."""
    field = CONTENTS_FIELD.get(datatype)
    return f"contents.{field} or raw_input_contents" if field else "raw_input_contents"


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        return "BYTES"
    try:
        return DATATYPE_OF[
            array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        ]
    except KeyError:
        raise invalid(
            f"numpy dtype {array.dtype} has no Open Inference Protocol datatype"
        ) from None


def pack_bytes(values) -> bytes:
    """BYTES elements -> length-prefixed raw form."""
    parts = []
    for value in values:
        item = value.encode() if isinstance(value, str) else bytes(value)
        parts.append(len(item).to_bytes(4, "little"))
        parts.append(item)
    return b"".join(parts)


def unpack_bytes(buffer: bytes, count: int, name: str = "") -> list[bytes]:
    items, offset = [], 0
    view = memoryview(buffer)
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise invalid(f"tensor {name!r}: truncated BYTES length prefix")
        size = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(buffer):
            raise invalid(f"tensor {name!r}: BYTES element runs past the end of the data")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    if len(items) != count:
        raise invalid(f"tensor {name!r}: expected {count} BYTES elements, found {len(items)}")
    return items


def _object_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def from_raw(datatype: str, shape, raw: bytes, name: str = "") -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == "BYTES":
        return _object_array(unpack_bytes(raw, count, name), shape)
    dtype = NUMPY_DTYPE.get(datatype)
    if dtype is None:
        raise invalid(f"tensor {name!r}: unknown datatype {datatype!r}")
    if len(raw) != count * dtype.itemsize:
        raise invalid(
            f"tensor {name!r}: {datatype}{list(shape)} needs {count * dtype.itemsize} bytes, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_contents(
    datatype: str, shape, contents: oip.InferTensorContents, name: str = ""
) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise invalid(f"tensor {name!r}: {datatype} must be sent in raw contents")
    values = getattr(contents, field)
    if datatype == "BYTES":
        return _object_array(list(values), shape)
    return np.asarray(values, dtype=NUMPY_DTYPE[datatype]).reshape(shape)


def _tensor_array(tensor, raw, index: int) -> np.ndarray:
    if raw:
        return from_raw(tensor.datatype, tensor.shape, raw[index], tensor.name)
    return from_contents(tensor.datatype, tensor.shape, tensor.contents, tensor.name)


def input_array(request: oip.ModelInferRequest, index: int) -> np.ndarray:
    """The numpy value of request.inputs[index], from raw or typed contents."""
    return _tensor_array(request.inputs[index], request.raw_input_contents, index)


def output_array(response: oip.ModelInferResponse, index: int) -> np.ndarray:
    """The numpy value of response.outputs[index], from raw or typed contents."""
    return _tensor_array(response.outputs[index], response.raw_output_contents, index)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return pack_bytes(array.reshape(-1))
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPE[datatype]).tobytes()


def add_output(
    response: oip.ModelInferResponse, name: str, array: np.ndarray, datatype: str | None = None
) -> None:
    """Append an output in raw form, the way Triton answers."""
    datatype = datatype or datatype_of(array)
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    response.raw_output_contents.append(to_raw(array, datatype))


def add_input(
    request: oip.ModelInferRequest, name: str, array: np.ndarray, datatype: str | None = None
) -> None:
    datatype = datatype or datatype_of(array)
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(to_raw(array, datatype))
