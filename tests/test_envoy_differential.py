"""Envoy mode reads a request body exactly as Triton will, or hands the call to the gateway.

A parser differential is a security hole: Envoy's listener (gateway/controlplane/envoy/lua/model.lua) picks
the route from the body, Triton's C++ protobuf picks the model it runs from the same bytes. If they
read a field differently, a caller names one model to Envoy and runs another (one no route
exposes), or hides a shared-memory parameter that reads or overwrites another client's region.

One stack: a real Triton with registered system shared-memory regions (the victim's), a recording
pass-through in front of it (every byte Triton got and what it answered), `tensorgate serve` in
Envoy mode and a real Envoy. Each body goes to Envoy and to the Python gateway directly; then
every request Triton received is read with `cpp_read` (C++ protobuf's reading: a tag keeps its
low 32 bits, a length is at most 5 bytes below 2^31, the last occurrence wins) and must name a
model and version some route's variant names, carry no parameter the gateway would refuse, and,
when Triton answered OK, Triton's own answer must name the model `cpp_read` saw (which checks the
reference reader against the real parser on every example).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip

from tests.backends.process import free_port
from tests.builders import triton_backend, variant
from tests.gateway_process import GatewayProcess
from tests.oip import Y_V1, Y_V2, X, output
from tests.recording_proxy import RecordingProxy
from tests.test_envoy_dataplane import envoy_in_front

INFER = "/inference.GRPCInferenceService/ModelInfer"

# What the routes let a caller run on Triton: (backend model, version), "" = Triton's choice.
ROUTED = {("demo_identity", ""), ("demo_linear", "1"), ("demo_linear", "2")}
# Parameters the Triton adapter forwards (adapters/parameters.py); none of them at tensors.
ALLOWED_REQUEST_PARAMETERS = {
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
}
# The routes' clusters: triton-a's first and second slot (a route's first and second variant on
# it; resources.backend_cluster), shared by every route; rb20-5 is the default retry budget.
A0, A1 = "tgb|triton-a|0|rb20-5", "tgb|triton-a|1|rb20-5"
VICTIM = np.array([7, 7, 7, 7], dtype=np.int32)


def _config(triton_address: str, xds: int, listen: int) -> dict:
    return {
        "listeners": {"xds": f"127.0.0.1:{xds}"},
        "envoy": {"listen": f"127.0.0.1:{listen}", "max_body_bytes": 1 << 20},
        "backends": [triton_backend(triton_address)],
        "routes": [
            # the public name is the backend's: Envoy forwards the body untouched
            {"model": "demo_identity",
             "variants": [variant("only", backend_model=None, backend_version=None)]},
            {"model": "linear", "variants": [variant("stable", version="1", weight=80),
                                             variant("canary", backend_version="2", version="2", weight=20)]},
            # the public name is the backend's, the version pinned: unpinned calls must run v1
            {"model": "demo_linear", "variants": [variant("pinned", version="1")]},
        ],
    }  # fmt: skip


# --- C++ protobuf's reading of a body (the reference) -------------------------------------------


class Unparsable(Exception):
    pass


def _varint(data: bytes, i: int, limit: int = 10) -> tuple[int, int]:
    value = 0
    for n in range(limit):
        if i + n >= len(data):
            raise Unparsable("truncated varint")
        b = data[i + n]
        value |= (b & 0x7F) << (7 * n)
        if b < 0x80:
            return value, i + n + 1
    raise Unparsable("varint too long")


def _tag(data: bytes, i: int) -> tuple[int, int]:
    """ReadTag: at most 5 bytes, the low 32 bits kept (protobuf's parse_context.h)."""
    value, i = _varint(data, i, 5)
    return value & 0xFFFFFFFF, i


def _size(data: bytes, i: int) -> tuple[int, int]:
    """ReadSize: at most 5 bytes, below 2^31."""
    value, i = _varint(data, i, 5)
    if value >= 1 << 31:
        raise Unparsable("size too large")
    return value, i


def _fields(data: bytes):
    """(field, wire, value) of a message; value = bytes for wire 2, None otherwise."""
    i = 0
    while i < len(data):
        tag, i = _tag(data, i)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise Unparsable("field 0")
        if wire == 0:
            _, i = _varint(data, i)
            yield field, wire, None
        elif wire == 1:
            i += 8
            yield field, wire, None
        elif wire == 5:
            i += 4
            yield field, wire, None
        elif wire == 2:
            size, i = _size(data, i)
            if i + size > len(data):
                raise Unparsable("length past the end")
            yield field, wire, data[i : i + size]
            i += size
        elif wire == 3:
            i = _skip_group(data, i, field)
            yield field, wire, None
        else:
            raise Unparsable(f"wire type {wire}")
        if i > len(data):
            raise Unparsable("past the end")


def _skip_group(data: bytes, i: int, number: int) -> int:
    while i < len(data):
        tag, i = _tag(data, i)
        field, wire = tag >> 3, tag & 7
        if wire == 4:
            if field != number:
                raise Unparsable("mismatched end group")
            return i
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _size(data, i)
            i += size
        elif wire == 3:
            i = _skip_group(data, i, field)
        else:
            raise Unparsable(f"wire type {wire}")
    raise Unparsable("unterminated group")


def _string(value: bytes) -> str:
    try:
        return value.decode("utf-8")  # proto3 strings: C++ refuses invalid UTF-8
    except UnicodeDecodeError as err:
        raise Unparsable("invalid UTF-8") from err


def _parameter_key(entry: bytes) -> str:
    key = ""
    for field, wire, value in _fields(entry):
        if field == 1 and wire == 2:
            key = _string(value)
    return key


def cpp_read(body: bytes) -> tuple[str, str, list[str]] | None:
    """(model_name, model_version, parameter keys as "where:key") as C++ protobuf reads the
    ModelInferRequest in `body`; None where C++ would refuse to parse it."""
    name = version = ""
    parameters = []
    try:
        for field, wire, value in _fields(body):
            if wire != 2:
                continue  # every field read here is length-delimited; others are unknown
            if field == 1:
                name = _string(value)
            elif field == 2:
                version = _string(value)
            elif field == 4:
                parameters.append(f"request:{_parameter_key(value)}")
            elif field in (5, 6):
                where = "input" if field == 5 else "output"
                for inner, inner_wire, inner_value in _fields(value):
                    if inner == (4 if field == 5 else 2) and inner_wire == 2:
                        parameters.append(f"{where}:{_parameter_key(inner_value)}")
    except Unparsable:
        return None
    return name, version, parameters


# --- writing bodies the way a hostile caller would ------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def padded(value: int) -> bytes:
    """The same number in one byte more (non-minimal: a trailing 0 group)."""
    raw = bytearray(varint(value))
    raw[-1] |= 0x80
    return bytes(raw) + b"\x00"


def overlong(value: int) -> bytes:
    """5 bytes with bit 32 set: C++ keeps the low 32 bits (`value`); a 64-bit reader does not."""
    return varint(value + (1 << 32))


KEY_STYLES = {"minimal": varint, "padded": padded, "overlong": overlong}


def field(number: int, payload: bytes, key=varint, length=varint) -> bytes:
    return key(number << 3 | 2) + length(len(payload)) + payload


def parameter(key: str, value: oip.InferParameter) -> bytes:
    return field(1, key.encode()) + field(2, value.SerializeToString())


def string_parameter(value: str) -> oip.InferParameter:
    return oip.InferParameter(string_param=value)


def int_parameter(value: int) -> oip.InferParameter:
    return oip.InferParameter(int64_param=value)


def identity_input(count: int = 4, extra: bytes = b"", packed: bool = True) -> bytes:
    shape = field(3, varint(count)) if packed else varint(3 << 3) + varint(count)
    return field(1, b"INPUT0") + field(2, b"INT32") + shape + extra


def linear_input(extra: bytes = b"") -> bytes:
    return field(1, b"INPUT0") + field(2, b"FP32") + field(3, varint(1) + varint(4)) + extra


# --- the stack ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regions(triton):
    """Two system shared-memory regions registered with Triton by another client (the victim)."""
    client = tc.InferenceServerClient(triton.address)
    handles = {}
    for name in ("victim_in", "victim_out"):
        key = f"/tensorgate_test_{name}_{free_port()}"
        handle = shm.create_shared_memory_region(name, key, VICTIM.nbytes)
        shm.set_shared_memory_region(handle, [VICTIM])
        client.register_system_shared_memory(name, key, VICTIM.nbytes)
        handles[name] = handle
    yield handles
    for name, handle in handles.items():
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)
    client.close()


