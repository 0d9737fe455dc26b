"""Smoke examples (config: Route.smoke, Variant.smoke) as requests and verdicts: the part that
`tensorgate smoke` (over gRPC, gateway/controlplane/smoke.py) and rollouts (in the gateway,
gateway/controlplane/admin/rollout_smoke.py) share. Pure: no I/O, no clock.

An example's tensors are in the KServe v2 JSON form (`data` flat or nested, row-major), read
here into numpy arrays with the datatypes of the Open Inference Protocol codec
(adapters/codecs/oip.py), so a request is built and an answer read the way the gateway itself
reads them.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import struct_pb2
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs.oip import NUMPY_DTYPE, add_input, output_array
from tensorgate.config.v1 import config_pb2

DATATYPES = tuple(NUMPY_DTYPE)
_FLOATS = {"FP16", "BF16", "FP32", "FP64"}
# Unset tolerance: a few units in the last place of the datatype, so that a value printed by a
# model and pasted into the config compares equal, and a wrong model does not.
DEFAULT_REL = {"FP16": 1e-3, "BF16": 1e-3, "FP32": 1e-6, "FP64": 1e-6}
EXACT_INTEGERS = 2**53  # a JSON number (a double) holds every integer up to this exactly
MAX_EXAMPLE_BYTES = 64 * 1024
_SHOWN_DIFFERENCES = 3


class TensorProblem(ValueError):
    """What is wrong with an example's tensor, and which of its fields."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


def examples_for(route: config_pb2.Route, variant: config_pb2.Variant) -> list:
    """What one variant runs: its route's examples, then its own."""
    return [*route.smoke, *variant.smoke]


def _flat(value: struct_pb2.Value, out: list) -> None:
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        for item in value.list_value.values:
            _flat(item, out)
    elif kind == "number_value":
        out.append(value.number_value)
    elif kind == "bool_value":
        out.append(value.bool_value)
    elif kind == "string_value":
        out.append(value.string_value)
    elif kind == "struct_value":
        out.append(dict(value.struct_value.fields))
    else:
        out.append(None)


def flat_values(data: struct_pb2.ListValue) -> list:
    """`data` flattened row-major (nested lists are read in order)."""
    out: list = []
    for item in data.values:
        _flat(item, out)
    return out


def _bytes_element(item, index: int) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, dict) and set(item) == {"b64"} and item["b64"].HasField("string_value"):
        try:
            return base64.b64decode(item["b64"].string_value, validate=True)
        except (binascii.Error, ValueError):
            raise TensorProblem("data", f"element {index}: b64 is not base64") from None
    raise TensorProblem("data", f"element {index}: BYTES values are text or {{b64: ...}}")


def _number(item, index: int, datatype: str):
    if datatype == "BOOL":
        if not isinstance(item, bool):
            raise TensorProblem("data", f"element {index}: BOOL values are true or false")
        return item
    if isinstance(item, bool) or not isinstance(item, float):
        raise TensorProblem("data", f"element {index}: {datatype} values are numbers")
    if datatype in _FLOATS:
        return item
    if not math.isfinite(item) or not item.is_integer():
        raise TensorProblem("data", f"element {index}: {item:g} is not a whole number")
    if abs(item) > EXACT_INTEGERS:
        raise TensorProblem(
            "data", f"element {index}: {item:.0f} is beyond 2^53, which JSON cannot hold exactly"
        )
    info = np.iinfo(NUMPY_DTYPE[datatype])
    if not info.min <= item <= info.max:
        raise TensorProblem("data", f"element {index}: {item:.0f} is out of range for {datatype}")
    return int(item)


