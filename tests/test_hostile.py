"""Hostile input against a REAL gateway in front of a REAL Triton, bounded in time.

Random bytes, truncated and bit-flipped requests, and hypothesis-built ModelInferRequests (most of
them valid but for one field: those are the ones that could slip past the gateway), metadata
requests and admin API messages. The gateway's backend address is a recording pass-through
(tests/recording_proxy.py), so the test sees every ModelInfer that reached Triton and Triton's
answer to it. Asserted throughout:

1. the gateway never answers UNKNOWN or INTERNAL, whatever the RPC;
2. every ModelInfer that reached Triton was answered OK by Triton: a request the backend refuses
   is one the gateway should have refused itself (README: "What the gateway checks before any
   backend sees a request");
3. the gateway's RSS after the run stays within 150 MB of its RSS after warm-up;
4. hostile admin calls leave the route table as it was unless they returned OK (each call is
   checked against the table read before and after it), the final table validates, and the
   gateway still answers a good request correctly.

Hypothesis runs derandomized with a fixed number of examples, so a run is reproducible and
takes about the same time every time.
"""

from __future__ import annotations

import collections
import math
import random
import struct

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2, text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from adapters import parameters
from adapters.parameters import check_output_datatypes
from gateway.controlplane.config import from_dict, validate
from gateway.errors import GatewayError
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tensorgate.config.v1 import config_pb2
from tests.gateway_process import ADMIN_TOKEN, READ_TOKEN, GatewayProcess, triton_backend
from tests.oip import Y_V1, Y_V2, linear_request, output
from tests.recording_proxy import UNLIMITED, RecordingProxy
from tests.test_hardening import rss_mb

BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
RSS_GROWTH_MB = 150
TIMEOUT_S = 10

CONFIG_ROUTES = [
    {
        "model": "linear",  # demo_linear: FP32 [-1,4] -> [-1,3], max_batch_size 64
        "variants": [
            {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear",
             "backend_version": "1", "version": "1", "weight": 90},
            {"name": "canary", "backend": "triton-a", "backend_model": "demo_linear",
             "backend_version": "2", "version": "2", "weight": 10},
            {"name": "shadow", "backend": "triton-a", "backend_model": "demo_linear",
             "backend_version": "1", "weight": 0},
        ],
    },
    {   # demo_identity: INT32 INPUT0 [-1], optional BYTES INPUT1 [-1]; no batching
        "model": "identity",
        "variants": [{"name": "only", "backend": "triton-a", "backend_model": "demo_identity",
                      "weight": 1}],
    },
    {   # public names x -> INPUT0, y -> OUTPUT0
        "model": "renamed",
        "variants": [{"name": "only", "backend": "triton-a", "backend_model": "demo_linear",
                      "backend_version": "1", "weight": 1,
                      "input_names": {"x": "INPUT0"}, "output_names": {"y": "OUTPUT0"}}],
    },
]  # fmt: skip

HOSTILE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(triton):
    recorder = RecordingProxy(triton.address)
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def gateway(proxy):
    config = {"backends": [triton_backend(proxy.address)], "routes": CONFIG_ROUTES}
    with GatewayProcess(config, admin=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.address, options=UNLIMITED) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def admin(gateway):
    with grpc.insecure_channel(gateway.admin_address, options=UNLIMITED) as ch:
        yield admin_pb2_grpc.AdminServiceStub(ch)


@pytest.fixture(scope="module")
def warm(gateway, stub):
    """Warm-up (connections, caches of every route's model description, some rejections), then
    the RSS baseline that test_rss_bounded_and_still_serving compares with."""
    for _ in range(100):
        for model in ("linear", "renamed"):
            request = linear_request(model)
            if model == "renamed":
                request.inputs[0].name = "x"
            stub.ModelInfer(request, timeout=TIMEOUT_S)
        stub.ModelInfer(_identity(), timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(linear_request("nope"), timeout=TIMEOUT_S)
    return rss_mb(gateway.proc.pid)


# -- what every call must satisfy -----------------------------------------------------------------

STATS: collections.Counter = collections.Counter()


def _brief(message) -> str:
    if isinstance(message, bytes):
        text = repr(message)
    else:
        text = text_format.MessageToString(message, as_one_line=True)
    return text if len(text) < 600 else text[:600] + f"...({len(text)} chars)"


def _code(call, request, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=TIMEOUT_S, **kwargs)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _check_answer(
    what: str, code: grpc.StatusCode, details: str, request, *, short: bool = True
) -> None:
    STATS[f"{what} {code.name}"] += 1
    assert code not in BAD_CODES, f"{what} -> {code.name}: {details[:300]}\n{_brief(request)}"
    if not short:  # the admin API (see test_admin_messages_quote_names_short)
        if len(details) >= 1000:
            STATS[f"{what} long message"] += 1
        return
    # Messages quote caller strings cut short: a hostile name never makes a huge status.
    assert len(details) < 1000, f"{what} -> {code.name}, {len(details)}-char message"


def _check_backend(proxy: RecordingProxy, since: int, request) -> None:
    """Everything forwarded to Triton since `since` was answered OK by Triton."""
    for forwarded, code, details in proxy.outcomes[since:]:
        STATS["reached Triton"] += 1
        assert code == grpc.StatusCode.OK, (
            f"validation gap: Triton answered {code.name} ({details[:300]}) to a request the "
            f"gateway forwarded\nforwarded: {_brief(forwarded)}\nsent: {_brief(request)}"
        )


def _infer(stub, proxy, request) -> grpc.StatusCode:
    since = len(proxy.outcomes)
    code, details = _code(stub.ModelInfer, request)
    _check_answer("ModelInfer", code, details, request)
    _check_backend(proxy, since, request)
    return code


# -- building blocks of hostile requests ----------------------------------------------------------

OIP_TYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
)  # fmt: skip
BAD_TYPES = (
    "",
    "fp32",
    "FLOAT",
    "TYPE_FP32",
    "FP128",
    "STRING",
    "FP32\x00",
    "\uff26\uff3032",
    "INT32 ",
)
SIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
        "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}  # fmt: skip
FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
         "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
         "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
         "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}  # fmt: skip
CONTENT_FIELDS = tuple(sorted(set(FIELD.values())))
PARAMETER_NAMES = (
    "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "classification",
    "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "binary_data",
    "binary_data_size", "binary_data_output", "max_tokens", "", "priority\x00", "Priority",
)  # fmt: skip
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)


# Over the gateway's name bounds (256 bytes; 64 for versions), in 1- to 4-byte UTF-8 characters.
HUGE = st.builds(
    lambda char, n: char * n, st.sampled_from("mé𝄞\x00"), st.sampled_from([257, 4097, 100_000])
)


def names(*known: str):
    """Known names most of the time; else empty, unicode, huge, or a near miss."""
    near = [k + "\x00" for k in known] + [k.lower() for k in known] + [k + " " for k in known]
    return st.one_of(
        st.sampled_from(known),
        st.sampled_from(known),
        st.just(""),
        st.text(max_size=12),
        HUGE,
        st.sampled_from(near),
    )


VERSIONS = st.one_of(
    st.sampled_from(["", "1", "2", "3", "0", "-1", "latest", "1\x00", "\uff10"]),
    st.text(max_size=8),
    HUGE,
)


def _value(draw) -> oip.InferParameter:
    kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "none"]))
    if kind == "bool":
        return oip.InferParameter(bool_param=draw(st.booleans()))
    if kind == "int64":
        return oip.InferParameter(int64_param=draw(INT64 | st.integers(-2, 100)))
    if kind == "string":
        return oip.InferParameter(string_param=draw(st.text(max_size=16)))
    if kind == "double":
        return oip.InferParameter(double_param=draw(st.floats()))
    if kind == "uint64":
        return oip.InferParameter(uint64_param=draw(UINT64 | st.integers(0, 100)))
    return oip.InferParameter()


def _valid_value(draw, name: str) -> oip.InferParameter:
    """A value Triton's allowlist entry `name` accepts."""
    if name == "sequence_id":
        if draw(st.booleans()):
            return oip.InferParameter(int64_param=draw(st.integers(0, 2**63 - 1)))
        return oip.InferParameter(string_param=draw(st.text(max_size=16)))
    if name in ("sequence_start", "sequence_end"):
        return oip.InferParameter(bool_param=draw(st.booleans()))
    if name == "priority":
        if draw(st.booleans()):
            return oip.InferParameter(int64_param=draw(st.integers(0, 2**63 - 1)))
        return oip.InferParameter(uint64_param=draw(UINT64))
    if name == "timeout":
        return oip.InferParameter(int64_param=draw(INT64))
    return oip.InferParameter(int64_param=draw(st.integers(1, 2**63 - 1)))  # classification


def _put_data(draw, request, tensor, raw: bool, content: bytes | list) -> None:
    """Data for `tensor` (bytes for fixed-size types, a list of bytes for BYTES) as
    raw_input_contents or typed contents."""
    if tensor.datatype == "BYTES":
        if raw:
            request.raw_input_contents.append(
                b"".join(struct.pack("<I", len(e)) + e for e in content)
            )
        else:
            tensor.contents.bytes_contents.extend(content)
        return
    if raw or tensor.datatype not in FIELD:
        request.raw_input_contents.append(content)
        return
    dtype = {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
        "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
        "INT64": np.int64, "FP32": np.float32, "FP64": np.float64,
    }[tensor.datatype]  # fmt: skip
    values = np.frombuffer(content, dtype).tolist()
    getattr(tensor.contents, FIELD[tensor.datatype]).extend(values)


