"""ModelStreamInfer against a hostile or careless caller, through the gateway, against a real Triton
2.51 (issue 18; docs/streaming.md states what these tests hold the relay to):

- one caller alternating a dynamically batched model and a decoupled one on its stream must not
  abort tritonserver (Triton's `!byte_buffer->Valid()` assertion when one backend stream mixes
  them), nor crash it with thousands of requests to a batched model (its segfault with hundreds
  in flight on one stream); a caller's stream holds a bounded number of backend streams;
- stock tritonclient on a decoupled model sees exactly what Triton gives it directly, and the
  stream ends cleanly however many requests it carries (the relay asks Triton for the final
  response it needs and drops it unless the caller asked);
- drained variants get no stream traffic, as they get no ModelInfer traffic;
- a caller that never reads its answers cannot grow the gateway's memory: answers queued for it
  are bounded, and the gateway stops reading its requests (gRPC flow control) instead.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.backends.triton import TritonServer
from tests.conftest import DEMO_MODELS
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess, triton_backend
from tests.loadgen import metric, scrape
from tests.oip import Y_V1, Y_V2, linear_request, output

# What the gateway's RSS may grow by while a caller does not read (docs/streaming.md: the answers
# queued for one stream are bounded by MAX_QUEUED_BYTES (4 MiB) plus one answer, and
# MAX_QUEUED_ANSWERS; the rest is gRPC's flow-control windows and the allocator's slack).
RSS_GROWTH_BOUND = 48 * 1024 * 1024


def _routes() -> list[dict]:
    return [
        {"model": "repeat", "variants": [
            {"name": "only", "backend": "triton-a", "backend_model": "demo_repeat", "weight": 1}]},
        {"model": "linear", "variants": [
            {"name": "v1", "backend": "triton-a", "backend_model": "demo_linear",
             "backend_version": "1", "weight": 1}]},
        {"model": "identity", "variants": [
            {"name": "only", "backend": "triton-a", "backend_model": "demo_identity",
             "weight": 1}]},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def gateway(triton):
    with GatewayProcess({"backends": [triton_backend(triton.address)], "routes": _routes()}) as gw:
        yield gw


def repeat_request(n: int, request_id: str, *, model: str = "repeat") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.asarray([n], dtype=np.float32).tobytes())
    return request


def _repeat_input(n: float) -> tc.InferInput:
    tensor = tc.InferInput("INPUT0", [1], "FP32")
    tensor.set_data_from_numpy(np.array([n], dtype=np.float32))
    return tensor


def rss(gw: GatewayProcess) -> int:
    """Resident bytes of the gateway's processes (VmRSS)."""
    total = 0
    for pid in gw.pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


# --- 1. one caller's stream must not crash Triton ----------------------------------------------


@pytest.fixture
def own_triton(tmp_path):
    """A Triton of its own (only the two models the crash needs): if the relay lets the caller
    trigger the abort, only this one dies, not the session's."""
    repo = tmp_path / "models"
    repo.mkdir()
    for name in ("demo_linear", "demo_repeat"):
        (repo / name).symlink_to(DEMO_MODELS / name)
    with TritonServer(repo) as server:
        yield server


