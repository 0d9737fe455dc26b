"""Reject malformed ModelInfer requests before any backend sees them.

Two layers. `structure` needs nothing but the request: sizes, datatypes, shapes against the bytes
or typed contents actually sent, duplicates. `schema` runs after routing and checks the request
against the chosen model's inputs as the backend describes them (cached per model version).
Every message names the input and says what is wrong and what was expected.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Mapping

from tritonclient.grpc import service_pb2 as oip

from adapters.base import Adapter, TensorSpec
from adapters.codecs.oip import CONTENTS_FIELD, NUMPY_DTYPE
from gateway.errors import invalid
from gateway.pipeline import InferCall, InferService, Layer

# Bytes per element of each fixed-size OIP datatype; BYTES elements carry their own 4-byte
# little-endian length prefix. Typed-contents fields: adapters.codecs.oip.CONTENTS_FIELD.
ELEMENT_SIZE: dict[str, int] = {
    name: dtype.itemsize for name, dtype in NUMPY_DTYPE.items() if name != "BYTES"
}
DATATYPES = tuple(NUMPY_DTYPE)
_DATATYPE_LIST = ", ".join(DATATYPES)


def _shape(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _bytes_elements(buffer: bytes) -> int | None:
    """Number of length-prefixed BYTES elements in `buffer`, or None if it is not well formed."""
    count, offset, end = 0, 0, len(buffer)
    while offset < end:
        if offset + 4 > end:
            return None
        offset += 4 + int.from_bytes(buffer[offset : offset + 4], "little")
        count += 1
    return count if offset == end else None


def check_structure(
    request: oip.ModelInferRequest, *, max_request_bytes: int, max_inputs: int
) -> None:
    """Raise INVALID_ARGUMENT naming the first problem; return None for a well-formed request."""
    if not request.model_name:
        raise invalid("model_name is required")
    size = request.ByteSize()
    if size > max_request_bytes:
        raise invalid(
            f"request is {size} bytes, over the gateway's limit of {max_request_bytes} bytes "
            "(limits.max_request_bytes)"
        )
    inputs = request.inputs
    if not inputs:
        raise invalid(f"request for model {request.model_name!r} has no inputs")
    if len(inputs) > max_inputs:
        raise invalid(f"request has {len(inputs)} inputs, over the limit of {max_inputs}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise invalid(
            f"request has {len(raw)} raw_input_contents for {len(inputs)} inputs: when "
            "raw_input_contents is used, every input needs exactly one entry, in input order"
        )
    seen: set[str] = set()
    for index, tensor in enumerate(inputs):
        name = tensor.name
        if not name:
            raise invalid(f"inputs[{index}] has no name")
        if name in seen:
            raise invalid(f"input {name!r} appears more than once")
        seen.add(name)
        datatype = tensor.datatype
        if datatype not in CONTENTS_FIELD and datatype not in ELEMENT_SIZE:
            raise invalid(
                f"input {name!r}: datatype {datatype!r} is not an Open Inference Protocol "
                f"datatype (one of {_DATATYPE_LIST})"
            )
        shape = tensor.shape
        if any(d < 0 for d in shape):
            raise invalid(f"input {name!r}: shape {_shape(shape)} has a negative dimension")
        elements = math.prod(shape)
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise invalid(
                    f"input {name!r} has both typed contents and raw_input_contents[{index}]"
                )
            _check_raw(name, datatype, shape, elements, raw[index], index)
        elif has_contents:
            _check_contents(name, datatype, shape, elements, tensor.contents)
        elif elements:
            field = CONTENTS_FIELD.get(datatype)
            how = f"contents.{field} or raw_input_contents" if field else "raw_input_contents"
            raise invalid(f"input {name!r} has no data: send {how}")
    outputs: set[str] = set()
    for requested in request.outputs:
        if not requested.name:
            raise invalid("a requested output has no name")
        if requested.name in outputs:
            raise invalid(f"output {requested.name!r} is requested more than once")
        outputs.add(requested.name)


def _check_raw(name: str, datatype: str, shape, elements: int, buffer: bytes, index: int) -> None:
    size = ELEMENT_SIZE.get(datatype)
    if size is not None:
        expected = elements * size
        if len(buffer) != expected:
            raise invalid(
                f"input {name!r}: shape {_shape(shape)} of {datatype} needs {expected} bytes, "
                f"raw_input_contents[{index}] has {len(buffer)}"
            )
        return
    found = _bytes_elements(buffer)
    if found is None:
        raise invalid(
            f"input {name!r}: raw_input_contents[{index}] is not a sequence of 4-byte "
            "little-endian length-prefixed BYTES elements"
        )
    if found != elements:
        raise invalid(
            f"input {name!r}: shape {_shape(shape)} needs {elements} BYTES elements, "
            f"raw_input_contents[{index}] has {found}"
        )


def _check_contents(name: str, datatype: str, shape, elements: int, contents) -> None:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise invalid(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    for descriptor, values in contents.ListFields():
        if descriptor.name != field and len(values):
            raise invalid(
                f"input {name!r}: datatype {datatype} takes contents.{field}, "
                f"got contents.{descriptor.name}"
            )
    found = len(getattr(contents, field))
    if found != elements:
        raise invalid(
            f"input {name!r}: shape {_shape(shape)} needs {elements} elements, "
            f"contents.{field} has {found}"
        )


def structure(*, max_request_bytes: int, max_inputs: int) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def validate(call: InferCall) -> oip.ModelInferResponse:
            check_structure(
                call.request, max_request_bytes=max_request_bytes, max_inputs=max_inputs
            )
            return await inner(call)

        return validate

    return layer


@functools.lru_cache(maxsize=4096)
def _index(specs: tuple[TensorSpec, ...]) -> tuple[dict[str, TensorSpec], tuple[str, ...]]:
    """Specs by name and the required names: built once per model description, not per call."""
    return {s.name: s for s in specs}, tuple(s.name for s in specs if not s.optional)


def check_schema(request: oip.ModelInferRequest, model: str, specs: tuple[TensorSpec, ...]) -> None:
    by_name, required = _index(specs)
    for tensor in request.inputs:
        spec = by_name.get(tensor.name)
        if spec is None:
            known = ", ".join(by_name) or "none"
            raise invalid(f"model {model!r} has no input {tensor.name!r} (inputs: {known})")
        if spec.datatype != tensor.datatype:
            raise invalid(
                f"input {tensor.name!r}: model {model!r} expects {spec.datatype}, "
                f"request has {tensor.datatype}"
            )
        shape = tensor.shape
        if spec.shape is not None and (
            len(shape) != len(spec.shape)
            or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True))
        ):
            raise invalid(
                f"input {tensor.name!r}: shape {_shape(shape)} does not match model "
                f"{model!r} input shape {_shape(spec.shape)} (-1 = any size)"
            )
    sent = {t.name for t in request.inputs}
    missing = [name for name in required if name not in sent]
    if missing:
        raise invalid(f"model {model!r} requires input(s) {', '.join(map(repr, missing))}, missing")


class SpecCache:
    """Input specs per (backend, model, version), fetched once and refreshed after a TTL.

    A backend that cannot describe its model (or not within `wait`) yields None and the request
    goes through unchecked: the schema check only ever adds early, clearer errors, and must not
    make a slow backend's metadata call every caller's problem.
    """

    def __init__(self, ttl: float = 60.0, miss_ttl: float = 5.0, wait: float = 1.0) -> None:
        self._ttl = ttl
        self._miss_ttl = miss_ttl
        self._wait = wait
        self._entries: dict[tuple, tuple[float, asyncio.Task]] = {}

    async def get(self, adapter: Adapter, target, remaining: float | None = None):
        """The input specs of `target`'s model on `adapter` (route schema first), or None."""
        if target.schema is not None and target.schema.inputs:
            return tuple(
                TensorSpec(t.name, t.datatype, tuple(t.shape) or None, t.optional)
                for t in target.schema.inputs
            )
        model, version = target.backend_model, target.backend_version
        key = (adapter.name, model, version, target.signature_name, target.version_label)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is None or (now >= entry[0] and entry[1].done()):
            task = asyncio.ensure_future(adapter.input_specs(model, version, target))
            task.add_done_callback(lambda t, key=key, now=now: self._settled(key, now, t))
            self._entries[key] = (now + self._ttl, task)
        else:
            task = entry[1]
        if task.done():
            return None if task.cancelled() or task.exception() else task.result()
        wait = self._wait if remaining is None else max(0.0, min(self._wait, remaining / 2))
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return None

    def _settled(self, key, started: float, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None or task.result() is None:
            self._entries[key] = (started + self._miss_ttl, task)

    def clear(self) -> None:
        self._entries.clear()


def schema(adapters: Callable[[], Mapping[str, Adapter]], cache: SpecCache) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def validate(call: InferCall) -> oip.ModelInferResponse:
            target = call.target
            specs = await cache.get(adapters()[target.backend], target, call.remaining())
            if specs is not None:
                from_backend = target.schema is None or not target.schema.inputs
                if target.input_names and from_backend:  # backend names -> public names
                    public = {b: p for p, b in target.input_names}
                    specs = tuple(
                        TensorSpec(public.get(s.name, s.name), s.datatype, s.shape, s.optional)
                        for s in specs
                    )
                check_schema(call.request, call.model, specs)
            return await inner(call)

        return validate

    return layer
