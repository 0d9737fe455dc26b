"""Merge Open Inference Protocol requests on the batch dimension, and split the answer back.

The gateway's dynamic batcher (gateway/dataplane/layers/batching/batcher.py) concatenates
compatible requests along the
first dimension of every input into one backend call, then slices every output of the answer back
into one response per request. The slices are byte-identical to what the backend would have
answered each request alone, provided the model treats batch rows independently (what a batching
model promises) and every output has the batch as first dimension (checked: an output that does
not is an error, never a guess).

Layout reminders (adapters/codecs/oip.py): raw contents are little-endian bytes, one buffer per
tensor; BYTES elements each carry a 4-byte little-endian length prefix, so concatenating BYTES
buffers concatenates their elements; typed contents are repeated fields in row-major order;
FP16 / BF16 travel raw only.

Requests reaching these functions have passed the structure check
(gateway/dataplane/layers/validation.check_structure): shapes agree with the bytes or elements sent.
"""

from __future__ import annotations

import math
import struct

import grpc
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs.oip import CONTENTS_FIELD, NUMPY_DTYPE
from gateway.errors import GatewayError, shown

# Bytes per element of each fixed-size datatype (BYTES is absent: its elements vary in size).
_ELEMENT_SIZE: dict[str, int] = {
    name: dtype.itemsize for name, dtype in NUMPY_DTYPE.items() if name != "BYTES"
}

# Requests of a stateful (sequence) model must reach it one by one and in order; merging two of
# them would feed one sequence's state with another's rows (or one sequence twice in one step).
_SEQUENCE_PARAMETERS = frozenset(("sequence_id", "sequence_start", "sequence_end"))

_read_u32 = struct.Struct("<I").unpack_from


def _parameters_key(parameters) -> tuple:
    """A hashable, order-independent form of a `parameters` map. Most requests carry none:
    the empty case costs one truth test."""
    if not parameters:
        return ()
    return tuple(sorted((k, v.SerializeToString()) for k, v in parameters.items()))


def batch_key(request: oip.ModelInferRequest):
    """What two requests must share to be merged into one batch, as a hashable value; None when
    this request cannot be batched at all (it must go to the backend alone).

    Compatible requests have the same input names (in order), datatypes, non-batch dimensions
    and input parameters, the same content kind (raw or typed), the same requested outputs (names
    and parameters) and the same request parameters. Model name and version are not part of the
    key: one batcher serves one variant, and the batch goes to that variant's model.

    Unbatchable: no inputs; an input without a first dimension; inputs disagreeing on the batch
    size; a batch size of 0 (a backend refuses it alone, so it must not hide inside a batch);
    raw contents not one per input; FP16 / BF16 typed contents (not valid OIP); sequence
    parameters. Runs on every call: a tuple per input, nothing else.
    """
    inputs = request.inputs
    if not inputs:
        return None
    params = request.parameters
    if params and not _SEQUENCE_PARAMETERS.isdisjoint(params):
        return None
    raw = request.raw_input_contents
    is_raw = bool(raw)
    if is_raw and len(raw) != len(inputs):
        return None
    batch = None
    tensors = []
    for tensor in inputs:
        shape = tensor.shape
        if not shape:
            return None
        if batch is None:
            batch = shape[0]
            if batch < 1:
                return None
        elif shape[0] != batch:
            return None
        datatype = tensor.datatype
        if not is_raw and datatype not in CONTENTS_FIELD:
            return None
        tensors.append(
            (tensor.name, datatype, tuple(shape[1:]), _parameters_key(tensor.parameters))
        )
    outputs = tuple((o.name, _parameters_key(o.parameters)) for o in request.outputs)
    return (is_raw, tuple(tensors), outputs, _parameters_key(params))


def batch_size(request: oip.ModelInferRequest) -> int:
    """The batch size (first dimension of the first input) of a request `batch_key` accepted."""
    return request.inputs[0].shape[0]


def merge(
    requests: list[oip.ModelInferRequest],
) -> tuple[oip.ModelInferRequest, list[int]]:
    """One request carrying all of `requests` (which share one `batch_key`) stacked on the batch
    dimension, and each request's batch size in order (what `split` needs).

    Model name and version, request parameters, input parameters and requested outputs come from
    the first request (the key makes them equal); the id is left empty (each caller's id goes
    back on its own slice). The callers' requests are not edited.
    """
    first = requests[0]
    sizes = [r.inputs[0].shape[0] for r in requests]
    total = sum(sizes)
    merged = oip.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    if first.parameters:
        merged.parameters.MergeFrom(first.parameters)
    if first.outputs:
        merged.outputs.extend(first.outputs)
    raw = bool(first.raw_input_contents)
    for index, tensor in enumerate(first.inputs):
        # A copy of the first request's tensor carries its name, datatype, non-batch dims,
        # parameters and (typed) its own rows already; only the batch dim and the other
        # requests' rows are added.
        merged_tensor = merged.inputs.add()
        merged_tensor.CopyFrom(tensor)
        merged_tensor.shape[0] = total
        if raw:
            merged.raw_input_contents.append(
                b"".join(r.raw_input_contents[index] for r in requests)
            )
            continue
        field = getattr(merged_tensor.contents, CONTENTS_FIELD[tensor.datatype])
        for other in requests[1:]:
            values = getattr(other.inputs[index].contents, CONTENTS_FIELD[tensor.datatype])
            if values:  # extending, even by nothing, would mark `contents` as present
                field.extend(values)
    return merged, sizes


