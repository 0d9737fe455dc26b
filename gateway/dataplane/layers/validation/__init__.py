"""Reject malformed and hostile ModelInfer requests before any backend sees them.

Two layers. `structure` needs nothing but the request: sizes, name lengths, datatypes, shapes
against the bytes or typed contents actually sent, duplicates. `schema` runs after routing: the
request's parameters against the chosen backend's allowlist (adapters/parameters.py), then the
request against the chosen model's description (inputs, outputs, batching; cached per model
version). Every message names the input, output or parameter and says what is wrong and what was
expected; caller-supplied strings are quoted with `shown`, so a message stays small whatever the
caller sent.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

from google.protobuf.unknown_fields import UnknownFieldSet
from tritonclient.grpc import service_pb2 as oip

from adapters.base import Adapter, ModelSpec, TensorSpec
from adapters.codecs.oip import CONTENTS_FIELD, NUMPY_DTYPE, data_fields
from adapters.parameters import (
    ParameterRules,
    check_data_present,
    check_output_datatypes,
    check_parameters,
)
from gateway.dataplane.layers.contract import OnEnvoy, RouteLayer
from gateway.dataplane.layers.validation.specs import SpecCache
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.errors import invalid, shown
from tensorgate.config.v1 import config_pb2

# Longest accepted names, in UTF-8 bytes. Model, tensor and parameter names of real models are
# far shorter; the bounds keep hostile names out of route lookups, backend calls and messages.
MAX_NAME_BYTES = 256  # model_name, input and output names, parameter names
MAX_VERSION_BYTES = 64  # model_version
MAX_ID_BYTES = 256  # the request id (echoed back in the response)

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


def check_name(field: str, value: str, limit: int = MAX_NAME_BYTES) -> None:
    """Raise INVALID_ARGUMENT when `value` is longer than `limit` UTF-8 bytes; the message names
    `field` (e.g. "model_name", "name"), states the bound and quotes `value` cut short."""
    if len(value) > limit // 4:  # UTF-8 takes at most 4 bytes a character: no encoding below
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise invalid(
                f"{field} is {size} bytes, over the limit of {limit} bytes: {shown(value)}"
            )


def _check_parameter_names(where: str, parameters) -> None:
    for key in parameters:
        check_name(f"{where} parameter name", key)


def check_structure(
    request: oip.ModelInferRequest, *, max_inputs: int, max_request_bytes: int | None = None
) -> None:
    """Raise INVALID_ARGUMENT naming the first problem; return None for a well-formed request.
    `max_request_bytes`: also check the encoded size (the served path leaves it to the intake,
    which checks the wire size before parsing: ByteSize() re-encodes, ~57 ms for 32 MiB)."""
    if not request.model_name:
        raise invalid("model_name is required")
    check_name("model_name", request.model_name)
    check_name("model_version", request.model_version, MAX_VERSION_BYTES)
    check_name("id", request.id, MAX_ID_BYTES)
    if request.parameters:
        _check_parameter_names("request", request.parameters)
    if max_request_bytes is not None and (size := request.ByteSize()) > max_request_bytes:
        raise invalid(
            f"request is {size} bytes, over the gateway's limit of {max_request_bytes} bytes "
            "(limits.max_request_bytes)"
        )
    _check_known_fields(request)
    inputs = request.inputs
    if not inputs:
        raise invalid(f"request for model {shown(request.model_name)} has no inputs")
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
        check_name(f"inputs[{index}].name", name)
        if name in seen:
            raise invalid(f"input {shown(name)} appears more than once")
        seen.add(name)
        if tensor.parameters:
            _check_parameter_names(f"input {shown(name)}", tensor.parameters)
        datatype = tensor.datatype
        if datatype not in CONTENTS_FIELD and datatype not in ELEMENT_SIZE:
            raise invalid(
                f"input {shown(name)}: datatype {shown(datatype)} is not an Open Inference "
                f"Protocol datatype (one of {_DATATYPE_LIST})"
            )
        shape = tensor.shape
        if any(d < 0 for d in shape):
            raise invalid(f"input {shown(name)}: shape {_shape(shape)} has a negative dimension")
        elements = math.prod(shape)
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise invalid(
                    f"input {shown(name)} has both typed contents and raw_input_contents[{index}]"
                )
            _check_raw(name, datatype, shape, elements, raw[index], index)
        elif has_contents:
            _check_contents(name, datatype, shape, elements, tensor.contents)
        elif elements:
            how = data_fields(datatype)
            hint = ""
            if tensor.parameters:  # data by reference (shared memory) is not for callers
                names = ", ".join(shown(k) for k in sorted(tensor.parameters)[:3])
                hint = f"; its parameters ({names}) cannot supply data through the gateway"
            raise invalid(f"input {shown(name)} has no data: send {how}{hint}")
    outputs: set[str] = set()
    for index, requested in enumerate(request.outputs):
        name = requested.name
        if not name:
            raise invalid("a requested output has no name")
        check_name(f"outputs[{index}].name", name)
        if name in outputs:
            raise invalid(f"output {shown(name)} is requested more than once")
        outputs.add(name)
        if requested.parameters:
            _check_parameter_names(f"output {shown(name)}", requested.parameters)


def _unknown(message) -> str:
    """The numbers of `message`'s own unknown fields ("" when none)."""
    found = UnknownFieldSet(message)
    return ", ".join(str(f.field_number) for f in found) if len(found) else ""