def test_alternating_batched_and_decoupled_models_do_not_abort_triton(own_triton):
    """The issue's sequence: 200 messages on one stream, alternating demo_linear (dynamically
    batched) and demo_repeat (decoupled, 5 answers 10 ms apart), one every 5 ms so that
    demo_linear's answers come while demo_repeat's are being written. On one backend stream this
    aborts tritonserver (measured: 4 runs of 4 through the previous relay)."""
    config = {"backends": [triton_backend(own_triton.address)], "routes": _routes()[:2]}

    def paced():
        for i in range(200):
            request = linear_request() if i % 2 == 0 else repeat_request(5, "")
            request.id = f"r{i}"
            yield request
            time.sleep(0.005)

    with GatewayProcess(config) as gw, grpc.insecure_channel(gw.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            replies = list(stub.ModelStreamInfer(paced(), timeout=60))
        except grpc.RpcError as err:
            log = own_triton.log_path.read_text(errors="replace")
            aborted = "ASSERTION FAILED" in log or not own_triton.running
            pytest.fail(f"stream failed: {err.code()} {err.details()}; Triton aborted: {aborted}")
    assert own_triton.running, "tritonserver died"
    errors = [r.error_message for r in replies if r.error_message]
    assert errors == []
    answers: dict[str, int] = {}
    for reply in replies:
        answers[reply.infer_response.id] = answers.get(reply.infer_response.id, 0) + 1
    # one answer per linear request, five per repeat request (no empty final: none was asked for)
    assert answers == {f"r{i}": 1 if i % 2 == 0 else 5 for i in range(200)}
    # Triton is still alive and still answers
    with grpc.insecure_channel(own_triton.address) as channel:
        direct = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert direct.ServerLive(oip.ServerLiveRequest(), timeout=5).live
        reply = direct.ModelInfer(linear_request("demo_linear", "1"), timeout=10)
        assert output(reply) == Y_V1


def test_many_requests_in_flight_to_a_batched_model_do_not_crash_triton(own_triton):
    """10 streams one after another, each with 5,000 demo_linear requests written as fast as the
    gateway reads them. With hundreds in flight on one backend stream Triton 2.51 segfaults (in
    TRITONSERVER_InferenceRequestDelete; measured through the previous relay: within seven such
    streams in each of 10 runs, and still 1 run in 3 with 64 in flight); the relay keeps
    MAX_SINGLE_ANSWER_PENDING in flight."""
    config = {"backends": [triton_backend(own_triton.address)], "routes": _routes()[:2]}
    sent = [linear_request() for _ in range(5000)]
    with GatewayProcess(config) as gw, grpc.insecure_channel(gw.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for round in range(10):
            try:
                replies = list(stub.ModelStreamInfer(iter(sent), timeout=60))
            except grpc.RpcError as err:
                log = own_triton.log_path.read_text(errors="replace")
                crashed = "Signal (11)" in log or not own_triton.running
                pytest.fail(f"stream {round}: {err.code()} {err.details()}; Triton died: {crashed}")
            assert len(replies) == 5000 and not any(r.error_message for r in replies)
    assert own_triton.running
    with grpc.insecure_channel(own_triton.address) as channel:
        direct = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert output(direct.ModelInfer(linear_request("demo_linear", "1"), timeout=10)) == Y_V1


def test_backend_streams_per_caller_stream_are_bounded(triton):
    """A caller's stream holds at most MAX_BACKEND_STREAMS backend streams: one more while that
    many are busy is refused in the stream naming the limit, and the stream goes on; once they
    are idle, an idle one is closed to make room. (17 backend names on one Triton: each is its
    own backend stream.)"""
    from gateway.dataplane.streaming import MAX_BACKEND_STREAMS

    count = MAX_BACKEND_STREAMS + 1
    config = {
        "backends": [triton_backend(triton.address, f"b{i}") for i in range(count)],
        "routes": [
            {"model": f"m{i}", "variants": [
                {"name": "only", "backend": f"b{i}", "backend_model": "demo_repeat",
                 "weight": 1}]}
            for i in range(count)
        ],
    }  # fmt: skip
    busy = MAX_BACKEND_STREAMS * 20  # answers of the requests keeping the backend streams busy
    idle = threading.Event()

    def requests():
        for i in range(MAX_BACKEND_STREAMS):
            yield repeat_request(20, f"busy{i}", model=f"m{i}")  # 20 answers, 10 ms apart
        yield repeat_request(1, "one-too-many", model=f"m{MAX_BACKEND_STREAMS}")
        assert idle.wait(60)
        yield repeat_request(1, "later", model=f"m{MAX_BACKEND_STREAMS}")

    replies = []
    with GatewayProcess(config) as gw, grpc.insecure_channel(gw.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for reply in stub.ModelStreamInfer(requests(), timeout=60):
            replies.append(reply)
            if len(replies) == busy + 1:
                idle.set()
    by_id: dict[str, list] = {}
    for reply in replies:
        by_id.setdefault(reply.infer_response.id, []).append(reply)
    (refused,) = by_id.pop("one-too-many")
    assert f"MAX_BACKEND_STREAMS = {MAX_BACKEND_STREAMS}" in refused.error_message
    (later,) = by_id.pop("later")
    assert not later.error_message and output(later.infer_response) == [0.0]
    assert {k: len(v) for k, v in by_id.items()} == {
        f"busy{i}": 20 for i in range(MAX_BACKEND_STREAMS)
    }
    assert all(not r.error_message for v in by_id.values() for r in v)


# --- 2. decoupled models: exactly what Triton gives directly ------------------------------------


def _stock_stream(address: str, model: str, count: int, n: int, timeout: float) -> list:
    """Stock tritonclient: start_stream + `count` x async_stream_infer(model, [n]) without
    asking for the empty final response; (result or None, error or None) per callback, collected
    until the stream is stopped (stop_stream waits for the server to end it)."""
    got: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: got.put((result, error)),
                        stream_timeout=timeout)  # fmt: skip
    try:
        for i in range(count):
            client.async_stream_infer(model, [_repeat_input(n)], request_id=f"q{i}")
    finally:
        client.stop_stream()  # done writing; returns when the server has ended the stream
        client.close()
    items = []
    while not got.empty():
        items.append(got.get())
    return items


def test_stock_tritonclient_on_a_decoupled_model_ends_cleanly(gateway, triton):
    """5 x repeat [n=2]: 10 answers and a clean end, counted OK, and the same answers as Triton
    gives directly: same count, same contents, no parameter Triton did not send."""
    labels = {"model": "repeat", "variant": "only", "backend": "triton-a", "protocol": "grpc"}
    before = scrape(gateway.metrics_url)
    via_gateway = _stock_stream(gateway.address, "repeat", 5, 2, timeout=30)
    direct = _stock_stream(triton.address, "demo_repeat", 5, 2, timeout=30)
    after = scrape(gateway.metrics_url)
    for items in (via_gateway, direct):
        assert [str(e) for _, e in items if e is not None] == []
        assert len(items) == 10

    def seen(items) -> list:
        out = []
        for result, _ in items:
            response = result.get_response()
            params = {k: (v.WhichOneof("parameter_choice"), getattr(v, v.WhichOneof(
                "parameter_choice"))) for k, v in response.parameters.items()}  # fmt: skip
            out.append((response.id, result.as_numpy("OUTPUT0").tolist(), params,
                        [o.name for o in response.outputs]))  # fmt: skip
        return sorted(out, key=lambda x: (x[0], x[1]))

    assert seen(via_gateway) == seen(direct)
    ok = metric(after, "tensorgate_requests_total", code="OK", **labels) - metric(
        before, "tensorgate_requests_total", code="OK", **labels
    )
    unavailable = metric(after, "tensorgate_requests_total", code="UNAVAILABLE", **labels)
    assert (ok, unavailable) == (5, 0)


def test_more_requests_than_max_pending_on_one_stream_all_answered(gateway):
    """1,100 decoupled requests on one stream (more than MAX_PENDING = 1,024 in flight): every one
    answered, and the stream ends cleanly, in bounded time (demo_repeat spends ~10 ms per answer
    on one instance: ~11 s of model time)."""
    started = time.monotonic()
    items = _stock_stream(gateway.address, "repeat", 1100, 1, timeout=120)
    took = time.monotonic() - started
    assert [str(e) for _, e in items if e is not None] == []
    assert sorted(r.get_response().id for r, _ in items) == sorted(f"q{i}" for i in range(1100))
    assert took < 90, took


def test_empty_final_response_passes_when_the_caller_asks(gateway):
    """A caller that asks for the empty final response gets it, flagged, as from Triton."""
    request = repeat_request(2, "asked")
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    with grpc.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter([request, repeat_request(2, "not")]), timeout=10))
    flags = [
        (r.infer_response.id, r.infer_response.parameters["triton_final_response"].bool_param,
         len(r.infer_response.outputs))
        for r in replies
    ]  # fmt: skip
    assert [f for f in flags if f[0] == "asked"] == [
        ("asked", False, 1), ("asked", False, 1), ("asked", True, 0)
    ]  # fmt: skip
    assert [f for f in flags if f[0] == "not"] == [("not", False, 1), ("not", False, 1)]