def _data(draw, datatype: str, elements: int) -> bytes | list:
    if datatype == "BYTES":
        return draw(st.lists(st.binary(max_size=8), min_size=elements, max_size=elements))
    size = SIZE.get(datatype, 4) * elements
    if datatype == "BOOL":
        return bytes(draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def valid_requests(draw) -> oip.ModelInferRequest:
    """A request the gateway should forward and Triton answer OK."""
    model = draw(st.sampled_from(["linear", "linear", "identity", "identity", "renamed"]))
    request = oip.ModelInferRequest(model_name=model)
    raw = draw(st.booleans())
    if model == "linear":
        request.model_version = draw(st.sampled_from(["", "", "1", "2"]))
    if model in ("linear", "renamed"):
        batch = draw(st.integers(1, 4) | st.sampled_from([1, 64]))
        tensor = request.inputs.add(
            name="x" if model == "renamed" else "INPUT0", datatype="FP32", shape=[batch, 4]
        )
        _put_data(draw, request, tensor, raw, _data(draw, "FP32", batch * 4))
        outputs = ["y" if model == "renamed" else "OUTPUT0"]
    else:
        size = draw(st.integers(0, 6))
        tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[size])
        _put_data(draw, request, tensor, raw, _data(draw, "INT32", size))
        if draw(st.booleans()):
            size = draw(st.integers(0, 4))
            tensor = request.inputs.add(name="INPUT1", datatype="BYTES", shape=[size])
            _put_data(draw, request, tensor, raw, _data(draw, "BYTES", size))
        outputs = ["OUTPUT0", "OUTPUT1"]
    for name in draw(st.lists(st.sampled_from(outputs), unique=True, max_size=len(outputs))):
        requested = request.outputs.add(name=name)
        if draw(st.integers(0, 4)) == 0:
            requested.parameters["classification"].CopyFrom(_valid_value(draw, "classification"))
    for name in draw(
        st.lists(
            st.sampled_from(
                ["sequence_id", "sequence_start", "sequence_end", "priority", "timeout"]
            ),
            unique=True,
            max_size=2,
        )
    ):
        request.parameters[name].CopyFrom(_valid_value(draw, name))
    if draw(st.booleans()):
        request.id = draw(st.text(max_size=24))
    return request


# Each mutation changes one thing about a request; `index` picks an input or output.


def _pick(draw, items) -> int | None:
    return draw(st.integers(0, len(items) - 1)) if len(items) else None


def m_model(draw, r):
    r.model_name = draw(names("linear", "identity", "renamed", "demo_linear"))


def m_version(draw, r):
    r.model_version = draw(VERSIONS)


def m_id(draw, r):
    r.id = draw(st.text(max_size=300) | HUGE)


def m_input_name(draw, r):
    i = _pick(draw, r.inputs)
    if i is not None:
        r.inputs[i].name = draw(names("INPUT0", "INPUT1", "x", "OUTPUT0"))


def m_datatype(draw, r):
    i = _pick(draw, r.inputs)
    if i is not None:
        r.inputs[i].datatype = draw(st.sampled_from(OIP_TYPES + BAD_TYPES))


def m_shape(draw, r):
    i = _pick(draw, r.inputs)
    if i is None:
        return
    shape = list(r.inputs[i].shape)
    how = draw(st.sampled_from(["set", "append", "pop", "clear", "prepend"]))
    dim = draw(
        st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 63, 64, 65, -(2**63), 2**63 - 1, 2**31, 2**32])
        | INT64
    )
    if how == "set" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = dim
    elif how == "append":
        shape.append(dim)
    elif how == "prepend":
        shape.insert(0, dim)
    elif how == "pop" and shape:
        shape.pop()
    elif how == "clear":
        shape = []
    del r.inputs[i].shape[:]
    r.inputs[i].shape.extend(shape)


def m_reshape(draw, r):
    """A new shape (zeros and batch sizes around the limits included) with data that matches it:
    this gets past the structural checks, so the model description has to catch it."""
    i = _pick(draw, r.inputs)
    if i is None:
        return
    tensor = r.inputs[i]
    shape = draw(
        st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 64, 65]) | st.integers(0, 8), max_size=4)
    )
    elements = math.prod(shape)
    if elements > 4096:
        return
    del tensor.shape[:]
    tensor.shape.extend(shape)
    raw = bool(r.raw_input_contents)
    data = _data(draw, tensor.datatype, elements)
    tensor.ClearField("contents")
    if raw:
        rest = list(r.raw_input_contents)
        del r.raw_input_contents[:]
        scratch = oip.ModelInferRequest()
        _put_data(draw, scratch, tensor, True, data)
        if i < len(rest):
            rest[i] = scratch.raw_input_contents[0]
        r.raw_input_contents.extend(rest)
    else:
        _put_data(draw, r, tensor, False, data)


def m_raw(draw, r):
    how = draw(st.sampled_from(["shorter", "longer", "drop", "extra", "random", "empty", "add"]))
    raw = r.raw_input_contents
    if how == "add" or not raw:  # raw contents alongside typed contents
        raw.append(draw(st.binary(max_size=64)))
        return
    i = draw(st.integers(0, len(raw) - 1))
    if how == "shorter":
        raw[i] = raw[i][: -draw(st.integers(1, 8))]
    elif how == "longer":
        raw[i] = raw[i] + draw(st.binary(min_size=1, max_size=8))
    elif how == "drop":
        del raw[i]
    elif how == "extra":
        raw.append(draw(st.binary(max_size=64)))
    elif how == "random":
        raw[i] = draw(st.binary(max_size=64))
    else:
        raw[i] = b""