@pytest.fixture(scope="module")
def stack(triton, regions):
    recorder = RecordingProxy(triton.address)
    xds, listen = free_port(), free_port()
    try:
        gateway = GatewayProcess(_config(recorder.address, xds, listen))
        with envoy_in_front(gateway, "envoy-diff", 43) as envoy:
            yield recorder, gateway, envoy, f"127.0.0.1:{listen}"
    finally:
        recorder.close()


@pytest.fixture(scope="module")
def callers(stack):
    """ModelInfer with raw bytes on Envoy and on the Python gateway."""
    _, gateway, _, envoy_address = stack
    with (
        grpc.insecure_channel(envoy_address) as to_envoy,
        grpc.insecure_channel(gateway.address) as to_gateway,
    ):
        yield tuple(
            channel.unary_unary(INFER, request_serializer=bytes, response_deserializer=bytes)
            for channel in (to_envoy, to_gateway)
        )


def send(call, message: bytes) -> tuple[grpc.StatusCode, oip.ModelInferResponse | None, str]:
    try:
        raw = call(message, timeout=10)
    except grpc.RpcError as err:
        return err.code(), None, err.details() or ""
    return grpc.StatusCode.OK, oip.ModelInferResponse.FromString(raw), ""


def check_what_triton_got(recorder: RecordingProxy, since: int, body: bytes) -> None:
    """The invariant, on every request Triton received since `since`."""
    for request, code, raw_response in recorder.raw[since:]:
        reading = cpp_read(request)
        if reading is None:
            assert code != grpc.StatusCode.OK, f"Triton ran a body C++ cannot parse: {body!r}"
            continue
        name, version, parameters = reading
        assert (name, version) in ROUTED, (
            f"Triton was asked for {name!r} version {version!r}, which no route names; "
            f"caller's body {body!r}"
        )
        forbidden = [p for p in parameters if p.split(":", 1)[1] not in ALLOWED_REQUEST_PARAMETERS]
        forbidden += [p for p in parameters if not p.startswith("request:")]
        assert not forbidden, f"parameters {forbidden} reached Triton; caller's body {body!r}"
        if code == grpc.StatusCode.OK:
            response = oip.ModelInferResponse.FromString(raw_response)
            assert response.model_name == name, (response.model_name, reading)
            if version:
                assert response.model_version == version, (response.model_version, reading)


