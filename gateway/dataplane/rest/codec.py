"""KServe v2 REST bodies <-> the Open Inference Protocol messages every other path carries.

A REST call becomes the same `ModelInferRequest` a gRPC caller would send (all inputs in raw
form, as Triton's own clients send them), so it passes the same layers and reaches the same
adapters; the answer goes back as the v2 JSON response, with Triton's binary tensor extension
when asked: a body whose first `Inference-Header-Content-Length` bytes are the JSON and whose
rest is the tensors, each sized by its `binary_data_size` parameter, in input (or output) order.

Strict where Triton is strict and where a hostile caller could slip something past: unknown
keys, data whose element type or count does not fit its datatype and shape, sizes that do not
add up to the binary part are answered 400 naming the tensor; nothing is guessed."""

from __future__ import annotations

import json
import math

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs.oip import NUMPY_DTYPE, output_array, pack_bytes, to_raw
from gateway.errors import invalid

HEADER_LENGTH = "inference-header-content-length"
# Parameters of the REST binary extension: they say where bytes are in this HTTP body and mean
# nothing to a backend, so they are taken off before the request goes on.
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"
ALL_BINARY = "binary_data_output"
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_INT64 = (-(1 << 63), (1 << 63) - 1)


def parse_infer(
    body: bytes, header_length: int | None, model: str, version: str
) -> tuple[oip.ModelInferRequest, frozenset[str] | bool]:
    """(the request, which outputs answer in binary: a set of names, or True for all)."""
    if header_length is None:
        document, binary = body, b""
    else:
        if not 0 <= header_length <= len(body):
            raise invalid(
                f"Inference-Header-Content-Length is {header_length}, but the body has "
                f"{len(body)} bytes"
            )
        document, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        parsed = json.loads(document)
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON (a v2 inference request)") from None
    if not isinstance(parsed, dict):
        raise invalid("the request body must be a JSON object (a v2 inference request)")
    _only(parsed, _REQUEST_KEYS, "the request")
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    request_id = parsed.get("id", "")
    if not isinstance(request_id, str):
        raise invalid("id must be a string")
    request.id = request_id
    parameters = _object(parsed.get("parameters", {}), "parameters")
    all_binary = parameters.pop(ALL_BINARY, False)
    if not isinstance(all_binary, bool):
        raise invalid(f"parameters.{ALL_BINARY} must be true or false")
    _set_parameters(request.parameters, parameters, "parameters")
    inputs = parsed.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("inputs must be a list of tensors")
    offset = 0
    for i, tensor in enumerate(inputs):
        offset = _add_input(request, _object(tensor, f"inputs[{i}]"), i, binary, offset)
    if offset != len(binary):
        raise invalid(
            f"the body has {len(binary)} bytes of binary tensor data; the inputs' "
            f"{BINARY_SIZE} parameters add up to {offset}"
        )
    wanted: set[str] = set()
    outputs = parsed.get("outputs", [])
    if not isinstance(outputs, list):
        raise invalid("outputs must be a list")
    for i, entry in enumerate(outputs):
        where = f"outputs[{i}]"
        entry = _object(entry, where)
        _only(entry, _OUTPUT_KEYS, where)
        name = entry.get("name")
        if not isinstance(name, str):
            raise invalid(f"{where}.name must be a string")
        output = request.outputs.add(name=name)
        params = _object(entry.get("parameters", {}), f"{where}.parameters")
        as_binary = params.pop(BINARY_OUTPUT, False)
        if not isinstance(as_binary, bool):
            raise invalid(f"{where}.parameters.{BINARY_OUTPUT} must be true or false")
        if as_binary:
            wanted.add(name)
        _set_parameters(output.parameters, params, f"{where}.parameters")
    return request, True if all_binary else frozenset(wanted)


def _add_input(request, tensor: dict, i: int, binary, offset: int) -> int:
    where = f"inputs[{i}]"
    _only(tensor, _INPUT_KEYS, where)
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str):
        raise invalid(f"{where}.name must be a string")
    where = f"input {name[:64]!r}"
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPE:
        raise invalid(f"{where}: datatype must be one of {', '.join(NUMPY_DTYPE)}")
    if not isinstance(shape, list) or not all(
        type(d) is int and 0 <= d <= _INT64[1] for d in shape
    ):
        raise invalid(f"{where}: shape must be a list of non-negative integers")
    params = _object(tensor.get("parameters", {}), f"{where} parameters")
    size = params.pop(BINARY_SIZE, None)
    added = request.inputs.add(name=name, datatype=datatype, shape=shape)
    _set_parameters(added.parameters, params, f"{where} parameters")
    if size is not None:
        if type(size) is not int or size < 0:
            raise invalid(f"{where}: {BINARY_SIZE} must be a non-negative integer")
        if "data" in tensor:
            raise invalid(f"{where}: has both data and {BINARY_SIZE}; send one")
        if offset + size > len(binary):
            raise invalid(
                f"{where}: {BINARY_SIZE} {size} runs past the end of the body's binary data "
                f"({len(binary)} bytes)"
            )
        request.raw_input_contents.append(bytes(binary[offset : offset + size]))
        return offset + size
    if "data" not in tensor:
        raise invalid(f"{where}: no data (send data, or {BINARY_SIZE} with the binary extension)")
    request.raw_input_contents.append(_raw(tensor["data"], datatype, shape, where))
    return offset


