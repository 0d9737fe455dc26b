"""Which Open Inference Protocol parameters each kind of backend is sent: an allowlist.

A caller's `parameters` (on the request, on an input, on a requested output) travel to the
backend with the gateway's identity. Some would make the gateway a confused deputy: Triton's
`shared_memory_region` (with `shared_memory_byte_size` and `shared_memory_offset`) reads inputs
from, or writes outputs into, a memory region some other client registered with that Triton.
Others the gateway cannot honour remotely (`binary_data*` belong to Triton's HTTP protocol).
So nothing passes unless the backend's table below names it, with the value types it accepts;
everything else is refused with INVALID_ARGUMENT before any backend call.

Each adapter holds its table (`adapter.parameters`); request validation only applies it, and never
names a backend field itself. Tables follow what the backend honours over the protocol the adapter
speaks (any Open Inference Protocol server: none, the protocol defines no parameter; Triton 2.51
gRPC: src/grpc/infer_handler.cc SetInferenceRequestMetadata and ParseClassificationParams;
docs/protocol/extension_sequence.md, extension_schedule_policy.md, extension_classification.md),
and what the adapter itself forwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2 as oip

from adapters.codecs.oip import data_fields
from gateway.errors import invalid, shown

# The InferParameter oneof, in the order messages list them.
KINDS = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


@dataclass(frozen=True, slots=True)
class Rule:
    """One accepted parameter: its value kinds, the smallest integer value the backend takes
    (None = any), and for a requested output's parameter the output datatypes it may be used with
    (None = any; checked against the model's description by `check_output_datatypes`)."""

    kinds: tuple[str, ...]
    minimum: int | None = None
    datatypes: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ParameterRules:
    """The parameters one backend kind is sent, per place; anything not listed is refused. Also
    what else about a request's form the backend insists on."""

    backend: str  # the backend kind, for messages ("Triton")
    request: Mapping[str, Rule] = field(default_factory=dict)
    inputs: Mapping[str, Rule] = field(default_factory=dict)
    outputs: Mapping[str, Rule] = field(default_factory=dict)
    # Every input must carry data (typed contents, empty or not, or its raw_input_contents
    # entry), even one whose shape has no elements.
    data_required: bool = False


_SHARED_MEMORY = frozenset(
    {"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"}
)
_HTTP_ONLY = frozenset({"binary_data", "binary_data_size", "binary_data_output"})
# The output datatypes Triton 2.51 can classify (src/classification.cc TopkClassifications).
# Classifying a BYTES output crashes tritonserver 2.51 outright (its element count divides the
# output's byte size by the datatype's size, 0 for BYTES: the process dies and every model on it
# is gone, measured with demo_identity's OUTPUT1); BOOL, FP16 and BF16 are refused by Triton.
CLASSIFIABLE = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"}
)

TRITON = ParameterRules(
    "Triton",
    request={
        # extension_sequence: 0 / "" = not part of a sequence (Triton also reads int64 only).
        "sequence_id": Rule(("int64_param", "string_param")),
        "sequence_start": Rule(("bool_param",)),
        "sequence_end": Rule(("bool_param",)),
        # extension_schedule_policy: Triton refuses a negative int64 priority.
        "priority": Rule(("int64_param", "uint64_param"), minimum=0),
        "timeout": Rule(("int64_param",)),  # microseconds
    },
    # Over gRPC Triton reads only shared-memory parameters on inputs: nothing passes.
    inputs={},
    # extension_classification: top-n classes instead of the tensor; n must be > 0.
    # Only on outputs of a numeric datatype (CLASSIFIABLE).
    outputs={"classification": Rule(("int64_param",), minimum=1, datatypes=CLASSIFIABLE)},
    # Triton 2.51 answers "unable to find data for input tensor" for an input of shape [0] that
    # has neither contents nor a raw entry (src/grpc/infer_handler.cc InferGRPCToInput).
    data_required=True,
)
# In a ModelStreamInfer stream Triton also reads whether a decoupled model should send an
# empty final response (extension: decoupled models).
TRITON_STREAM = dataclasses.replace(
    TRITON,
    request={**TRITON.request, "triton_enable_empty_final_response": Rule(("bool_param",))},
)
# Any other Open Inference Protocol server (BACKEND_KIND_OIP): the protocol defines the parameter
# maps but no parameter in them, and what a server does with one is its own (KServe 0.21 hands
# every request, input and output parameter to the model's code unread, with no error: a typo or a
# Triton-only name such as `priority` would be silently ignored, or worse, read by model code the
# gateway knows nothing of). Nothing passes. Servers do not need data for an input with no
# elements (KServe answers shape [0] without contents).
OIP = ParameterRules("OIP server")
# The TF Serving adapter builds a PredictRequest from inputs and requested output names only, and
# the TorchServe adapter a JSON body from inputs, id and output names: neither forwards any
# parameter, so a caller's parameter would be silently ignored. Refused instead.
TFSERVING = ParameterRules("TF Serving")
TORCHSERVE = ParameterRules("TorchServe")