# --- the findings, one by one -------------------------------------------------------------------


def identity_body(extra: bytes = b"", model: bytes = b"demo_identity") -> bytes:
    return (
        field(1, model)
        + field(5, identity_input())
        + field(7, np.arange(4, dtype=np.int32).tobytes())
        + extra
    )


def test_an_overlong_model_name_key_does_not_reach_an_unrouted_model(stack, callers):
    recorder = stack[0]
    to_envoy, to_gateway = callers
    # demo_fail takes one FP32: the body is built for it, and names demo_identity up front
    body = (
        field(1, b"demo_identity")
        + field(5, field(1, b"INPUT0") + field(2, b"FP32") + field(3, varint(1)))
        + field(7, np.array([1.0], dtype=np.float32).tobytes())
        + field(1, b"demo_fail", key=overlong)
    )
    assert cpp_read(body)[0] == "demo_fail"  # what Triton would read
    since = len(recorder.raw)
    for call in (to_envoy, to_gateway):
        code, response, details = send(call, body)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, response)
        assert "not a valid" in details or "invalid" in details.lower(), details
    assert recorder.raw[since:] == []  # Triton never saw it
    check_what_triton_got(recorder, since, body)


def test_hidden_input_parameters_do_not_read_another_clients_region(stack, callers):
    recorder, _, _, _ = stack
    to_envoy, _ = callers
    hidden = field(
        4, parameter("shared_memory_region", string_parameter("victim_in")), key=overlong
    ) + field(4, parameter("shared_memory_byte_size", int_parameter(16)), key=overlong)
    body = field(1, b"demo_identity") + field(5, identity_input(extra=hidden))
    assert sorted(cpp_read(body)[2]) == [
        "input:shared_memory_byte_size",
        "input:shared_memory_region",
    ]
    since = len(recorder.raw)
    code, response, _ = send(to_envoy, body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, response and output(response))
    check_what_triton_got(recorder, since, body)