def _check_known_fields(request: oip.ModelInferRequest) -> None:
    """Refuse fields the protocol does not define, anywhere in the request. The gateway checks the
    request as Python's protobuf parses it, but forwards it to Triton re-serialized, unknown fields
    included, and the parsers differ: a `parameters` map entry that carries an unknown field is
    kept by Python as an unknown field of the enclosing message (no parameter at all), while
    Triton's C++ parser reads it as the parameter. That smuggled `shared_memory_region` past the
    allowlist (Triton then read another client's region). What the gateway cannot see, it does not
    forward. About a microsecond per message checked, whatever the request's size."""
    for message, where, tensor, key in _messages(request):
        numbers = _unknown(message)
        if numbers:
            raise invalid(
                f"{_place(where, tensor, key)} has fields the Open Inference Protocol does not "
                f"define (field number(s) {numbers[:80]}; a corrupt parameters entry also shows "
                "up this way): refused, since the backend may read them differently than the "
                "gateway"
            )


def _messages(request: oip.ModelInferRequest):
    """Every message in the request, as (message, where, tensor, parameter key): what `_place`
    needs to name it, kept apart so the name is built only when a message is refused (the check
    runs on every call)."""
    yield request, "the request", None, None
    for key, value in request.parameters.items():
        yield value, "request parameter", None, key
    for tensor in request.inputs:
        yield tensor, "input", tensor, None
        if tensor.HasField("contents"):
            yield tensor.contents, "contents", tensor, None
        for key, value in tensor.parameters.items():
            yield value, "input", tensor, key
    for tensor in request.outputs:
        yield tensor, "output", tensor, None
        for key, value in tensor.parameters.items():
            yield value, "output", tensor, key


def _place(where: str, tensor, key: str | None) -> str:
    """Where a refused message is, for the caller: "input 'x' parameter 'k'" and the like."""
    if tensor is None:
        return where if key is None else f"{where} {shown(key)}"
    if where == "contents":
        return f"input {shown(tensor.name)} contents"
    place = f"{where} {shown(tensor.name)}"
    return place if key is None else f"{place} parameter {shown(key)}"