def _internal(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INTERNAL, message)


def _bytes_end(buffer: bytes, offset: int, count: int, name: str) -> int:
    """The offset just past `count` length-prefixed BYTES elements starting at `offset`."""
    end = len(buffer)
    for _ in range(count):
        if offset + 4 > end:
            raise _internal(f"backend answered output {shown(name)} with truncated BYTES data")
        offset += 4 + _read_u32(buffer, offset)[0]
    if offset > end:
        raise _internal(f"backend answered output {shown(name)} with truncated BYTES data")
    return offset


def split(
    response: oip.ModelInferResponse,
    sizes: list[int],
    ids: list[str] | None = None,
) -> list[oip.ModelInferResponse]:
    """Slice `response` (the answer to `merge`'s request) back into one response per request:
    every output cut on its first dimension by `sizes`. Model name, version and parameters are
    kept on every part; part k's id is ids[k] (default: the response's id).

    Raises GatewayError INTERNAL when an output's first dimension is not the batch total (an
    output without a batch dimension cannot be shared out) or its data does not match its shape.
    """
    total = sum(sizes)
    count = len(sizes)
    parts = [
        oip.ModelInferResponse(
            model_name=response.model_name,
            model_version=response.model_version,
            id=response.id if ids is None else ids[k],
        )
        for k in range(count)
    ]
    if response.parameters:
        for part in parts:
            part.parameters.MergeFrom(response.parameters)
    outputs = response.outputs
    raw = response.raw_output_contents
    if raw and len(raw) != len(outputs):
        raise _internal(
            f"backend answered {len(outputs)} outputs with {len(raw)} raw_output_contents"
        )
    for index, tensor in enumerate(outputs):
        name = tensor.name
        shape = tensor.shape
        if not shape or shape[0] != total:
            first = shape[0] if shape else "none (a scalar)"
            raise _internal(
                f"backend answered output {shown(name)} with first dimension {first} for a "
                f"batch of {total}: only outputs with the batch as first dimension can be batched"
            )
        row = math.prod(shape[1:])  # elements per batch row
        rest = shape[1:]
        datatype = tensor.datatype
        part_tensors = [
            part.outputs.add(name=name, datatype=datatype, shape=[n, *rest])
            for part, n in zip(parts, sizes, strict=True)
        ]
        if tensor.parameters:
            for part_tensor in part_tensors:
                part_tensor.parameters.MergeFrom(tensor.parameters)
        if raw:
            _split_raw(raw[index], tensor.datatype, row, sizes, parts, name)
        elif tensor.HasField("contents"):
            _split_contents(tensor.contents, row, sizes, part_tensors, name)
        elif row and total:
            raise _internal(f"backend answered output {shown(name)} without data")
    return parts


def _split_raw(buffer: bytes, datatype: str, row: int, sizes, parts, name: str) -> None:
    size = _ELEMENT_SIZE.get(datatype)
    offset = 0
    if size is not None:
        row_bytes = row * size
        if len(buffer) != row_bytes * sum(sizes):
            raise _internal(
                f"backend answered output {shown(name)} with {len(buffer)} bytes, which does not "
                f"match its shape"
            )
        for part, n in zip(parts, sizes, strict=True):
            end = offset + n * row_bytes
            part.raw_output_contents.append(buffer[offset:end])
            offset = end
        return
    for part, n in zip(parts, sizes, strict=True):
        end = _bytes_end(buffer, offset, n * row, name)
        part.raw_output_contents.append(buffer[offset:end])
        offset = end
    if offset != len(buffer):
        raise _internal(f"backend answered output {shown(name)} with more BYTES than its shape")


def _split_contents(contents, row: int, sizes, part_tensors, name: str) -> None:
    total = sum(sizes)
    for descriptor, values in contents.ListFields():
        if len(values) != row * total:
            raise _internal(
                f"backend answered output {shown(name)} with {len(values)} elements in "
                f"contents.{descriptor.name}, which does not match its shape"
            )
        offset = 0
        for part_tensor, n in zip(part_tensors, sizes, strict=True):
            end = offset + n * row
            if end > offset:
                getattr(part_tensor.contents, descriptor.name).extend(values[offset:end])
            offset = end
    for part_tensor in part_tensors:
        # The merged answer carried `contents`: so would each answer alone, rows or not.
        part_tensor.contents.SetInParent()