def test_hidden_output_parameters_do_not_overwrite_another_clients_region(stack, callers, regions):
    recorder, _, _, _ = stack
    to_envoy, _ = callers
    hidden = field(
        2, parameter("shared_memory_region", string_parameter("victim_out")), key=overlong
    ) + field(2, parameter("shared_memory_byte_size", int_parameter(16)), key=overlong)
    body = identity_body(extra=field(6, field(1, b"OUTPUT0") + hidden))
    since = len(recorder.raw)
    code, _, _ = send(to_envoy, body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code
    region = shm.get_contents_as_numpy(regions["victim_out"], np.int32, [4])
    assert region.tolist() == VICTIM.tolist(), "another client's region was overwritten"
    check_what_triton_got(recorder, since, body)


def test_routing_headers_from_callers_are_not_trusted(stack, callers):
    """Envoy used to route a caller's x-tensorgate-model header without reading the body: the
    body then named any model (or shared-memory parameters) to Triton."""
    recorder, _, _, address = stack
    body = identity_body(model=b"demo_fail")
    since = len(recorder.raw)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER, request_serializer=bytes)
        with pytest.raises(grpc.RpcError) as err:
            call(body, metadata=(("x-tensorgate-model", "demo_identity"),), timeout=10)
    # the body's model has no route: the gateway answers NOT_FOUND, Triton never hears of it
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    check_what_triton_got(recorder, since, body)
    assert recorder.raw[since:] == []


def test_an_unpinned_call_runs_the_variants_version(stack, callers):
    """demo_linear's only variant is version 1; Triton's default for demo_linear is 2. Envoy
    forwarded an unpinned call as it came, and Triton ran version 2."""
    recorder, _, envoy, _ = stack
    to_envoy, to_gateway = callers
    body = (
        field(1, b"demo_linear")
        + field(5, linear_input())
        + field(7, np.array(X, dtype=np.float32).tobytes())
    )
    before = envoy.counter(f"cluster.{A0}.upstream_rq_total")
    since = len(recorder.raw)
    for call in (to_envoy, to_gateway):
        code, response, details = send(call, body)
        assert code == grpc.StatusCode.OK, details
        assert output(response) == Y_V1
        assert (response.model_name, response.model_version) == ("demo_linear", "1")
    # pinned by the caller: the upstream filter lets it pass as it is (same names)
    pinned = body + field(2, b"1")
    code, response, details = send(to_envoy, pinned)
    assert code == grpc.StatusCode.OK, details
    assert (output(response), response.model_version) == (Y_V1, "1")
    assert envoy.counter(f"cluster.{A0}.upstream_rq_total") == before + 2
    check_what_triton_got(recorder, since, body)
    assert recorder.raw[-1][0] == pinned  # byte for byte


