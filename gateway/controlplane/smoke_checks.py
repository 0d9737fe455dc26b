"""Config checks of smoke examples (Route.smoke, Variant.smoke), with field paths: a bad example
is refused whole, by check-config and by every admin change, like any other part of a route
(checks.py calls `problems`). What an example means: docs/smoke.md."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from gateway.controlplane.smoke_examples import (
    DATATYPES,
    MAX_EXAMPLE_BYTES,
    TensorProblem,
    to_array,
)
from tensorgate.config.v1 import config_pb2

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")


def _tensors(tensors, at: str, *, inputs: bool) -> Iterator[tuple[str, str]]:
    names: set[str] = set()
    for k, tensor in enumerate(tensors):
        tat = f"{at}[{k}]"
        if not tensor.name:
            yield f"{tat}.name", "required"
        elif tensor.name in names:
            yield f"{tat}.name", f"duplicate {'input' if inputs else 'output'} {tensor.name!r}"
        names.add(tensor.name)
        if not tensor.datatype:
            yield f"{tat}.datatype", f"required ({', '.join(DATATYPES)})"
            continue
        try:
            to_array(tensor)
        except TensorProblem as problem:
            yield f"{tat}.{problem.field}", problem.reason


def _checks(example: config_pb2.SmokeExample, at: str) -> Iterator[tuple[str, str]]:
    for k, check in enumerate(example.checks):
        cat = f"{at}.checks[{k}]"
        if not check.output:
            yield f"{cat}.output", "required: the output checked"
        if check.datatype and check.datatype not in DATATYPES:
            yield f"{cat}.datatype", f"{check.datatype!r} is not an OIP datatype"
        if any(d < -1 for d in check.shape):
            yield f"{cat}.shape", "dimensions are sizes >= 0, or -1 for any size"
        for bound in ("min", "max"):
            if check.HasField(bound) and not math.isfinite(getattr(check, bound)):
                yield f"{cat}.{bound}", "must be a finite number"
        if check.HasField("min") and check.HasField("max") and check.min > check.max:
            yield f"{cat}.min", f"{check.min:g} is above max {check.max:g}"
        if any(i < 0 for i in check.argmax):
            yield f"{cat}.argmax", "class indices are >= 0"
        if not (
            check.datatype
            or check.shape
            or check.HasField("min")
            or check.HasField("max")
            or check.argmax
        ):
            yield cat, "checks nothing: set datatype, shape, min, max or argmax"


def _example(example: config_pb2.SmokeExample, at: str) -> Iterator[tuple[str, str]]:
    if not example.name:
        yield f"{at}.name", "required"
    elif not _NAME.match(example.name):
        yield f"{at}.name", f"{example.name!r} must match {_NAME.pattern}"
    size = example.ByteSize()
    if size > MAX_EXAMPLE_BYTES:
        yield (
            at,
            (
                f"{size} bytes: at most {MAX_EXAMPLE_BYTES} (examples travel with every "
                "revision of the route table; keep them small)"
            ),
        )
        return
    if not example.inputs:
        yield f"{at}.inputs", "at least one input"
    yield from _tensors(example.inputs, f"{at}.inputs", inputs=True)
    yield from _tensors(example.outputs, f"{at}.outputs", inputs=False)
    tolerance = example.tolerance
    for bound in ("abs", "rel"):
        value = getattr(tolerance, bound)
        if not (math.isfinite(value) and value >= 0):
            yield f"{at}.tolerance.{bound}", "must be a finite number >= 0"
    if example.HasField("tolerance") and not example.outputs:
        yield f"{at}.tolerance", "applies to expected outputs, and this example lists none"
    yield from _checks(example, at)
    latency = example.latency_budget
    if example.HasField("latency_budget") and latency.seconds * 10**9 + latency.nanos <= 0:
        yield f"{at}.latency_budget", "must be positive"
    if not (example.outputs or example.checks or example.HasField("latency_budget")):
        yield (
            at,
            (
                "checks nothing: give expected outputs, checks or a latency_budget (an answer "
                "without an error alone says little)"
            ),
        )


def problems(config: config_pb2.GatewayConfig) -> Iterator[tuple[str, str]]:
    """(field path, reason) for every bad smoke example of every route and variant."""
    for i, route in enumerate(config.routes):
        at = f"routes[{i}].smoke"
        shared: set[str] = set()
        for k, example in enumerate(route.smoke):
            yield from _example(example, f"{at}[{k}]")
            if example.name and example.name in shared:
                yield f"{at}[{k}].name", f"duplicate example {example.name!r}"
            shared.add(example.name)
        for j, variant in enumerate(route.variants):
            vat = f"routes[{i}].variants[{j}].smoke"
            own: set[str] = set()
            for k, example in enumerate(variant.smoke):
                yield from _example(example, f"{vat}[{k}]")
                if example.name and (example.name in own or example.name in shared):
                    where = "this variant" if example.name in own else "the route's smoke"
                    yield f"{vat}[{k}].name", f"duplicate example {example.name!r} (in {where})"
                own.add(example.name)