def to_array(tensor: config_pb2.SmokeTensor, *, any_size: bool = False) -> np.ndarray:
    """The tensor's values as an array of its datatype and shape, or TensorProblem. `any_size`:
    a shape dimension of -1 is allowed (never for data, only for checks)."""
    if tensor.datatype not in NUMPY_DTYPE:
        raise TensorProblem(
            "datatype", f"{tensor.datatype!r} is not an OIP datatype ({', '.join(DATATYPES)})"
        )
    shape = tuple(tensor.shape)
    if any(d < (-1 if any_size else 0) for d in shape):
        raise TensorProblem("shape", "dimensions are sizes >= 0")
    items = flat_values(tensor.data)
    count = math.prod(shape)
    if len(items) != count:
        raise TensorProblem(
            "data", f"{len(items)} values for shape {list(shape)}, which holds {count}"
        )
    if tensor.datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = [_bytes_element(item, i) for i, item in enumerate(items)]
        return array.reshape(shape)
    values = [_number(item, i, tensor.datatype) for i, item in enumerate(items)]
    dtype = NUMPY_DTYPE[tensor.datatype]
    if tensor.datatype in ("FP16", "BF16"):
        return np.asarray(values, dtype=np.float32).astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def request(model: str, version: str, example: config_pb2.SmokeExample) -> oip.ModelInferRequest:
    """The example's ModelInferRequest for the public `model` (and pinned `version`). Inputs go
    raw, as Triton's clients send them; every output is answered (none requested by name)."""
    message = oip.ModelInferRequest(model_name=model, model_version=version)
    message.id = f"smoke:{example.name}"
    for tensor in example.inputs:
        add_input(message, tensor.name, to_array(tensor), tensor.datatype)
    return message


@dataclass
class Verdict:
    """One example's outcome on one variant."""

    route: str
    variant: str
    example: str
    problems: list[str] = field(default_factory=list)
    latency_s: float | None = None  # None: no answer was measured (not sent, or unreachable)
    budget_s: float | None = None
    reached: str = ""  # how the variant was reached ("version 2", "route key k", "its only one")

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "route": self.route,
            "variant": self.variant,
            "example": self.example,
            "passed": self.passed,
            "problems": list(self.problems),
            "latency_ms": None if self.latency_s is None else round(self.latency_s * 1000, 3),
            "budget_ms": None if self.budget_s is None else round(self.budget_s * 1000, 3),
            "reached": self.reached,
        }


def budget(example: config_pb2.SmokeExample) -> float | None:
    d = example.latency_budget
    value = d.seconds + d.nanos / 1e9
    return value if example.HasField("latency_budget") and value > 0 else None


def latency_problem(example: config_pb2.SmokeExample, latency_s: float) -> str | None:
    limit = budget(example)
    if limit is not None and latency_s > limit:
        return f"answered in {latency_s * 1000:.1f} ms, over its budget of {limit * 1000:g} ms"
    return None


def _outputs(response: oip.ModelInferResponse) -> dict[str, tuple[str, np.ndarray | str]]:
    """name -> (datatype, array), or (datatype, why it cannot be read)."""
    found = {}
    for i, tensor in enumerate(response.outputs):
        try:
            found[tensor.name] = (tensor.datatype, output_array(response, i))
        except Exception as err:  # a malformed answer is a finding, not a crash
            found[tensor.name] = (tensor.datatype, f"unreadable ({getattr(err, 'message', err)})")
    return found


def _index(flat_index: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return ""
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat_index, shape)) + "]"


def _shown(value) -> str:
    if isinstance(value, bytes):
        return repr(value[:40])
    if isinstance(value, float | np.floating):
        return f"{float(value):.9g}"
    return str(value)