def test_names_after_a_large_tensor_and_bounded_ids(stack, callers):
    """The body is read through a window that has to move past a 40 KB tensor to the names;
    a request id over the gateway's bound (256 bytes) is handed to the gateway, which refuses
    it, as it would directly."""
    recorder, _, envoy, _ = stack
    to_envoy, _ = callers
    cluster = f"cluster.{A0}.upstream_rq_total"
    values = np.arange(10_000, dtype=np.int32)
    tensor = field(5, field(1, b"INPUT0") + field(2, b"INT32") + field(3, varint(10_000)))
    body = tensor + field(7, values.tobytes()) + field(1, b"demo_identity")
    before = envoy.counter(cluster)
    code, response, details = send(to_envoy, body)
    assert code == OK, details
    assert np.frombuffer(response.raw_output_contents[0], np.int32).tolist() == values.tolist()
    assert envoy.counter(cluster) == before + 1
    since = len(recorder.raw)
    code, _, details = send(to_envoy, field(3, b"r" * 257) + body)
    assert code == INVALID and "id" in details, (code, details)
    assert envoy.counter(cluster) == before + 1 and recorder.raw[since:] == []


# --- differential fuzzing -----------------------------------------------------------------------

ROUTES = {
    # public model, version -> (input message, raw contents, expected output of what runs)
    ("demo_identity", ""): "identity",
    ("linear", "1"): "linear",
    ("linear", "2"): "linear",
    ("demo_linear", ""): "linear",
}
SMUGGLED = [
    None,
    None,
    None,
    None,
    ("name", b"demo_fail"),
    ("name", b"demo_sleep"),
    ("name", b"demo_repeat"),
    ("version", b"2"),
    ("version", b"1"),
    ("request_parameter", parameter("binary_data_output", oip.InferParameter(bool_param=True))),
    ("input_parameter", parameter("shared_memory_region", string_parameter("victim_in"))),
    ("output_parameter", parameter("shared_memory_region", string_parameter("victim_out"))),
]


@st.composite
def bodies(draw):
    model, version = draw(st.sampled_from(sorted(ROUTES)))
    kind = ROUTES[(model, version)]
    key_style = st.sampled_from(["minimal"] * 12 + ["padded", "overlong"])
    length_style = st.sampled_from([varint] * 6 + [padded])

    def key():
        return KEY_STYLES[draw(key_style)]

    smuggled = draw(st.sampled_from(SMUGGLED))
    input_extra = b""
    if smuggled and smuggled[0] == "input_parameter":
        input_extra = field(4, smuggled[1], key=key())
    if kind == "identity":
        tensor = identity_input(extra=input_extra, packed=draw(st.booleans()))
        raw = np.arange(4, dtype=np.int32).tobytes()
    else:
        tensor = linear_input(extra=input_extra)
        raw = np.array(X, dtype=np.float32).tobytes()
    parts = [
        field(1, model.encode(), key=key(), length=draw(length_style)),
        field(5, tensor, key=key(), length=draw(length_style)),
        field(7, raw, key=key(), length=draw(length_style)),
    ]
    if version:
        parts.append(field(2, version.encode(), key=key(), length=draw(length_style)))
    if draw(st.booleans()):
        outputs = field(1, b"OUTPUT0")
        if smuggled and smuggled[0] == "output_parameter":
            outputs += field(2, smuggled[1], key=key())
        parts.append(field(6, outputs, key=key()))
    elif smuggled and smuggled[0] == "output_parameter":
        parts.append(field(6, field(1, b"OUTPUT0") + field(2, smuggled[1], key=key())))
    if smuggled and smuggled[0] in ("name", "version"):
        number = 1 if smuggled[0] == "name" else 2
        parts.append(field(number, smuggled[1], key=key()))
    if smuggled and smuggled[0] == "request_parameter":
        parts.append(field(4, smuggled[1], key=key()))
    decoy = b""
    if draw(st.booleans()):  # an earlier occurrence of the name (the last one wins)
        decoy = field(1, draw(st.sampled_from([b"demo_fail", b"linear", b"x"])))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # unknown fields, each wire type
        number = draw(st.sampled_from([8, 15, 16, 999, (1 << 29) - 1]))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        payload = {0: varint(300), 1: b"\x00" * 8, 2: varint(3) + b"abc", 5: b"\x00" * 4}[wire]
        parts.append(varint(number << 3 | wire) + payload)
    order = draw(st.permutations(range(len(parts))))
    # the decoy stays first: shuffled last, "linear" (weighted 80/20) would be the model, and
    # Envoy and the gateway would each pick a variant at random
    return decoy + b"".join(parts[i] for i in order)