def _why(name: str) -> str:
    if name in _SHARED_MEMORY:
        return (
            "shared-memory regions are registered by the backend's own clients, and the gateway "
            "never lets a caller name one"
        )
    if name in _HTTP_ONLY:
        return "binary data parameters belong to the HTTP protocol, not gRPC"
    return "not on the gateway's allowlist"


def _check(where: str, params, rules: Mapping[str, Rule], backend: str) -> None:
    for name, value in params.items():
        rule = rules.get(name)
        if rule is None:
            accepted = ", ".join(sorted(rules)) or "none"
            raise invalid(
                f"{where}: parameter {shown(name)} is not accepted: {_why(name)} "
                f"({backend} accepts here: {accepted})"
            )
        kind = value.WhichOneof("parameter_choice")
        if kind not in rule.kinds:
            raise invalid(
                f"{where}: parameter {shown(name)} must be {' or '.join(rule.kinds)}, "
                f"got {kind or 'no value'}"
            )
        if rule.minimum is not None and getattr(value, kind) < rule.minimum:
            raise invalid(
                f"{where}: parameter {shown(name)} must be >= {rule.minimum}, "
                f"got {getattr(value, kind)}"
            )


def check_parameters(request: oip.ModelInferRequest, rules: ParameterRules) -> None:
    """Raise INVALID_ARGUMENT for the first parameter `rules` does not accept, naming it and
    where it was (request, input 'x', output 'y'). Costs one emptiness test per place when the
    request carries no parameters, the common case."""
    if request.parameters:
        _check("request", request.parameters, rules.request, rules.backend)
    for tensor in request.inputs:
        if tensor.parameters:
            _check(f"input {shown(tensor.name)}", tensor.parameters, rules.inputs, rules.backend)
    for tensor in request.outputs:
        if tensor.parameters:
            _check(f"output {shown(tensor.name)}", tensor.parameters, rules.outputs, rules.backend)


def check_output_datatypes(
    request: oip.ModelInferRequest,
    rules: ParameterRules,
    model: str,
    datatypes: Mapping[str, str] | None,
) -> None:
    """Raise INVALID_ARGUMENT for a requested output whose parameter needs a datatype the output
    does not have. `datatypes`: the model's output names (as the caller names them) -> datatype,
    from its description; None when the description does not list outputs, and then such a
    parameter is refused too, since what it would do to the backend cannot be known. Run after
    `check_parameters` (the parameter itself is allowed)."""
    for tensor in request.outputs:
        if not tensor.parameters:
            continue
        for name in tensor.parameters:
            rule = rules.outputs.get(name)
            if rule is None or rule.datatypes is None:
                continue
            accepted = ", ".join(sorted(rule.datatypes))
            where = f"output {shown(tensor.name)}: parameter {shown(name)}"
            datatype = None if datatypes is None else datatypes.get(tensor.name)
            if datatype is None:
                raise invalid(
                    f"{where} needs an output of datatype {accepted}, and the description of "
                    f"model {shown(model)} does not give this output's datatype"
                )
            if datatype not in rule.datatypes:
                raise invalid(
                    f"{where} needs an output of datatype {accepted}; model {shown(model)}'s "
                    f"output {shown(tensor.name)} is {datatype}"
                )


def check_data_present(request: oip.ModelInferRequest, backend: str) -> None:
    """For backends that need data for every input (ParameterRules.data_required): refuse an
    input sent with neither typed contents nor raw_input_contents. check_structure lets that
    through only for a shape with no elements."""
    for tensor in request.inputs:
        if not tensor.HasField("contents"):
            how = data_fields(tensor.datatype)
            shape = "[" + ",".join(map(str, tensor.shape)) + "]"
            raise invalid(
                f"input {shown(tensor.name)} has no data: {backend} needs {how} even for shape "
                f"{shape}, which has no elements (send them empty)"
            )