def m_contents(draw, r):
    i = _pick(draw, r.inputs)
    if i is None:
        return
    contents = r.inputs[i].contents
    how = draw(st.sampled_from(["other field", "one more", "one less", "empty", "second field"]))
    field = draw(st.sampled_from(CONTENT_FIELDS))
    values = {
        "bool_contents": st.booleans(),
        "int_contents": st.integers(-(2**31), 2**31 - 1),
        "int64_contents": INT64,
        "uint_contents": st.integers(0, 2**32 - 1),
        "uint64_contents": UINT64,
        "fp32_contents": st.floats(width=32),
        "fp64_contents": st.floats(),
        "bytes_contents": st.binary(max_size=8),
    }[field]
    present = [d.name for d, v in contents.ListFields() if len(v)]
    if how == "other field" and present:
        n = len(getattr(contents, present[0]))
        contents.ClearField(present[0])
        getattr(contents, field).extend(draw(st.lists(values, min_size=n, max_size=n)))
    elif how == "one more" and present:
        getattr(contents, present[0]).append(getattr(contents, present[0])[0])
    elif how == "one less" and present:
        del getattr(contents, present[0])[-1]
    elif how == "empty":
        contents.Clear()
        contents.SetInParent()
    else:
        getattr(contents, field).extend(draw(st.lists(values, min_size=1, max_size=4)))


def m_parameter(draw, r):
    places = ["request"] + [f"input {i}" for i in range(len(r.inputs))]
    places += [f"output {i}" for i in range(len(r.outputs))] + ["new output"]
    place = draw(st.sampled_from(places))
    if place == "request":
        params = r.parameters
    elif place.startswith("input"):
        params = r.inputs[int(place.split()[1])].parameters
    elif place.startswith("output"):
        params = r.outputs[int(place.split()[1])].parameters
    else:
        params = r.outputs.add(name=draw(names("OUTPUT0", "OUTPUT1", "y"))).parameters
    name = draw(st.sampled_from(PARAMETER_NAMES) | st.text(max_size=10))
    if draw(st.booleans()) and name in ("sequence_id", "priority", "timeout", "classification"):
        value = _valid_value(draw, name)  # a valid value in a place it does not belong
    else:
        value = _value(draw)
    params[name].CopyFrom(value)


def m_output(draw, r):
    how = draw(st.sampled_from(["new", "duplicate", "rename"]))
    if how == "duplicate" and r.outputs:
        r.outputs.add().CopyFrom(r.outputs[0])
    elif how == "rename" and r.outputs:
        r.outputs[0].name = draw(names("OUTPUT0", "OUTPUT1", "y"))
    else:
        r.outputs.add(name=draw(names("OUTPUT0", "OUTPUT1", "y")))


def m_drop_input(draw, r):
    i = _pick(draw, r.inputs)
    if i is None:
        return
    del r.inputs[i]
    if len(r.raw_input_contents) > i:
        del r.raw_input_contents[i]


def m_no_data(draw, r):
    """An input with neither typed contents nor a raw_input_contents entry (all raw entries go,
    since raw contents are all or nothing), whatever its element count."""
    i = _pick(draw, r.inputs)
    if i is None:
        return
    r.inputs[i].ClearField("contents")
    del r.raw_input_contents[:]
    if draw(st.booleans()):
        del r.inputs[i].shape[:]
        r.inputs[i].shape.append(0)


def m_extra_input(draw, r):
    datatype = draw(st.sampled_from(OIP_TYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    tensor = r.inputs.add(name=draw(names("INPUT0", "INPUT1", "x")), datatype=datatype)
    tensor.shape.extend(shape)
    raw = bool(r.raw_input_contents) or datatype in ("FP16", "BF16")
    _put_data(draw, r, tensor, raw, _data(draw, datatype, math.prod(shape)))


MUTATIONS = (
    m_model, m_version, m_id, m_input_name, m_datatype, m_shape, m_reshape, m_reshape, m_raw,
    m_contents, m_parameter, m_parameter, m_output, m_drop_input, m_extra_input, m_no_data,
)  # fmt: skip


@st.composite
def near_valid_requests(draw) -> oip.ModelInferRequest:
    """A valid request with 0 (a few), 1 (most) or 2-3 mutations."""
    request = draw(valid_requests())
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 1, 1, 2, 3]))):
        draw(st.sampled_from(MUTATIONS))(draw, request)
    return request