def _values_problem(name, datatype, got, expected, tolerance) -> str | None:
    shape = expected.shape
    got_flat, want_flat = got.reshape(-1), expected.reshape(-1)
    if datatype in _FLOATS:
        abs_tol, rel_tol = tolerance
        a, b = got_flat.astype(np.float64), want_flat.astype(np.float64)
        wrong = ~np.isclose(a, b, rtol=rel_tol, atol=abs_tol, equal_nan=True)
        bound = f"tolerance: abs {abs_tol:g}, rel {rel_tol:g}"
    else:
        wrong = np.asarray([g != w for g, w in zip(got_flat, want_flat, strict=True)], dtype=bool)
        bound = "compared exactly"
    bad = np.flatnonzero(wrong)
    if not bad.size:
        return None
    shown = "; ".join(
        f"{name}{_index(i, shape)} = {_shown(got_flat[i])}, expected {_shown(want_flat[i])}"
        for i in bad[:_SHOWN_DIFFERENCES]
    )
    return f"{shown} ({bad.size} of {wrong.size} values differ; {bound})"


def tolerance(example: config_pb2.SmokeExample, datatype: str) -> tuple[float, float]:
    """(abs, rel) for a floating-point output of `datatype`."""
    if example.HasField("tolerance"):
        return example.tolerance.abs, example.tolerance.rel
    return 0.0, DEFAULT_REL.get(datatype, 0.0)


def _expected_problems(example, outputs) -> list[str]:
    problems = []
    for tensor in example.outputs:
        if tensor.name not in outputs:
            problems.append(f"{tensor.name}: not in the answer (it has: {_names(outputs)})")
            continue
        datatype, got = outputs[tensor.name]
        if datatype != tensor.datatype:
            problems.append(f"{tensor.name}: datatype {datatype}, expected {tensor.datatype}")
        elif isinstance(got, str):
            problems.append(f"{tensor.name}: {got}")
        elif list(got.shape) != list(tensor.shape):
            problems.append(
                f"{tensor.name}: shape {list(got.shape)}, expected {list(tensor.shape)}"
            )
        else:
            wrong = _values_problem(
                tensor.name, datatype, got, to_array(tensor), tolerance(example, datatype)
            )
            if wrong:
                problems.append(wrong)
    return problems


def _names(outputs) -> str:
    return ", ".join(sorted(outputs)) or "no outputs"


def _check_problems(check: config_pb2.SmokeCheck, outputs) -> list[str]:
    name = check.output
    if name not in outputs:
        return [f"{name}: not in the answer (it has: {_names(outputs)})"]
    datatype, got = outputs[name]
    if check.datatype and datatype != check.datatype:
        return [f"{name}: datatype {datatype}, expected {check.datatype}"]
    if isinstance(got, str):
        return [f"{name}: {got}"]
    problems = []
    want = list(check.shape)
    if want and (
        len(want) != got.ndim or any(w not in (-1, g) for w, g in zip(want, got.shape, strict=True))
    ):
        problems.append(f"{name}: shape {list(got.shape)}, expected {want} (-1: any size)")
    numeric = got.dtype != np.object_
    if (check.HasField("min") or check.HasField("max")) and not numeric:
        problems.append(f"{name}: {datatype} values have no range")
    elif numeric and got.size:
        values = got.astype(np.float64).reshape(-1)
        if check.HasField("min") and (np.isnan(values).any() or values.min() < check.min):
            problems.append(f"{name}: smallest value {values.min():.9g}, expected >= {check.min:g}")
        if check.HasField("max") and (np.isnan(values).any() or values.max() > check.max):
            problems.append(f"{name}: largest value {values.max():.9g}, expected <= {check.max:g}")
    if check.argmax:
        if not numeric or got.ndim == 0:
            problems.append(f"{name}: no argmax for a {datatype} tensor of shape {list(got.shape)}")
        else:
            found = np.argmax(got.astype(np.float64), axis=-1).reshape(-1).tolist()
            if found != list(check.argmax):
                problems.append(f"{name}: argmax {found}, expected {list(check.argmax)}")
    return problems


def judge(example: config_pb2.SmokeExample, response: oip.ModelInferResponse) -> list[str]:
    """What is wrong with `response` as the answer to `example`: empty when it passes."""
    outputs = _outputs(response)
    problems = _expected_problems(example, outputs)
    for check in example.checks:
        problems.extend(_check_problems(check, outputs))
    return problems
