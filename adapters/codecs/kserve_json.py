"""numpy arrays <-> the JSON tensors of the Open Inference Protocol REST form (KServe v2), which
is the default TorchServe body contract (deploy/torchserve/oip_handler.py).

`data` is the flat row-major list; BYTES elements are {"b64": "..."} so any bytes survive; BF16
and FP16 travel as JSON numbers, which represent every value of theirs exactly.

`dumps` / `loads` are the JSON text: orjson, which writes numpy arrays itself (no Python list of
thousands of floats first), falling back to the standard library for what orjson would write
differently or refuse (NaN and infinities, which Python's json writes as NaN / Infinity and
orjson as null; numbers beyond 64 bits; text that is not UTF-8).
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import orjson

from adapters.codecs.oip import NUMPY_DTYPE
from gateway.errors import invalid


def to_json_tensor(name: str, array: np.ndarray, datatype: str, *, lists: bool = True) -> dict:
    """The JSON tensor of `array`. With lists=False, `data` may stay a numpy array that `dumps`
    writes with the values the list would have (for `dumps` only, not json.dumps)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        data = [{"b64": base64.b64encode(bytes(v)).decode()} for v in flat]
    elif not lists:
        data = json_array(flat)
    elif datatype in ("FP16", "BF16"):
        data = flat.astype(np.float32).tolist()
    else:
        data = flat.tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


class _NonFinite(list):
    """Values holding NaN or an infinity: `dumps` hands the body to Python's json, which writes
    NaN / Infinity as json.dumps always did here (orjson would write null)."""


def json_array(array: np.ndarray) -> np.ndarray | list:
    """`array` in the form `dumps` writes exactly: a numpy array for orjson where it can.

    Floats of every width go as float64, whose shortest text is what json.dumps(tolist()) gives
    (orjson writes float32 at float32 precision, which a reader parsing float64 and then rounding
    to float32 may round differently)."""
    if array.dtype.kind == "f" or array.dtype == NUMPY_DTYPE["BF16"]:
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            return _NonFinite(array.tolist())
    elif array.dtype.kind not in "biu":
        return array.tolist()
    return array if array.ndim else array.tolist()


def _default(value):
    if isinstance(value, np.ndarray):  # one orjson cannot write as is (not C-contiguous)
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value) -> bytes:
    """JSON bytes of `value`, whose numpy arrays come from `json_array`."""
    try:
        return orjson.dumps(
            value,
            default=_default,
            option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_PASSTHROUGH_SUBCLASS,
        )
    except orjson.JSONEncodeError:  # _NonFinite, an int beyond 64 bits, a lone surrogate
        return json.dumps(value, default=_default).encode()


def loads(data: bytes):
    """The value of JSON `data`; ValueError if it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # NaN / Infinity (Python's json writes them), UTF-16, ...
        return json.loads(data)


def from_json_tensor(tensor: dict, where: str = "") -> tuple[str, np.ndarray, str]:
    """(name, array, datatype) of a JSON tensor; INVALID_ARGUMENT naming what is wrong."""
    try:
        name = tensor["name"]
        datatype = tensor["datatype"]
        shape = tuple(int(d) for d in tensor["shape"])
        data = tensor["data"]
    except (KeyError, TypeError, ValueError) as err:
        raise invalid(f"{where}: malformed tensor ({err!r})") from None
    count = math.prod(shape)  # 1 for a scalar; exact, where int64 could wrap
    if len(data) != count:
        raise invalid(f"{where}: tensor {name!r} has {len(data)} values for shape {list(shape)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = [
            base64.b64decode(v["b64"]) if isinstance(v, dict) else str(v).encode() for v in data
        ]
        return name, array.reshape(shape), datatype
    dtype = NUMPY_DTYPE.get(datatype)
    if dtype is None:
        raise invalid(f"{where}: tensor {name!r} has unknown datatype {datatype!r}")
    if datatype in ("FP16", "BF16"):
        array = np.asarray(data, dtype=np.float32).astype(dtype)
    else:
        array = np.asarray(data, dtype=dtype)
    return name, array.reshape(shape), datatype