DIFFERENTIAL = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEEN: dict[str, int] = {}
OK, INVALID, NOT_FOUND = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
)


def test_differential_envoy_python_triton(stack, callers):
    recorder, _, envoy, _ = stack
    to_envoy, to_gateway = callers
    gateway_before = envoy.counter("cluster.tensorgate_gateway.upstream_rq_total")

    @DIFFERENTIAL
    @given(bodies())
    def run(body):
        since = len(recorder.raw)
        envoy_code, envoy_response, _ = send(to_envoy, body)
        gateway_code, gateway_response, _ = send(to_gateway, body)
        SEEN[f"envoy {envoy_code.name}"] = SEEN.get(f"envoy {envoy_code.name}", 0) + 1
        check_what_triton_got(recorder, since, body)
        if envoy_code == grpc.StatusCode.OK and gateway_code == grpc.StatusCode.OK:
            # the same outputs: the same model ran (linear's weights are pinned by version)
            assert envoy_response.raw_output_contents == gateway_response.raw_output_contents
        # handed over, the gateway answers: refused, or an unrouted name
        assert envoy_code in (OK, INVALID, NOT_FOUND), (envoy_code, body)

    run()
    # Both kinds of outcome happened: Envoy served honest bodies itself, handed others over.
    assert SEEN.get("envoy OK", 0) >= 50, SEEN
    assert SEEN.get("envoy INVALID_ARGUMENT", 0) >= 60, SEEN
    assert envoy.counter("cluster.tensorgate_gateway.upstream_rq_total") > gateway_before


def test_honest_bodies_are_still_served_by_envoy_itself(stack, callers):
    """The strict reading costs honest callers nothing: a body as protobuf writes it (any field
    order, packed or unpacked shape, outputs named) is routed by Envoy, not handed over."""
    _, _, envoy, _ = stack
    to_envoy, _ = callers
    before_gateway = envoy.counter("cluster.tensorgate_gateway.upstream_rq_total")
    cluster = f"cluster.{A1}.upstream_rq_total"
    before = envoy.counter(cluster)
    request = oip.ModelInferRequest(model_name="linear", model_version="2", id="r-1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.outputs.add(name="OUTPUT0")
    request.raw_input_contents.append(np.array(X, dtype=np.float32).tobytes())
    typed = oip.ModelInferRequest(model_name="linear", model_version="2")
    tensor = typed.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(X)
    reversed_fields = field(5, linear_input()) + field(7, np.array(X, dtype=np.float32).tobytes())
    reversed_fields += field(2, b"2") + field(1, b"linear")
    for body in (request.SerializeToString(), typed.SerializeToString(), reversed_fields):
        code, response, details = send(to_envoy, body)
        assert code == grpc.StatusCode.OK, details
        assert output(response) == Y_V2
    assert envoy.counter(cluster) == before + 3
    assert envoy.counter("cluster.tensorgate_gateway.upstream_rq_total") == before_gateway