def _check_raw(name: str, datatype: str, shape, elements: int, buffer: bytes, index: int) -> None:
    size = ELEMENT_SIZE.get(datatype)
    if size is not None:
        expected = elements * size
        if len(buffer) != expected:
            raise invalid(
                f"input {shown(name)}: shape {_shape(shape)} of {datatype} needs {expected} bytes, "
                f"raw_input_contents[{index}] has {len(buffer)}"
            )
        return
    found = _bytes_elements(buffer)
    if found is None:
        raise invalid(
            f"input {shown(name)}: raw_input_contents[{index}] is not a sequence of 4-byte "
            "little-endian length-prefixed BYTES elements"
        )
    if found != elements:
        raise invalid(
            f"input {shown(name)}: shape {_shape(shape)} needs {elements} BYTES elements, "
            f"raw_input_contents[{index}] has {found}"
        )


def _check_contents(name: str, datatype: str, shape, elements: int, contents) -> None:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise invalid(f"input {shown(name)}: {datatype} data must be sent in raw_input_contents")
    for descriptor, values in contents.ListFields():
        if descriptor.name != field and len(values):
            raise invalid(
                f"input {shown(name)}: datatype {datatype} takes contents.{field}, "
                f"got contents.{descriptor.name}"
            )
    found = len(getattr(contents, field))
    if found != elements:
        raise invalid(
            f"input {shown(name)}: shape {_shape(shape)} needs {elements} elements, "
            f"contents.{field} has {found}"
        )


def structure(*, max_inputs: int) -> Layer:
    """The request's size was checked on the wire by the intake (gateway/dataplane/intake.py)."""

    def layer(inner: InferService) -> InferService:
        async def validate(call: InferCall) -> InferResult:
            check_structure(call.request, max_inputs=max_inputs)
            return await inner(call)

        return validate

    return layer


_LISTED = 16  # names a message lists at most


def _listed(names) -> str:
    names = list(names)
    shown_names = ", ".join(names[:_LISTED]) or "none"
    return shown_names + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


@functools.lru_cache(maxsize=4096)
def _index(spec: ModelSpec):
    """Built once per model description, not per call: inputs by name, the required input
    names, output names (None = not known) and the batch limit."""
    outputs = None if spec.outputs is None else frozenset(s.name for s in spec.outputs)
    return (
        {s.name: s for s in spec.inputs},
        tuple(s.name for s in spec.inputs if not s.optional),
        outputs,
        spec.max_batch_size,
    )


@functools.lru_cache(maxsize=4096)
def _output_datatypes(spec: ModelSpec | None) -> dict[str, str] | None:
    """Output name -> datatype, once per model description; None when outputs are not known."""
    if spec is None or spec.outputs is None:
        return None
    return {s.name: s.datatype for s in spec.outputs}


@functools.lru_cache(maxsize=1024)
def _public(spec: ModelSpec, input_names: tuple[tuple[str, str], ...], output_names) -> ModelSpec:
    """`spec` (backend tensor names) in the route's public names (Variant.input_names and
    output_names map public -> backend), built once per model description and variant."""

    def renamed(specs, names):
        public = {b: p for p, b in names}
        return tuple(
            TensorSpec(public.get(s.name, s.name), s.datatype, s.shape, s.optional) for s in specs
        )

    return ModelSpec(
        renamed(spec.inputs, input_names),
        None if spec.outputs is None else renamed(spec.outputs, output_names),
        spec.max_batch_size,
    )