# --- 3. drains and health ---------------------------------------------------------------------


def test_a_drained_backend_gets_no_stream_traffic(triton):
    """Two variants on two backends (one Triton behind two names); drain one through the admin
    API: none of 200 stream messages reaches it (the variant shows in each answer's
    model_version and in the metrics)."""
    config = {
        "backends": [triton_backend(triton.address, "a"), triton_backend(triton.address, "b")],
        "routes": [{"model": "linear", "variants": [
            {"name": "on-a", "backend": "a", "backend_model": "demo_linear", "backend_version": "1",
             "version": "1", "weight": 1},
            {"name": "on-b", "backend": "b", "backend_model": "demo_linear", "backend_version": "2",
             "version": "2", "weight": 1},
        ]}],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with (
        GatewayProcess(config, admin=True) as gw,
        grpc.insecure_channel(gw.admin_address) as admin_channel,
        grpc.insecure_channel(gw.address) as channel,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        drained = admin.DrainBackend(
            admin_pb2.DrainBackendRequest(backend="a"),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
        ).drained
        assert list(drained) == ["a"]
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        sent = [linear_request() for _ in range(200)]
        for i, request in enumerate(sent):
            request.id = str(i)
        replies = list(stub.ModelStreamInfer(iter(sent), timeout=30))
        samples = scrape(gw.metrics_url)
    assert [r.error_message for r in replies if r.error_message] == []
    assert len(replies) == 200
    assert {r.infer_response.model_version for r in replies} == {"2"}
    assert {tuple(output(r.infer_response)) for r in replies} == {tuple(Y_V2)}
    common = {"model": "linear", "code": "OK", "protocol": "grpc"}
    assert metric(samples, "tensorgate_requests_total", variant="on-a", backend="a", **common) == 0
    assert (
        metric(samples, "tensorgate_requests_total", variant="on-b", backend="b", **common) == 200
    )


# --- 4. a caller that never reads ---------------------------------------------------------------


class _Sender:
    """Writes `messages` on a ModelStreamInfer stream from a thread (sync gRPC consumes the
    request iterator as fast as flow control lets it) while nobody reads the answers; `sent` is
    how many the transport took."""

    def __init__(self, address: str, messages, timeout: float) -> None:
        self.sent = 0
        self._channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

        def counted():
            for message in messages:
                yield message
                self.sent += 1

        self.replies = stub.ModelStreamInfer(counted(), timeout=timeout)

    def stalled(self, total: int, quiet: float, limit: float) -> int:
        """Waits until all `total` messages were taken or none was for `quiet` seconds."""
        deadline = time.monotonic() + limit
        last, last_change = -1, time.monotonic()
        while self.sent < total and time.monotonic() < deadline:
            if self.sent != last:
                last, last_change = self.sent, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                break
            time.sleep(0.1)
        return self.sent

    def read_all(self) -> list:
        try:
            return list(self.replies)
        finally:
            self._channel.close()


def _identity_request(i: int, elements: int) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="identity", id=str(i))
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[elements])
    request.raw_input_contents.append(np.arange(elements, dtype=np.int32).tobytes())
    return request