@st.composite
def wild_requests(draw) -> oip.ModelInferRequest:
    """Every field random: names, datatypes, shapes with any int64, data of any length."""
    request = oip.ModelInferRequest(
        model_name=draw(names("linear", "identity", "renamed")),
        model_version=draw(VERSIONS),
        id=draw(st.text(max_size=8)),
    )
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(names("INPUT0", "INPUT1", "x")),
            datatype=draw(st.sampled_from(OIP_TYPES + BAD_TYPES)),
        )
        tensor.shape.extend(draw(st.lists(INT64 | st.integers(-2, 8), max_size=4)))
        if draw(st.booleans()):
            m_contents(draw, request)
        for _ in range(draw(st.integers(0, 2))):
            tensor.parameters[draw(st.sampled_from(PARAMETER_NAMES))].CopyFrom(_value(draw))
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=48), max_size=3)))
    for _ in range(draw(st.integers(0, 2))):
        m_output(draw, request)
    for _ in range(draw(st.integers(0, 2))):
        m_parameter(draw, request)
    return request


HOSTILE_REQUESTS = st.one_of(near_valid_requests(), near_valid_requests(), wild_requests())


def _identity(values=(1, 2, 3)) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[len(values)])
    request.raw_input_contents.append(np.asarray(values, np.int32).tobytes())
    return request


# -- regressions: what hypothesis found reaching Triton ------------------------------------------


@pytest.fixture(scope="module")
def triton_stub(triton):
    with grpc.insecure_channel(triton.address) as ch:
        yield service_pb2_grpc.GRPCInferenceServiceStub(ch)


def _refused(stub, proxy, request, message: str) -> None:
    since = len(proxy.infers)
    code, details = _code(stub.ModelInfer, request)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert len(proxy.infers) == since, "forwarded to Triton"


