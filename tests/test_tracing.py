"""Tracing: a gateway in this process with OpenTelemetry's in-memory exporter, a real Triton
behind a recording pass-through (tests/recording_proxy.py), so the spans and what reached the
backend are both visible.

What a user tracing a slow call sees: the caller's trace continued (same trace id, the
gateway's span a child of the caller's), one span per backend attempt named by its step
(primary, retry, fallback, shadow), each with model/variant/backend/code, and the attempt's
context in the metadata Triton received. With tracing off, the caller's context still reaches
the backend unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2_grpc

from gateway.app import Gateway
from gateway.controlplane.config import from_dict
from gateway.observability import tracing
from tests.backends.triton import free_port
from tests.builders import triton_backend, variant
from tests.oip import Y_V1, linear_request, output
from tests.recording_proxy import RecordingProxy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@contextlib.asynccontextmanager
async def gateway_with(triton, proxy, *, dead: str):
    config = from_dict(
        {
            "listeners": {"data_plane": f"127.0.0.1:{free_port()}", "metrics": "off"},
            "backends": [
                triton_backend(proxy.address, "recorded"),
                triton_backend(dead, "dead", per_try_timeout="1s"),
            ],
            "routes": [
                {"model": "plain", "variants": [variant("a", backend="recorded")]},
                {
                    # primary on a dead backend: one retry on it, then the fallback variant
                    "model": "guarded",
                    "variants": [variant("down", backend="dead"), variant("up", backend="recorded", weight=0)],
                    "policy": {
                        "retry": {"max_attempts": 2, "retry_on": ["UNAVAILABLE"],
                                  "base_delay": "0.01s", "budget_ratio": 1.0},
                        "fallback": [{"variant": "up"}],
                    },
                },
                {
                    "model": "mirrored",
                    "variants": [variant("main", backend="recorded"), variant("copy", backend="recorded", weight=0)],
                    "policy": {"shadow": {"variant": "copy", "fraction": 1.0}},
                },
            ],
            "lifecycle": {"health_check_interval": "0.5s", "shutdown_grace": "1s"},
        }
    )  # fmt: skip
    gw = Gateway(config, state_dir=str(proxy.state_dir))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.shutdown()


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.fixture
def proxy(triton, tmp_path):
    recorder = RecordingProxy(triton.address)
    recorder.state_dir = tmp_path
    yield recorder
    recorder.close()


async def _call(gw, model: str, metadata=()):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer(linear_request(model), metadata=metadata, timeout=10)
        response = await call
        return response, dict(await call.trailing_metadata())


def _hex(number: int, width: int) -> str:
    return f"{number:0{width}x}"


async def test_the_callers_trace_is_continued_and_reaches_the_backend(triton, proxy, spans):
    async with gateway_with(triton, proxy, dead=f"127.0.0.1:{free_port()}") as gw:
        response, trailers = await _call(gw, "plain", (("traceparent", TRACEPARENT),))
        assert output(response) == Y_V1
    finished = {s.name: s for s in spans.get_finished_spans()}
    server, attempt = finished["ModelInfer"], finished["primary recorded"]
    # the caller's trace, the gateway's span a child of the caller's span
    assert _hex(server.context.trace_id, 32) == TRACE_ID
    assert _hex(server.parent.span_id, 16) == CALLER_SPAN
    assert server.attributes["tensorgate.model"] == "plain"
    assert server.attributes["tensorgate.variant"] == "a"
    assert server.attributes["rpc.grpc.status_code"] == "OK"
    assert attempt.parent.span_id == server.context.span_id
    assert attempt.attributes["tensorgate.backend"] == "recorded"
    # Triton got the attempt's context: same trace, parent = the attempt span
    sent = proxy.metadata[-1]["traceparent"]
    assert sent == f"00-{TRACE_ID}-{_hex(attempt.context.span_id, 16)}-01"
    # and the call's request id came back
    assert len(trailers["x-request-id"]) == 32


async def test_retries_fallback_and_shadow_are_separate_attempt_spans(triton, proxy, spans):
    async with gateway_with(triton, proxy, dead=f"127.0.0.1:{free_port()}") as gw:
        response, trailers = await _call(gw, "guarded")
        assert output(response) == Y_V1 and trailers["x-tensorgate-variant"] == "up"
        await _call(gw, "mirrored")
        await asyncio.sleep(0.5)  # the shadow copy runs after the answer
    finished = spans.get_finished_spans()
    by_trace: dict[int, list] = {}
    for span in finished:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    guarded = next(t for t in by_trace.values() if any(
        s.attributes.get("tensorgate.model") == "guarded" for s in t))  # fmt: skip
    attempts = sorted((s for s in guarded if s.name != "ModelInfer"), key=lambda s: s.start_time)
    assert [(s.name, s.attributes.get("rpc.grpc.status_code")) for s in attempts] == [
        ("primary dead", "UNAVAILABLE"),
        ("retry dead", "UNAVAILABLE"),
        ("fallback recorded", "OK"),
    ]
    root = next(s for s in guarded if s.name == "ModelInfer")
    assert all(s.parent.span_id == root.context.span_id for s in attempts)
    mirrored = next(t for t in by_trace.values() if any(
        s.attributes.get("tensorgate.model") == "mirrored" for s in t))  # fmt: skip
    names = sorted(s.name for s in mirrored)
    assert names == ["ModelInfer", "primary recorded", "shadow recorded"]
    shadow = next(s for s in mirrored if s.name == "shadow recorded")
    assert shadow.attributes["tensorgate.variant"] == "copy"


async def test_with_tracing_off_the_callers_context_still_reaches_the_backend(triton, proxy):
    assert not tracing.enabled()
    async with gateway_with(triton, proxy, dead=f"127.0.0.1:{free_port()}") as gw:
        metadata = (("traceparent", TRACEPARENT), ("tracestate", "vendor=1"))
        await _call(gw, "plain", metadata)
        await _call(gw, "plain")
    assert proxy.metadata[-2]["traceparent"] == TRACEPARENT
    assert proxy.metadata[-2]["tracestate"] == "vendor=1"
    assert "traceparent" not in proxy.metadata[-1]


async def test_with_tracing_off_a_malformed_or_oversized_trace_header_is_not_passed_on(
    triton, proxy
):
    async with gateway_with(triton, proxy, dead=f"127.0.0.1:{free_port()}") as gw:
        metadata = (("traceparent", "00-zz-not-a-trace-01"), ("tracestate", "v=" + "x" * 600))
        await _call(gw, "plain", metadata)
    assert "traceparent" not in proxy.metadata[-1]
    assert "tracestate" not in proxy.metadata[-1]
