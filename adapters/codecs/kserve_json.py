"""numpy arrays <-> the JSON tensors of the Open Inference Protocol REST form (KServe v2), which
is the default TorchServe body contract (deploy/torchserve/oip_handler.py).

`data` is the flat row-major list; BYTES elements are {"b64": "..."} so any bytes survive; BF16
and FP16 travel as JSON numbers, which represent every value of theirs exactly.
"""

from __future__ import annotations

import base64

import numpy as np

from adapters.codecs.oip import NUMPY_DTYPE
from gateway.errors import invalid


def to_json_tensor(name: str, array: np.ndarray, datatype: str) -> dict:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        data = [{"b64": base64.b64encode(bytes(v)).decode()} for v in flat]
    elif datatype in ("FP16", "BF16"):
        data = flat.astype(np.float32).tolist()
    else:
        data = flat.tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def from_json_tensor(tensor: dict, where: str = "") -> tuple[str, np.ndarray, str]:
    """(name, array, datatype) of a JSON tensor; INVALID_ARGUMENT naming what is wrong."""
    try:
        name = tensor["name"]
        datatype = tensor["datatype"]
        shape = tuple(int(d) for d in tensor["shape"])
        data = tensor["data"]
    except (KeyError, TypeError, ValueError) as err:
        raise invalid(f"{where}: malformed tensor ({err!r})") from None
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
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