def _warm(gw: GatewayProcess) -> int:
    """One stream of each kind, so imports, channels and caches are in the baseline."""
    with grpc.insecure_channel(gw.address, options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)]) as channel:  # fmt: skip
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        warm = [_identity_request(0, 65536), repeat_request(1, "w", model="nope")] * 8
        assert len(list(stub.ModelStreamInfer(iter(warm), timeout=30))) == 16
    time.sleep(0.5)
    return rss(gw)


def _numbered(template: oip.ModelInferRequest, count: int):
    """`count` copies of `template`, with ids 0, 1, ... (made as they are sent)."""
    for i in range(count):
        request = oip.ModelInferRequest()
        request.CopyFrom(template)
        request.id = str(i)
        yield request


def test_a_caller_that_does_not_read_large_answers_cannot_grow_the_gateway(triton):
    """1,000 requests whose answers are 256 KiB each (demo_identity), answers never read: the
    gateway's RSS stays within RSS_GROWTH_BOUND (the issue measured 71 -> 328 MB); reading
    later, every answer arrives."""
    count, elements = 1000, 65536  # 256 KiB of INT32 each way
    config = {"backends": [triton_backend(triton.address)], "routes": _routes()}
    with GatewayProcess(config) as gw:
        baseline = _warm(gw)
        template = _identity_request(0, elements)
        sender = _Sender(gw.address, _numbered(template, count), timeout=120)
        sent = sender.stalled(count, quiet=3.0, limit=60.0)
        time.sleep(1.0)  # answers of what was sent arrive meanwhile
        peak = rss(gw)
        replies = sender.read_all()
        print(f"large answers: sent {sent} before reading, RSS {baseline / 2**20:.0f} -> "
              f"{peak / 2**20:.0f} MiB")  # fmt: skip
    assert [r.error_message for r in replies if r.error_message] == []
    assert len(replies) == count
    assert all(len(r.infer_response.raw_output_contents[0]) == 4 * elements for r in replies)
    assert peak - baseline < RSS_GROWTH_BOUND, (baseline, peak, sent)


def test_a_caller_that_does_not_read_refusals_cannot_grow_the_gateway(triton):
    """200,000 messages the gateway refuses (unknown model), answers never read: RSS bounded
    (the issue measured ~1.6 KB per refusal: ~320 MB); reading later, every refusal arrives."""
    count = 200_000
    config = {"backends": [triton_backend(triton.address)], "routes": _routes()}
    with GatewayProcess(config) as gw:
        baseline = _warm(gw)
        template = repeat_request(1, "", model="no-such-model")
        sender = _Sender(gw.address, _numbered(template, count), timeout=300)
        sent = sender.stalled(count, quiet=3.0, limit=120.0)
        time.sleep(1.0)
        peak = rss(gw)
        replies = sender.read_all()
        print(f"refusals: sent {sent} before reading, RSS {baseline / 2**20:.0f} -> "
              f"{peak / 2**20:.0f} MiB")  # fmt: skip
    assert len(replies) == count
    assert all("no-such-model" in r.error_message for r in replies)
    assert peak - baseline < RSS_GROWTH_BOUND, (baseline, peak, sent)
