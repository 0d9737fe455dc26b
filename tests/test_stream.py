"""ModelStreamInfer through the gateway, with stock tritonclient (`start_stream` /
`async_stream_infer`) against a real Triton with a decoupled python-backend model
(deploy/demo/models/demo_repeat: n responses for INPUT0 = [n], then the final flag).

What a streaming client relies on: each request routed on its own (two public models on one
stream, renamed and version-pinned), every response of a decoupled request in order with the
caller's id and the public names, errors as `error_message` in the stream (Triton's own and the
gateway's refusals) without ending it, and a backend that dies mid-stream ending the stream
with UNAVAILABLE.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.utils import InferenceServerException

from tests.builders import oip_stub, triton_backend, variant
from tests.faults.proxy import FaultProxy
from tests.gateway_process import GatewayProcess
from tests.loadgen import metric, scrape
from tests.oip import Y_V1, X


def _config(address: str) -> dict:
    return {
        "backends": [triton_backend(address)],
        "routes": [
            {"model": "repeat",
             "variants": [variant("only", backend_model="demo_repeat", backend_version=None)]},
            # public name and version differ from the backend's
            {"model": "linear", "variants": [variant("v1", version="7")]},
        ],
    }  # fmt: skip


def _repeat_input(n: float) -> tc.InferInput:
    tensor = tc.InferInput("INPUT0", [1], "FP32")
    tensor.set_data_from_numpy(np.array([n], dtype=np.float32))
    return tensor


def _linear_input() -> tc.InferInput:
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([X], dtype=np.float32))
    return tensor


class Collector:
    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.items.put((result, error))

    def take(self, count: int, timeout: float = 10.0) -> list:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            out.append(self.items.get(timeout=max(0.01, deadline - time.monotonic())))
        return out


@pytest.fixture(scope="module")
def gateway(triton):
    with GatewayProcess(_config(triton.address)) as gw:
        yield gw


def test_decoupled_responses_in_order_with_public_names(gateway):
    client = tc.InferenceServerClient(gateway.address)
    got = Collector()
    client.start_stream(callback=got)
    try:
        client.async_stream_infer("repeat", [_repeat_input(3)], request_id="a",
                                  enable_empty_final_response=True)  # fmt: skip
        client.async_stream_infer("linear", [_linear_input()], model_version="7", request_id="b")
        client.async_stream_infer("repeat", [_repeat_input(2)], request_id="c",
                                  enable_empty_final_response=True)  # fmt: skip
        results = got.take(3 + 1 + 1 + 2 + 1)
    finally:
        client.stop_stream()
    assert all(error is None for _, error in results), [e for _, e in results if e]
    responses = [r.get_response() for r, _ in results]
    by_id: dict[str, list] = {}
    for response in responses:
        by_id.setdefault(response.id, []).append(response)
    # a: [0], [1], [2], then the empty final response; c likewise; in order per request
    for request_id, n in (("a", 3), ("c", 2)):
        values = [
            tc.InferResult(r).as_numpy("OUTPUT0").tolist() for r in by_id[request_id] if r.outputs
        ]
        assert values == [[float(i)] for i in range(n)]
        assert by_id[request_id][-1].parameters["triton_final_response"].bool_param
        assert all(r.model_name == "repeat" for r in by_id[request_id])
    (linear,) = by_id["b"]
    assert tc.InferResult(linear).as_numpy("OUTPUT0").tolist() == [Y_V1]
    assert (linear.model_name, linear.model_version) == ("linear", "7")
    # counted per request, when its final response came
    samples = scrape(gateway.metrics_url)
    labels = {"variant": "only", "backend": "triton-a", "code": "OK", "protocol": "grpc"}
    assert metric(samples, "tensorgate_requests_total", model="repeat", **labels) >= 2


def test_errors_come_back_in_the_stream_and_it_goes_on(gateway):
    client = tc.InferenceServerClient(gateway.address)
    got = Collector()
    client.start_stream(callback=got)
    try:
        client.async_stream_infer("repeat", [_repeat_input(-1)], request_id="neg")  # Triton's
        client.async_stream_infer("no-such-model", [_repeat_input(1)], request_id="lost")
        client.async_stream_infer("linear", [_linear_input()], model_version="9", request_id="v")
        client.async_stream_infer("repeat", [_repeat_input(1)], request_id="ok",
                                  enable_empty_final_response=True)  # fmt: skip
        results = got.take(5)
    finally:
        client.stop_stream()
    errors = [str(e) for _, e in results if e is not None]
    assert any("cannot repeat -1 times" in e for e in errors)  # Triton's error, passed through
    assert any("no-such-model" in e for e in errors)  # the gateway's refusal
    assert any("version" in e and "9" in e for e in errors)
    ok = [r.get_response() for r, e in results if e is None]
    assert [r.id for r in ok] == ["ok", "ok"]


def test_refused_parameters_and_raw_stub(gateway):
    """A shared-memory parameter is refused in the stream like in ModelInfer."""
    with oip_stub(gateway.address) as stub:
        request = oip.ModelInferRequest(model_name="repeat", id="shm")
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
        tensor.contents.fp32_contents.append(1)
        tensor.parameters["shared_memory_region"].string_param = "region"
        replies = list(stub.ModelStreamInfer(iter([request]), timeout=10))
    assert len(replies) == 1 and "shared_memory_region" in replies[0].error_message
    assert replies[0].infer_response.id == "shm"


def test_malformed_requests_are_refused_in_the_stream_as_modelinfer_refuses_them(gateway):
    """The unary path's structural checks apply per stream message; the stream goes on."""

    def request(id: str, *names: str, values: int = 1) -> oip.ModelInferRequest:
        out = oip.ModelInferRequest(model_name="repeat", id=id)
        out.parameters["triton_enable_empty_final_response"].bool_param = True
        for name in names:
            tensor = out.inputs.add(name=name, datatype="FP32", shape=[1])
            tensor.contents.fp32_contents.extend([1.0] * values)
        return out

    sent = [
        request("none"),
        request("twice", "INPUT0", "INPUT0"),
        request("unnamed", ""),
        request("misfit", "INPUT0", values=3),
        request("fine", "INPUT0"),
    ]
    with oip_stub(gateway.address) as stub:
        replies = list(stub.ModelStreamInfer(iter(sent), timeout=10))
    errors = {r.infer_response.id: r.error_message for r in replies if r.error_message}
    assert "has no inputs" in errors["none"]
    assert "appears more than once" in errors["twice"]
    assert "has no name" in errors["unnamed"]
    assert "needs 1 elements" in errors["misfit"]
    assert {r.infer_response.id for r in replies if not r.error_message} == {"fine"}


def test_a_backend_dying_mid_stream_ends_the_stream_unavailable(triton):
    with FaultProxy(triton.address) as proxy, GatewayProcess(_config(proxy.address)) as gw:
        client = tc.InferenceServerClient(gw.address)
        got = Collector()
        client.start_stream(callback=got)
        try:
            client.async_stream_infer("repeat", [_repeat_input(200)], request_id="long")
            got.take(3)  # it is streaming
            proxy.reset()  # the backend's connections die mid-stream
            deadline = time.monotonic() + 10
            error = None
            while error is None and time.monotonic() < deadline:
                _, error = got.items.get(timeout=10)
        finally:
            client.stop_stream()
    assert isinstance(error, InferenceServerException)
    assert "UNAVAILABLE" in str(error.status()) and "stream ended" in str(error)