def _raw(data, datatype: str, shape: list[int], where: str) -> bytes:
    """JSON tensor data (nested or flat, row-major) -> the raw form, checked against the
    datatype and the shape's element count."""
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _flat_strings(data, where)
        if len(items) != count:
            raise invalid(f"{where}: shape {shape} has {count} elements, data has {len(items)}")
        return pack_bytes(items)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise invalid(f"{where}: data is not a rectangular array of {datatype} values") from None
    if array.size != count:
        raise invalid(f"{where}: shape {shape} has {count} elements, data has {array.size}")
    kind = array.dtype.kind
    if count and not _fits(kind, datatype):
        raise invalid(f"{where}: data holds {_kind_name(kind)} values, not {datatype}")
    target = NUMPY_DTYPE[datatype]
    if count and target.kind in "iu":
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise invalid(f"{where}: a value is out of {datatype}'s range")
    return to_raw(array, datatype)


def _fits(kind: str, datatype: str) -> bool:
    if datatype == "BOOL":
        return kind == "b"
    if datatype.startswith(("INT", "UINT")):
        return kind in "iu"
    return kind in "iuf"  # FP16, BF16, FP32, FP64: JSON numbers


def _kind_name(kind: str) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "number", "U": "string"}.get(
        kind, "mixed or nested"
    )


def _flat_strings(data, where: str) -> list[str]:
    items: list[str] = []
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, str):
            items.append(value)
        else:
            raise invalid(f"{where}: BYTES data must be strings")
    return items


def _only(document: dict, allowed: frozenset[str], where: str) -> None:
    unknown = document.keys() - allowed
    if unknown:
        named = ", ".join(sorted(repr(k[:64]) for k in unknown)[:5])
        known = ", ".join(sorted(allowed))
        raise invalid(f"{where} has unknown field(s) {named}; allowed: {known}")


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(f"{where} must be a JSON object")
    return dict(value)


def _set_parameters(target, parameters: dict, where: str) -> None:
    """JSON parameter values -> InferParameter (bool, int64, double, string)."""
    for key, value in parameters.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if not _INT64[0] <= value <= _INT64[1]:
                raise invalid(f"{where}.{key[:64]}: integer out of int64 range")
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise invalid(f"{where}.{key[:64]}: must be a boolean, number or string")


def _parameter_values(parameters) -> dict:
    return {key: getattr(p, p.WhichOneof("parameter_choice")) for key, p in parameters.items()}


def infer_response(
    response: oip.ModelInferResponse, binary: frozenset[str] | bool
) -> tuple[bytes, int | None]:
    """(body, JSON header length when tensors follow it in binary, else None)."""
    outputs = []
    blobs: list[bytes] = []
    raw = response.raw_output_contents
    for i, tensor in enumerate(response.outputs):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = _parameter_values(tensor.parameters)
        if binary is True or tensor.name in binary:
            blob = raw[i] if raw else to_raw(output_array(response, i), tensor.datatype)
            parameters[BINARY_SIZE] = len(blob)
            blobs.append(blob)
        else:
            entry["data"] = _json_data(output_array(response, i), tensor.datatype)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = _parameter_values(response.parameters)
    document["outputs"] = outputs
    head = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join((head, *blobs)), len(head)


def _json_data(array: np.ndarray, datatype: str) -> list:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        # Not UTF-8 text: JSON cannot carry it as is; a caller that needs the exact bytes asks
        # for the output in binary (binary_data: true).
        return [bytes(v).decode("utf-8", "replace") for v in flat]
    if datatype in ("FP16", "BF16"):
        flat = flat.astype(np.float32)
    return flat.tolist()


def metadata_document(reply: oip.ModelMetadataResponse) -> dict:
    return {
        "name": reply.name,
        "versions": list(reply.versions),
        "platform": reply.platform,
        "inputs": [_tensor_metadata(t) for t in reply.inputs],
        "outputs": [_tensor_metadata(t) for t in reply.outputs],
    }


def _tensor_metadata(tensor) -> dict:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def plain(message) -> dict:
    """A message as JSON the way Triton's HTTP endpoint writes it: proto field names, 64-bit
    integers as numbers (protobuf's JSON mapping would write them as strings)."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _numbers(message.DESCRIPTOR, document)
    return document


_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _numbers(descriptor, document: dict) -> None:
    for field in descriptor.fields:
        value = document.get(field.name)
        if value is None:
            continue
        if field.type in _INT64_TYPES:
            is_list = isinstance(value, list)
            document[field.name] = [int(v) for v in value] if is_list else int(value)
        elif field.message_type is not None:
            inner = field.message_type
            if inner.GetOptions().map_entry:
                value_field = inner.fields_by_name["value"]
                for key, item in value.items():
                    if value_field.type in _INT64_TYPES:
                        value[key] = int(item)
                    elif value_field.message_type is not None:
                        _numbers(value_field.message_type, item)
            elif inner.full_name.startswith("google.protobuf."):
                continue
            else:
                for item in value if isinstance(value, list) else (value,):
                    _numbers(inner, item)