def check_schema(request: oip.ModelInferRequest, model: str, spec: ModelSpec) -> None:
    """Raise INVALID_ARGUMENT for the first way `request` does not fit `spec` (in the names the
    caller uses): what the backend itself would refuse, found before any backend call."""
    by_name, required, outputs, max_batch = _index(spec)
    batch: tuple[int, str] | None = None  # (batch size, the input that set it)
    for tensor in request.inputs:
        name = tensor.name
        tensor_spec = by_name.get(name)
        if tensor_spec is None:
            raise invalid(
                f"model {shown(model)} has no input {shown(name)} (inputs: {_listed(by_name)})"
            )
        if tensor_spec.datatype != tensor.datatype:
            raise invalid(
                f"input {shown(name)}: model {shown(model)} expects {tensor_spec.datatype}, "
                f"request has {tensor.datatype}"
            )
        shape = tensor.shape
        want = tensor_spec.shape
        if want is not None and (
            len(shape) != len(want)
            or any(w not in (-1, got) for w, got in zip(want, shape, strict=True))
        ):
            raise invalid(
                f"input {shown(name)}: shape {_shape(shape)} does not match model "
                f"{shown(model)} input shape {_shape(want)} (-1 = any size)"
            )
        if max_batch:
            # Triton 2.51 refuses a batch of 0 (as a byte size mismatch), a batch over
            # max_batch_size, and inputs whose batch sizes differ. A 0 in any other -1
            # dimension it accepts, and so does this check.
            if not shape:
                raise invalid(
                    f"input {shown(name)}: model {shown(model)} batches (max_batch_size "
                    f"{max_batch}): its shape needs the batch size as first dimension"
                )
            size = shape[0]
            if not 1 <= size <= max_batch:
                raise invalid(
                    f"input {shown(name)}: batch size {size} (first dimension of "
                    f"{_shape(shape)}) is outside 1..{max_batch}, model {shown(model)}'s "
                    f"max_batch_size"
                )
            if batch is None:
                batch = (size, name)
            elif size != batch[0]:
                raise invalid(
                    f"input {shown(name)}: batch size {size} differs from input "
                    f"{shown(batch[1])}'s {batch[0]}: every input of model {shown(model)} "
                    "has the batch size as first dimension"
                )
    if required:
        sent = {t.name for t in request.inputs}
        missing = [name for name in required if name not in sent]
        if missing:
            raise invalid(
                f"model {shown(model)} requires input(s) {', '.join(map(shown, missing))}, missing"
            )
    if outputs is not None:
        for requested in request.outputs:
            if requested.name not in outputs:
                raise invalid(
                    f"model {shown(model)} has no output {shown(requested.name)} "
                    f"(outputs: {_listed(sorted(outputs))})"
                )


_NO_PARAMETERS = ParameterRules("this backend")


def schema(adapters: Callable[[], Mapping[str, Adapter]], cache: SpecCache) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def validate(call: InferCall) -> InferResult:
            target = call.target
            adapter = adapters()[target.backend]
            rules = getattr(adapter, "parameters", _NO_PARAMETERS)
            check_parameters(call.request, rules)
            if rules.data_required and not call.request.raw_input_contents:
                check_data_present(call.request, rules.backend)
            spec = await cache.get(adapter, target, call.remaining())
            if spec is not None:
                from_backend = target.schema is None or not target.schema.inputs
                if from_backend and (target.input_names or target.output_names):
                    spec = _public(spec, target.input_names, target.output_names)
                check_schema(call.request, call.model, spec)
            if rules.outputs and call.request.outputs:
                # e.g. Triton's classification: only on numeric outputs (a BYTES one crashes
                # Triton 2.51), so refused when the model's outputs are not known.
                check_output_datatypes(call.request, rules, call.model, _output_datatypes(spec))
            return await inner(call)

        return validate

    return layer


def on_envoy(settings, route: config_pb2.Route) -> OnEnvoy:
    """hands the route to the gateway when it declares a schema; otherwise Triton checks its own
    model description"""
    if route.HasField("schema"):
        return OnEnvoy(hand_over=("schema: requests are validated against the route's schema",))
    return OnEnvoy()


# Always on: every route's calls are checked against the chosen variant's model description.
SCHEMA = RouteLayer(
    "schema",
    settings=lambda policy, route: None,
    active=lambda settings: True,
    state=lambda env: env,
    build=lambda settings, env, plan: schema(env.adapters, env.specs),
    envoy=on_envoy,
    fields=("Route.schema",),
    decoupled="parameters and structure checked; not the model description or route schema",
)
