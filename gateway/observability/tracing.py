"""Tracing with OpenTelemetry: a span per call and per backend attempt, context passed on.

The caller's W3C `traceparent` / `tracestate` (gRPC metadata) is continued: the gateway's
`ModelInfer` span is its child, and each backend attempt (the first try, retries, a hedge, a
shadow copy, a fallback step) is a child of that, named by its step, with model, variant,
backend and code attributes. The attempt's context goes on to the backend (gRPC metadata for
Triton and TF Serving, HTTP headers for TorchServe), so the backend's own spans join the trace.

Off unless observability.tracing.otlp_endpoint is set: then no span is made and the hot path
pays one context-variable write per call, which also passes a caller's trace context on to
backends unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind, Status, StatusCode

from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)

TRACE_KEYS = ("traceparent", "tracestate")

_tracer: trace.Tracer | None = None
_provider = None
# The caller's trace context, passed to backends as is while tracing is off.
_incoming: contextvars.ContextVar[tuple] = contextvars.ContextVar("tg_incoming", default=())
# What kind of attempt a backend call is: primary, retry, hedge, shadow, fallback.
_step: contextvars.ContextVar[str] = contextvars.ContextVar("tg_step", default="primary")


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_TRACESTATE = 512  # W3C Trace Context's limit


def _usable(key: str, value: str) -> bool:
    """A caller's trace header passed on to a backend only in W3C's form and size."""
    if key == "traceparent":
        return _TRACEPARENT.match(value) is not None
    return len(value) <= MAX_TRACESTATE


def enabled() -> bool:
    return _tracer is not None


def configure(tracing: config_pb2.Tracing) -> None:
    """Process-wide: an OTLP exporter when tracing.otlp_endpoint is set, else off."""
    if not tracing.otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = tracing.sample_ratio or 1.0
    provider = TracerProvider(
        resource=Resource.create({"service.name": tracing.service_name or "tensorgate"}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=tracing.otlp_endpoint, insecure=tracing.otlp_insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)
    log.info("tracing: OTLP to %s, sampling %.3g of new traces", tracing.otlp_endpoint, ratio)


def use_provider(provider) -> None:
    """Trace with `provider` (a TracerProvider; tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("tensorgate")


def shutdown() -> None:
    """Flush what is buffered (at gateway shutdown)."""
    global _tracer, _provider
    if _provider is not None:
        with contextlib.suppress(Exception):
            _provider.shutdown()
    _tracer = _provider = None


@contextlib.contextmanager
def server_span(metadata, model: str, version: str):
    """The call's span (a child of the caller's trace context, if any). Yields the span, or
    None while tracing is off (the caller's context is then passed through as is)."""
    if _tracer is None:
        incoming = tuple((k, v) for k, v in metadata or () if k in TRACE_KEYS and _usable(k, v))
        token = _incoming.set(incoming)
        try:
            yield None
        finally:
            _incoming.reset(token)
        return
    parent = extract({k: v for k, v in metadata or () if k in TRACE_KEYS})
    # Cut like log fields: the caller chose these strings (a valid name is at most 256 bytes).
    attributes = {"tensorgate.model": model[:256]}
    if version:
        attributes["tensorgate.version"] = version[:64]
    with _tracer.start_as_current_span(
        "ModelInfer", context=parent, kind=SpanKind.SERVER, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        yield span


def finish(
    span, *, code: str, variant: str = "", backend: str = "", message: str = "", caller: str = ""
) -> None:
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code", code)
    if caller:
        span.set_attribute("tensorgate.caller", caller)  # the id, never the credential
    if variant:
        span.set_attribute("tensorgate.variant", variant)
        span.set_attribute("tensorgate.backend", backend)
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, message[:200]))


@contextlib.contextmanager
def step(name: str):
    """Backend attempts made inside are `name` attempts (shadow, hedge, fallback, retry)."""
    token = _step.set(name)
    try:
        yield
    finally:
        _step.reset(token)


@contextlib.contextmanager
def attempt_span(target):
    """One backend attempt's span; the backend gets its context (`outgoing`)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(
        f"{_step.get()} {target.backend}",
        kind=SpanKind.CLIENT,
        attributes={
            "tensorgate.step": _step.get(),
            "tensorgate.model": target.model,
            "tensorgate.variant": target.variant,
            "tensorgate.backend": target.backend,
            "tensorgate.backend_model": target.backend_model,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def outgoing() -> tuple[tuple[str, str], ...]:
    """The trace context to send to a backend: the current attempt's, or the caller's."""
    if _tracer is None:
        return _incoming.get()
    carrier: dict[str, str] = {}
    inject(carrier, context=otel_context.get_current())
    return tuple(carrier.items())