def test_classification_only_on_numeric_outputs(stub, proxy, triton_stub):
    """Classifying a BYTES output kills tritonserver 2.51 (every model on it gone): refused
    with the datatypes that can be classified; numeric outputs still pass."""
    request = _identity()
    request.inputs.add(name="INPUT1", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", 1) + b"a")
    request.outputs.add(name="OUTPUT1").parameters["classification"].int64_param = 1
    _refused(
        stub, proxy, request,
        "output 'OUTPUT1': parameter 'classification' needs an output of datatype FP32, FP64, "
        "INT16, INT32, INT64, INT8, UINT16, UINT32, UINT64, UINT8; model 'identity''s output "
        "'OUTPUT1' is BYTES",
    )  # fmt: skip
    since = len(proxy.outcomes)
    request.outputs[0].name = "OUTPUT0"  # INT32
    assert stub.ModelInfer(request, timeout=TIMEOUT_S).outputs[0].datatype == "BYTES"
    renamed = linear_request("renamed")
    renamed.inputs[0].name = "x"
    renamed.outputs.add(name="y").parameters["classification"].int64_param = 2  # FP32, public name
    assert list(stub.ModelInfer(renamed, timeout=TIMEOUT_S).outputs[0].shape) == [1, 2]
    _check_backend(proxy, since, request)
    assert triton_stub.ServerLive(oip.ServerLiveRequest(), timeout=5).live
    # Fail closed: without the outputs' datatypes (a description that lists no outputs), no
    # classification at all.
    with pytest.raises(GatewayError) as err:
        check_output_datatypes(renamed, parameters.TRITON, "renamed", None)
    assert err.value.message.endswith("the description of model 'renamed' does not give this "
                                      "output's datatype")  # fmt: skip


def _field(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_parameters_smuggled_in_corrupt_map_entries_are_refused(stub, proxy, triton_stub):
    """A parameters map entry with an unknown field in it: Python's protobuf keeps the whole entry
    as an unknown field (no parameter to check), Triton's C++ parser reads the parameter. With
    shared_memory_region that was the allowlist bypassed, so the gateway refuses any request with
    fields the protocol does not define, naming where."""
    region = _field(1, b"shared_memory_region") + _field(2, _field(3, b"their-region"))
    size = _field(1, b"shared_memory_byte_size") + _field(2, bytes([2 << 3, 16]))
    junk = bytes([15 << 3, 1])  # field 15, varint 1
    good = linear_request().inputs[0].SerializeToString()
    tensor = good + _field(4, region + junk) + _field(4, size + junk)
    data = np.ones((1, 4), np.float32).tobytes()
    rest = _field(5, tensor) + _field(7, data)
    body = _field(1, b"linear") + rest
    request = oip.ModelInferRequest.FromString(body)
    assert not request.inputs[0].parameters  # what the allowlist would have seen
    _refused(
        stub, proxy, request,
        "input 'INPUT0' has fields the Open Inference Protocol does not define (field number(s) "
        "4, 4; a corrupt parameters entry also shows up this way): refused, since the backend "
        "may read them differently than the gateway",
    )  # fmt: skip
    # What Triton makes of it: the region, not the data sent alongside.
    direct = oip.ModelInferRequest.FromString(_field(1, b"demo_linear") + rest)
    with pytest.raises(grpc.RpcError) as err:
        triton_stub.ModelInfer(direct, timeout=5)
    assert "shared memory region: 'their-region'" in err.value.details()
    # Unknown fields elsewhere: on the request, in a requested output, in a parameter value.
    for where, edit in (
        ("the request", lambda b: b + junk),
        ("output 'OUTPUT0'", lambda b: b + _field(6, _field(1, b"OUTPUT0") + junk)),
        ("request parameter 'priority'", lambda b: b + _field(4, _field(1, b"priority")
                                                           + _field(2, bytes([2 << 3, 1]) + junk))),
    ):  # fmt: skip
        request = oip.ModelInferRequest.FromString(edit(linear_request().SerializeToString()))
        since = len(proxy.infers)
        code, details = _code(stub.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(where), details
        assert len(proxy.infers) == since


def test_an_input_without_data_is_refused_even_with_no_elements(stub, proxy, triton_stub):
    """Triton refuses an input of shape [0] sent with neither contents nor a raw entry; sent
    empty, it answers an empty tensor."""
    request = oip.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[0])
    _refused(
        stub, proxy, request,
        "input 'INPUT0' has no data: Triton needs contents.int_contents or raw_input_contents "
        "even for shape [0], which has no elements (send them empty)",
    )  # fmt: skip
    direct = oip.ModelInferRequest()
    direct.CopyFrom(request)
    direct.model_name = "demo_identity"
    with pytest.raises(grpc.RpcError) as err:
        triton_stub.ModelInfer(direct, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # what the gateway spares it
    assert "unable to find data for input tensor 'INPUT0'" in err.value.details()
    since = len(proxy.outcomes)
    request.inputs[0].contents.SetInParent()  # empty contents
    assert list(stub.ModelInfer(request, timeout=TIMEOUT_S).outputs[0].shape) == [0]
    request.inputs[0].ClearField("contents")
    request.raw_input_contents.append(b"")
    assert list(stub.ModelInfer(request, timeout=TIMEOUT_S).outputs[0].shape) == [0]
    _check_backend(proxy, since, request)


# -- ModelInfer -----------------------------------------------------------------------------------


def test_hypothesis_model_infer(stub, proxy, warm):
    reached = len(proxy.outcomes)

    @settings(HOSTILE, max_examples=900)
    @given(HOSTILE_REQUESTS)
    def run(request):
        _infer(stub, proxy, request)

    run()
    # The bias towards near-valid requests works: a fair share got past the gateway (and Triton
    # answered all of them), and many were refused.
    forwarded = len(proxy.outcomes) - reached
    assert forwarded >= 90, dict(STATS)
    assert STATS["ModelInfer INVALID_ARGUMENT"] >= 300, dict(STATS)


def test_random_bytes_model_infer(channel, proxy, warm):
    rng = random.Random(8)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for _ in range(500):
        body = rng.randbytes(rng.choice([rng.randint(0, 16), rng.randint(0, 300)]))
        since = len(proxy.outcomes)
        code, details = _code(call, body)
        _check_answer("ModelInfer (random bytes)", code, details, oip.ModelInferRequest())
        _check_backend(proxy, since, body)


def test_mutated_valid_requests(channel, proxy, warm):
    """Truncated and bit-flipped valid requests: some still decode (into near-valid requests that
    may reach Triton), the rest are INVALID_ARGUMENT."""
    rng = random.Random(9)
    goods = [valid.SerializeToString() for valid in (linear_request(), _identity())]
    with_params = linear_request()
    with_params.parameters["priority"].int64_param = 1
    with_params.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 2
    goods.append(with_params.SerializeToString())
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for n in range(300):
        body = bytearray(goods[n % len(goods)])
        if rng.random() < 0.4:
            body = body[: rng.randint(0, len(body) - 1)]
        else:
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        since = len(proxy.outcomes)
        code, details = _code(call, bytes(body))
        _check_answer("ModelInfer (mutated)", code, details, oip.ModelInferRequest())
        _check_backend(proxy, since, bytes(body))


# -- metadata RPCs --------------------------------------------------------------------------------


def test_hypothesis_metadata_rpcs(stub, proxy, warm):
    rpcs = {
        "ModelMetadata": (stub.ModelMetadata, oip.ModelMetadataRequest),
        "ModelConfig": (stub.ModelConfig, oip.ModelConfigRequest),
        "ModelReady": (stub.ModelReady, oip.ModelReadyRequest),
    }

    @settings(HOSTILE, max_examples=300)
    @given(
        st.sampled_from(sorted(rpcs)),
        names("linear", "identity", "renamed", "demo_linear"),
        VERSIONS,
    )
    def run(rpc, name, version):
        call, message = rpcs[rpc]
        request = message(name=name, version=version)
        code, details = _code(call, request)
        _check_answer(rpc, code, details, request)

    run()


# -- admin ----------------------------------------------------------------------------------------

ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
READ_MD = (("authorization", f"Bearer {READ_TOKEN}"),)
MODELS = names("linear", "identity", "renamed")
VARIANTS = names("stable", "canary", "shadow", "only")
BACKENDS = names("triton-a")
WEIGHTS = (
    st.integers(0, 100) | st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
)
UINT32 = st.integers(0, 2**32 - 1)
DOUBLES = st.floats() | st.floats(0, 1) | st.sampled_from([0.0, 1.0, -0.0, 1e-300])
# "live": the revision read just before the call; others are relative to it or arbitrary.
REVISIONS = st.sampled_from(["0", "0", "live", "live", "live-1", "live+1"]) | UINT64.map(str)


@st.composite
def durations(draw):
    if draw(st.booleans()):
        return None
    seconds = draw(st.integers(0, 3) | INT64)
    nanos = draw(st.integers(0, 999_999_999) | st.integers(-(2**31), 2**31 - 1))
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


@st.composite
def static_tensors(draw):
    tensor = config_pb2.StaticTensor(
        name=draw(names("OUTPUT0", "y")),
        datatype=draw(st.sampled_from(OIP_TYPES + BAD_TYPES)),
        shape=draw(st.lists(st.integers(-2, 4) | INT64, max_size=3)),
    )
    tensor.fp_values.extend(draw(st.lists(st.floats(), max_size=4)))
    tensor.int_values.extend(draw(st.lists(INT64, max_size=4)))
    tensor.bytes_values.extend(draw(st.lists(st.binary(max_size=8), max_size=3)))
    tensor.bool_values.extend(draw(st.lists(st.booleans(), max_size=3)))
    return tensor


@st.composite
def fallback_steps(draw):
    kind = draw(st.sampled_from(["variant", "model", "static_response", "none"]))
    if kind == "variant":
        return config_pb2.FallbackStep(variant=draw(VARIANTS))
    if kind == "model":
        return config_pb2.FallbackStep(model=draw(MODELS))
    if kind == "static_response":
        step = config_pb2.FallbackStep()
        step.static_response.outputs.extend(draw(st.lists(static_tensors(), max_size=2)))
        step.static_response.SetInParent()
        return step
    return config_pb2.FallbackStep()


@st.composite
def admin_calls(draw):
    """(method name, request, expected revision, credentials). Three calls in four are aimed at
    the linear route and its real variants, each name still hostile one time in four, so that
    a fair share of calls is valid and changes the table; the rest are hostile throughout."""
    aimed = draw(st.integers(0, 3)) > 0

    def mostly(valid, hostile):
        return st.one_of(valid, valid, valid, hostile) if aimed else hostile

    models = mostly(st.just("linear"), MODELS)
    variants = mostly(st.sampled_from(["stable", "canary", "shadow"]), VARIANTS)
    method = draw(
        st.sampled_from(
            ["SetVariantWeights"] * 3 + ["SetShadow"] * 2 + ["SetFallback"] * 2
            + ["StartRollout"] * 2 + ["Rollback", "ListRevisions", "GetRollout", "AbortRollout",
               "GetBackendStatus", "DrainBackend", "UndrainBackend", "GetRouteTable"]
        )
    )  # fmt: skip
    revision = draw(mostly(st.sampled_from(["0", "live"]), REVISIONS))
    if method == "SetVariantWeights":
        request = admin_pb2.SetVariantWeightsRequest(
            model=draw(models),
            weights=draw(
                st.dictionaries(
                    variants, mostly(st.integers(0, 100), WEIGHTS), min_size=aimed, max_size=3
                )
            ),
        )
    elif method == "SetShadow":
        request = admin_pb2.SetShadowRequest(model=draw(models))
        if draw(st.integers(0, 5)):
            request.shadow.variant = draw(variants)
            request.shadow.fraction = draw(DOUBLES)
            request.shadow.max_concurrency = draw(UINT32 | st.integers(0, 8))
    elif method == "SetFallback":
        request = admin_pb2.SetFallbackRequest(model=draw(models))
        request.fallback.extend(draw(st.lists(fallback_steps(), max_size=3)))
    elif method == "StartRollout":
        request = admin_pb2.StartRolloutRequest(
            model=draw(models),
            canary=draw(mostly(st.just("canary"), VARIANTS)),
            baseline=draw(mostly(st.just("stable"), VARIANTS)),
            steps=draw(
                st.sampled_from([[], [100], [50, 100], [5, 25, 50, 100], [50, 50, 100], [0, 100]])
                | st.lists(st.integers(0, 101) | UINT32, max_size=5)
            ),
            min_requests=draw(UINT32),
            max_error_ratio_factor=draw(DOUBLES),
            error_ratio_slack=draw(DOUBLES),
            max_p99_factor=draw(DOUBLES),
        )
        for field in ("min_step_duration", "max_step_duration"):
            duration = draw(durations())
            if duration is not None:
                getattr(request, field).CopyFrom(duration)
        revision = "0"
    elif method == "Rollback":
        request = admin_pb2.RollbackRequest(
            to_revision=draw(st.sampled_from([0, 1, 2, 2**64 - 1]) | st.integers(0, 50))
        )
    elif method == "ListRevisions":
        request = admin_pb2.ListRevisionsRequest(limit=draw(UINT32 | st.integers(0, 3)))
    elif method in ("GetRollout", "AbortRollout"):
        request = getattr(admin_pb2, f"{method}Request")(model=draw(models))
        if method == "AbortRollout":
            request.reason = draw(st.text(max_size=20) | HUGE)
    elif method in ("DrainBackend", "UndrainBackend"):
        request = getattr(admin_pb2, f"{method}Request")(
            backend=draw(mostly(st.just("triton-a"), BACKENDS))
        )
    else:
        request = getattr(admin_pb2, f"{method}Request")()
    metadata = draw(st.sampled_from([ADMIN_MD] * 8 + [READ_MD, ()]))
    return method, request, revision, metadata


def _table(admin) -> admin_pb2.GetRouteTableResponse:
    return admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=READ_MD, timeout=5)


def _with_revision(request, revision: str, live: int):
    field = "expected_revision"
    if field not in request.DESCRIPTOR.fields_by_name:
        return request
    number = {"live": live, "live-1": max(live - 1, 0), "live+1": live + 1}.get(revision)
    setattr(request, field, int(revision) if number is None else number)
    return request


def _stop_rollout(admin, model: str) -> None:
    """A rollout that started is aborted at once (its weights restored), so the table stops
    moving by itself before the next call."""
    code, details = _code(
        admin.AbortRollout, admin_pb2.AbortRolloutRequest(model=model), metadata=ADMIN_MD
    )
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION), (code, details)
    rollout = admin.GetRollout(admin_pb2.GetRolloutRequest(model=model), metadata=READ_MD)
    assert rollout.rollout.state != admin_pb2.Rollout.STATE_RUNNING


def test_hypothesis_admin(admin, gateway, warm):
    original = _table(admin)
    changed = collections.Counter()

    @settings(HOSTILE, max_examples=500)
    @given(admin_calls())
    def run(call):
        method, request, revision, metadata = call
        before = _table(admin)
        request = _with_revision(request, revision, before.revision.number)
        code, details = _code(getattr(admin, method), request, metadata=metadata)
        _check_answer(method, code, details, request, short=False)
        if code == grpc.StatusCode.OK and method == "StartRollout":
            _stop_rollout(admin, request.model)
        after = _table(admin)
        if code != grpc.StatusCode.OK or method.startswith(("Get", "List", "Drain", "Undrain")):
            # Refused (or not a table change): the table and its revision are exactly as before.
            assert after == before, f"{method} -> {code.name} changed the table: {details}"
        elif method == "StartRollout":
            # Started and aborted at once: the weights are the ones it started from, whether or
            # not its driver had moved them yet.
            assert list(after.routes) == list(before.routes), method
            changed[method] += 1
        else:
            assert after.revision.number > before.revision.number, method
            changed[method] += 1

    run()
    STATS.update({f"admin change {k}": v for k, v in changed.items()})
    admin.UndrainBackend(admin_pb2.UndrainBackendRequest(backend="triton-a"), metadata=ADMIN_MD)
    final = _table(admin)
    if not changed:
        assert final.routes == original.routes
    # Whatever the accepted calls did, the live table is one the gateway's own config validation
    # accepts with the boot file's backends.
    config = from_dict({"backends": [triton_backend("127.0.0.1:1")], "routes": CONFIG_ROUTES})
    del config.routes[:]
    config.routes.extend(final.routes)
    validate(config, source="final route table")
    # The hostile run did make valid changes too (the strategies are not all rejections).
    assert sum(changed.values()) >= 10, dict(changed)


def test_admin_messages_quote_names_short(admin):
    for size in (4097, 100_000):
        code, details = _code(
            admin.DrainBackend, admin_pb2.DrainBackendRequest(backend="b" * size), metadata=ADMIN_MD
        )
        assert code == grpc.StatusCode.NOT_FOUND and len(details) < 1000, (code, len(details))
    nan = admin_pb2.StartRolloutRequest(
        model="linear", canary="canary", baseline="stable", max_p99_factor=float("nan")
    )
    code, details = _code(admin.StartRollout, nan, metadata=ADMIN_MD)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in details, (code, details)


# -- after the run --------------------------------------------------------------------------------


def test_rss_bounded_and_still_serving(gateway, stub, proxy, warm):
    """Runs last: the gateway's RSS is within RSS_GROWTH_MB of its RSS after warm-up, and a good
    request still gets the right answer from whichever variant the table now picks."""
    rss = rss_mb(gateway.proc.pid)
    print(f"\ngateway RSS: {warm:.0f} MB after warm-up, {rss:.0f} MB after the run")
    print("outcomes:", dict(sorted(STATS.items())))
    assert rss - warm <= RSS_GROWTH_MB, f"RSS {warm:.0f} MB -> {rss:.0f} MB"
    for version, expected in (("", None), ("1", Y_V1), ("2", Y_V2)):
        since = len(proxy.outcomes)
        response, call = stub.ModelInfer.with_call(linear_request(version=version), timeout=10)
        variant = dict(call.trailing_metadata())["x-tensorgate-variant"]
        if expected is None:
            expected = Y_V2 if variant == "canary" else Y_V1
        assert output(response) == pytest.approx(expected), (version, variant)
        _check_backend(proxy, since, linear_request())
    reply = stub.ModelInfer(_identity((7, 8, 9)), timeout=10)
    assert np.frombuffer(reply.raw_output_contents[0], np.int32).tolist() == [7, 8, 9]
    assert "Traceback" not in gateway.log()
