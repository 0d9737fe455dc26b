"""Hostile requests against the gateway in front of a REAL Triton: each is refused with
INVALID_ARGUMENT (or a short NOT_FOUND) naming what is wrong, and Triton never sees it.

How "never sees it" is shown: Triton 2.51's ModelStatistics do NOT count requests it rejects
before execution (a batch over max_batch_size, an unknown output, a wrongly typed parameter leave
success and fail counts unchanged; measured), so statistics cannot tell "the gateway refused it"
from "Triton refused it". The gateway's backend address is therefore a recording pass-through: a
gRPC server that forwards every inference.GRPCInferenceService call byte for byte to the real
Triton and keeps each ModelInfer request it forwards (tests/recording_proxy.py). A refused
request must not appear there; the allowed ones must (with their parameters intact), and Triton
must answer them.

Where the gateway refuses what Triton would refuse too, the same request (in the backend's names)
is also sent straight to Triton, which must answer INVALID_ARGUMENT: the gateway rejects what the
backend rejects, only earlier.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from tests.builders import oip_stub, triton_backend, variant
from tests.gateway_process import GatewayProcess
from tests.oip import linear_request
from tests.recording_proxy import UNLIMITED, RecordingProxy


@pytest.fixture(scope="module")
def proxy(triton):
    recorder = RecordingProxy(triton.address)
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def gateway(proxy):
    def only(model: str, backend_model: str, backend_version: str | None = None, **fields) -> dict:
        one = variant(
            "only", backend_model=backend_model, backend_version=backend_version, **fields
        )
        return {"model": model, "variants": [one]}

    config = {
        "backends": [triton_backend(proxy.address)],
        "routes": [
            only("linear", "demo_linear", backend_version="1"),  # max_batch_size 64, dims [4]
            only("identity", "demo_identity"),  # max_batch_size 0, dims [-1]
            only("renamed", "demo_linear", backend_version="1",
                 input_names={"x": "INPUT0"}, output_names={"y": "OUTPUT0"}),
        ],
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        yield gw


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address, options=UNLIMITED) as stub:
        yield stub


@pytest.fixture(scope="module")
def triton_stub(triton):
    with oip_stub(triton.address) as stub:
        yield stub


def linear(batch: int = 1, model: str = "linear") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[batch, 4])
    request.raw_input_contents.append(np.ones((batch, 4), np.float32).tobytes())
    return request


def param(params, name: str, **value) -> None:
    params[name].CopyFrom(oip.InferParameter(**value))


def _refused() -> list[tuple[str, oip.ModelInferRequest, re.Pattern, bool]]:
    """(label, request to the gateway, message pattern, Triton refuses it too)."""
    cases = []

    def case(label: str, expect: str | re.Pattern, triton_refuses: bool, request=None):
        request = request if request is not None else linear()
        pattern = expect if isinstance(expect, re.Pattern) else re.compile(re.escape(expect))
        cases.append((label, request, pattern, triton_refuses))
        return request

    # (1) confused deputy: shared memory anywhere, HTTP-only and unknown parameters
    r = case("shm input", re.compile(r"^input 'INPUT0' has no data: send contents.fp32_contents or "
             r"raw_input_contents; its parameters \('shared_memory_byte_size', "
             r"'shared_memory_region'\) cannot supply data through the gateway$"), False)  # fmt: skip
    del r.raw_input_contents[:]
    param(r.inputs[0].parameters, "shared_memory_region", string_param="other-clients-region")
    param(r.inputs[0].parameters, "shared_memory_byte_size", int64_param=16)
    # With data alongside, Triton would still read the region (it ignores raw contents then).
    r = case("shm on input", re.compile(r"^input 'INPUT0': parameter "
             r"'shared_memory_(region|byte_size)' is not accepted: shared-memory regions are "
             r"registered by the backend's own clients"), False)  # fmt: skip
    param(r.inputs[0].parameters, "shared_memory_region", string_param="other-clients-region")
    param(r.inputs[0].parameters, "shared_memory_byte_size", int64_param=16)
    r = case("shm on output", re.compile(r"^output 'OUTPUT0': parameter 'shared_memory_"), False)
    out = r.outputs.add(name="OUTPUT0")
    param(out.parameters, "shared_memory_region", string_param="other-clients-region")
    param(out.parameters, "shared_memory_byte_size", int64_param=12)
    param(out.parameters, "shared_memory_offset", int64_param=0)
    r = case("shm on request", "request: parameter 'shared_memory_region' is not accepted", False)
    param(r.parameters, "shared_memory_region", string_param="other-clients-region")
    r = case("binary_data", "output 'OUTPUT0': parameter 'binary_data' is not accepted: binary "
             "data parameters belong to the HTTP protocol", False)  # fmt: skip
    param(r.outputs.add(name="OUTPUT0").parameters, "binary_data", bool_param=True)
    r = case("custom", "request: parameter 'custom' is not accepted: not on the gateway's "
             "allowlist (Triton accepts here: priority, sequence_end, sequence_id, "
             "sequence_start, timeout)", False)  # fmt: skip
    param(r.parameters, "custom", double_param=1.5)
    # wrongly typed or out-of-range parameters: Triton refuses these too
    r = case("priority type", "request: parameter 'priority' must be int64_param or "
             "uint64_param, got string_param", True)  # fmt: skip
    param(r.parameters, "priority", string_param="high")
    r = case("priority range", "request: parameter 'priority' must be >= 0, got -1", True)
    param(r.parameters, "priority", int64_param=-1)
    r = case("sequence_start type", "parameter 'sequence_start' must be bool_param, got "
             "int64_param", True)  # fmt: skip
    param(r.parameters, "sequence_start", int64_param=1)
    r = case("classification", "output 'OUTPUT0': parameter 'classification' must be >= 1, "
             "got 0", True)  # fmt: skip
    param(r.outputs.add(name="OUTPUT0").parameters, "classification", int64_param=0)
    # (5) against the model's description
    case("batch over max", "input 'INPUT0': batch size 65 (first dimension of [65,4]) is outside "
         "1..64, model 'linear''s max_batch_size", True, linear(65))  # fmt: skip
    case("batch zero", "input 'INPUT0': batch size 0 (first dimension of [0,4]) is outside "
         "1..64", True, linear(0))  # fmt: skip
    r = case("unknown output", "model 'linear' has no output 'NOPE' (outputs: OUTPUT0)", True)
    r.outputs.add(name="NOPE")
    r = case("backend output name on a renamed route",
             "model 'renamed' has no output 'OUTPUT0' (outputs: y)", False,
             linear(model="renamed"))  # fmt: skip
    r.inputs[0].name = "x"
    r.outputs.add(name="OUTPUT0")
    return cases


def _triton_form(request: oip.ModelInferRequest) -> oip.ModelInferRequest:
    """The request as the gateway would have forwarded it (backend names)."""
    direct = oip.ModelInferRequest()
    direct.CopyFrom(request)
    direct.model_name, direct.model_version = "demo_linear", "1"
    return direct


def test_refused_before_triton_with_the_reason(stub, triton_stub, proxy):
    cases = _refused()
    before = len(proxy.infers)
    for label, request, expect, triton_refuses in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert expect.search(err.value.details()), (label, err.value.details())
        if triton_refuses:
            with pytest.raises(grpc.RpcError) as direct:
                triton_stub.ModelInfer(_triton_form(request))
            assert direct.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
    assert len(proxy.infers) == before, [r.model_name for r in proxy.infers[before:]]


def test_allowed_parameters_and_shapes_reach_triton(stub, proxy):
    """Positive control: the pass-through does record what the gateway forwards, and what the
    allowlist and the model description let through, Triton answers."""
    before = len(proxy.infers)
    request = linear(64)
    param(request.parameters, "priority", uint64_param=1)
    param(request.parameters, "timeout", int64_param=5_000_000)
    param(request.parameters, "sequence_id", string_param="not-a-sequence-model")
    param(request.outputs.add(name="OUTPUT0").parameters, "classification", int64_param=2)
    response = stub.ModelInfer(request)
    assert (response.outputs[0].datatype, list(response.outputs[0].shape)) == ("BYTES", [64, 2])
    # A 0 in a -1 dimension of a model without batching: Triton takes it, so the gateway does.
    empty = oip.ModelInferRequest(model_name="identity")
    empty.inputs.add(name="INPUT0", datatype="INT32", shape=[0])
    empty.raw_input_contents.append(b"")
    assert list(stub.ModelInfer(empty).outputs[0].shape) == [0]
    renamed = linear(model="renamed")
    renamed.inputs[0].name = "x"
    renamed.outputs.add(name="y")
    assert stub.ModelInfer(renamed).outputs[0].name == "y"
    forwarded = proxy.infers[before:]
    assert [r.model_name for r in forwarded] == ["demo_linear", "demo_identity", "demo_linear"]
    assert dict(forwarded[0].parameters) == dict(request.parameters)
    assert forwarded[0].outputs[0].parameters["classification"].int64_param == 2
    assert forwarded[2].outputs[0].name == "OUTPUT0"


@pytest.mark.parametrize("size", [10_000, 100_000, 1_000_000])
def test_huge_model_name_is_invalid_argument_with_a_short_message(stub, proxy, size):
    before = len(proxy.infers)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear(model="m" * size))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED
    details = err.value.details()
    assert details.startswith(f"model_name is {size} bytes, over the limit of 256 bytes: 'mmm")
    assert f"...(+{size - 80} more)" in details and len(details) < 200
    assert len(proxy.infers) == before


def test_other_long_names_are_bounded(stub):
    cases = {
        "model_version is 100000 bytes, over the limit of 64 bytes": lambda r: setattr(
            r, "model_version", "7" * 100_000
        ),
        "id is 300 bytes, over the limit of 256 bytes": lambda r: setattr(r, "id", "i" * 300),
        "inputs[0].name is 50000 bytes": lambda r: setattr(r.inputs[0], "name", "x" * 50_000),
        "outputs[0].name is 50000 bytes": lambda r: r.outputs.add(name="y" * 50_000),
        "request parameter name is 20000 bytes": lambda r: param(
            r.parameters, "p" * 20_000, bool_param=True
        ),
    }
    for expect, edit in cases.items():
        request = linear()
        edit(request)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expect
        assert err.value.details().startswith(expect), err.value.details()
        assert len(err.value.details()) < 250


def test_unknown_names_within_bounds_are_quoted_short(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear(model="n" * 200))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == (
        f"unknown model {'n' * 80!r}...(+120 more): no route for it in the gateway"
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(linear_request(version="9" * 60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "has no version '99999" in err.value.details() and len(err.value.details()) < 200
