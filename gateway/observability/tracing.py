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


class _CallerContext:
    """Tracing off: the caller's trace headers are passed on to backends as they came. A slotted
    context manager, not a generator one: it is entered once per call."""

    __slots__ = ("_headers", "_token")

    def __init__(self, headers: tuple) -> None:
        self._headers = headers

    def __enter__(self) -> None:
        self._token = _incoming.set(self._headers)

    def __exit__(self, *exc) -> None:
        _incoming.reset(self._token)


def server_span(trace_headers, model: str, version: str):
    """The call's span (a child of the caller's trace context, if any), as a context manager
    giving the span, or None while tracing is off. `trace_headers`: the caller's traceparent and
    tracestate pairs, found in the same pass over the metadata as the gateway's own keys
    (gateway.dataplane.plane.metadata_values)."""
    if _tracer is None:
        usable = tuple((k, v) for k, v in trace_headers if _usable(k, v)) if trace_headers else ()
        return _CallerContext(usable)
    return _span(dict(trace_headers), model, version)


@contextlib.contextmanager
def _span(trace_headers: dict, model: str, version: str):
    parent = extract(trace_headers)
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


_NO_SPAN = contextlib.nullcontext()  # reusable: entering it keeps no state


def attempt_span(target):
    """One backend attempt's span, as a context manager giving it (None while tracing is off);
    the backend gets its context (`outgoing`)."""
    if _tracer is None:
        return _NO_SPAN
    return _attempt_span(target)


@contextlib.contextmanager
def _attempt_span(target):
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
