"""What the data plane's RPCs mean, without the transport: the servicer (gRPC) and later front
doors (REST) call these and map GatewayError to their own statuses. Reads the live route table,
adapters, readiness and counts from the runtime on every call, so a route table swap applies at
once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from tritonclient.grpc import service_pb2 as oip

from gateway.dataplane.identity import ANONYMOUS, Caller
from gateway.dataplane.layers.validation import MAX_VERSION_BYTES, check_name
from gateway.dataplane.pipeline import InferCall, InferResult, InferService
from gateway.dataplane.streaming import StreamRelay
from gateway.errors import GatewayError, invalid, settled, shown
from gateway.observability import logs, tracing

log = logging.getLogger(__name__)

METADATA_TIMEOUT_S = 10.0
DEGRADED_HEADER = "x-tensorgate-degraded"
_INTERNAL = GatewayError(grpc.StatusCode.INTERNAL, "internal gateway error")


class Answer:
    """One inference call's outcome as either front door writes it: the result (None when it
    failed), the status, and the headers (gRPC trailers, REST response headers): the variant's
    identity, the request id, a degraded answer's reason, what the layers had to say."""

    __slots__ = ("code", "headers", "message", "result")

    def __init__(self, result, code, message: str, headers: tuple) -> None:
        self.result: InferResult | None = result
        self.code: grpc.StatusCode = code
        self.message = message
        self.headers = headers


def metadata_values(metadata, route_key_header: str) -> tuple[str | None, str | None, list]:
    """(route key, caller's request id, caller's trace headers) from the call's metadata, in the
    one pass over it a call makes."""
    route_key = request_id = None
    trace_headers = []
    for key, value in metadata or ():
        if key == route_key_header:
            route_key = value or None
        elif key == logs.REQUEST_ID:
            request_id = value
        elif key in tracing.TRACE_KEYS:
            trace_headers.append((key, value))
    return route_key, request_id, trace_headers


class DataPlane:
    def __init__(self, runtime, infer: InferService) -> None:
        self._runtime = runtime  # gateway.app.Runtime: live route table, adapters, readiness
        self.infer = infer  # the ModelInfer chain (gateway/app.py, Runtime.request_path)

    @property
    def ready(self) -> bool:
        return self._runtime.readiness.ready

    @property
    def route_key_header(self) -> str:
        return self._runtime.route_key_header

    async def answer(
        self,
        request: oip.ModelInferRequest,
        model: str,
        version: str,
        metadata,
        deadline: float | None,
        identify: Callable[[], Caller],
        protocol: str = "grpc",
    ) -> Answer:
        """One inference call through the request path, with its access log line and trace
        span: what ModelInfer and the REST listener's infer both do. `identify()` finds the
        caller (raising UNAUTHENTICATED), inside the call so its refusal is logged like any."""
        started = time.perf_counter()
        route_key, sent_id, trace_headers = metadata_values(
            metadata, self._runtime.route_key_header
        )
        fields = logs.CallFields(logs.request_id(sent_id), model)
        token = logs.current.set(fields)
        try:
            with tracing.server_span(trace_headers, model, version) as span:
                extra = ()
                try:
                    caller = identify()
                    fields.caller = caller.id
                    call = InferCall(request, model, version, route_key, deadline,
                                     caller=caller, protocol=protocol)  # fmt: skip
                    result = await self.infer(call)
                except GatewayError as err:
                    extra = err.trailers
                    code, message, failed = settled(err)
                except Exception as err:
                    # A bug of ours must not reach the caller with a stack trace in it.
                    log.exception("inference call failed for model %s", shown(model))
                    code, message, failed = settled(err, _INTERNAL)
                else:
                    target = result.target
                    fields.variant, fields.backend, fields.code = (
                        target.variant, target.backend, "OK",
                    )  # fmt: skip
                    tracing.finish(span, code="OK", variant=target.variant, backend=target.backend,
                                   caller=fields.caller)  # fmt: skip
                    headers = (*target.trailers, (logs.REQUEST_ID, fields.request_id))
                    if result.degraded:
                        headers += ((DEGRADED_HEADER, result.degraded),)
                    if result.trailers:
                        headers += result.trailers
                    return Answer(result, grpc.StatusCode.OK, "", headers)
                fields.code = code.name
                headers = ((logs.REQUEST_ID, fields.request_id), *extra)
                if failed is not None:
                    fields.variant, fields.backend = failed.variant, failed.backend
                    headers = (*failed.trailers, *headers)
                tracing.finish(span, code=code.name, variant=fields.variant,
                               backend=fields.backend, message=message,
                               caller=fields.caller)  # fmt: skip
                return Answer(None, code, message, headers)
        finally:
            if logs.sampled():
                fields.duration_ms = (time.perf_counter() - started) * 1000
                logs.access(fields)
            logs.current.reset(token)

    def stream(self, route_key: str | None, timeout: float | None, caller=ANONYMOUS) -> StreamRelay:
        return StreamRelay(self._runtime, route_key, timeout, self.infer, caller)

    def identify(self, context) -> Caller:
        """The call's caller (UNAUTHENTICATED when the gateway requires one it cannot find)."""
        identifier = self._runtime.identifier
        if not identifier.enabled:
            return ANONYMOUS
        return identifier.identify(context.invocation_metadata(), _Peer(context))

    def identify_from(self, headers, peer=None) -> Caller:
        """The caller of a REST call: its headers as (lower-case name, value) pairs, and its
        TLS client certificate as gRPC's auth context names it (or None)."""
        identifier = self._runtime.identifier
        if not identifier.enabled:
            return ANONYMOUS
        return identifier.identify(headers, peer)

    def _visible(self, name: str, caller: Caller):
        """The route for `name` when `caller` may call it; the same PERMISSION_DENIED as a
        ModelInfer call otherwise, whether the model exists or not (layers/access)."""
        gate = self._runtime.gate
        plan = self._runtime.table.get(name)
        if not gate.enabled:
            return plan
        gate.authorized(plan, InferCall(oip.ModelInferRequest(), name, "", caller=caller))
        return plan

    async def model_ready(self, name: str, version: str, caller=ANONYMOUS) -> bool:
        check_name("name", name)
        check_name("version", version, MAX_VERSION_BYTES)
        plan = self._visible(name, caller) if name else None
        if plan is None:
            return False
        if not version:
            return self._runtime.readiness.route_ready(plan.model)
        for target in plan.candidates(version):
            adapter = self._runtime.adapters[target.backend]
            if await adapter.ready(target.backend_model, target.backend_version):
                return True
        return False

    def _primary(self, name: str, version: str, caller: Caller):
        """The route, its primary variant for the requested version, and that variant's adapter:
        metadata requests get one stable answer, not a weighted pick."""
        if not name:
            raise invalid("name is required: the public model name")
        check_name("name", name)
        check_name("version", version, MAX_VERSION_BYTES)
        self._visible(name, caller)
        plan = self._runtime.table.plan(name)
        target = plan.primary(version)
        return plan, target, self._runtime.adapters[target.backend]

    def known(self, name: str, version: str, caller=ANONYMOUS) -> None:
        """NOT_FOUND naming what is routed unless `name` (and `version`) are; PERMISSION_DENIED
        for a model the caller may not call, as for any call."""
        self._primary(name, version, caller)

    async def metadata(self, name: str, version: str, timeout: float, caller=ANONYMOUS):
        """(ModelMetadataResponse in public names, the variant's trailers)."""
        plan, target, adapter = self._primary(name, version, caller)
        if target.schema is not None:
            reply = _schema_metadata(target.schema)
        else:
            reply = await adapter.metadata(
                target.backend_model, target.backend_version, timeout=timeout, target=target
            )
            _public_names(reply, target)
        reply.name = plan.model
        del reply.versions[:]
        reply.versions.extend(plan.versions)
        return reply, target.trailers

    async def model_config(self, name: str, version: str, timeout: float, caller=ANONYMOUS):
        """(ModelConfigResponse under the public name, the variant's trailers)."""
        plan, target, adapter = self._primary(name, version, caller)
        reply = await adapter.model_config(
            target.backend_model, target.backend_version, timeout=timeout, target=target
        )
        reply.config.name = plan.model
        return reply, target.trailers

    def statistics(self, name: str, version: str, caller=ANONYMOUS) -> oip.ModelStatisticsResponse:
        """Per public model and version, from the gateway's own counts of the calls it
        answered: inference_count and success are OK answers, fail the others, execution_count
        the backend calls behind them (retries and hedges included, cache hits excluded),
        cache_hit the answers from the response cache. Queue and compute phases are the
        backends' and are not measured here (zero)."""
        check_name("name", name)
        check_name("version", version, MAX_VERSION_BYTES)
        if name:
            self._visible(name, caller)
            self._runtime.table.plan(name)  # NOT_FOUND naming the known models
        reply = oip.ModelStatisticsResponse()
        for (model, model_version), counts in sorted(self._runtime.recent.models.items()):
            if (name and model != name) or (version and model_version != version):
                continue
            if self._runtime.table.get(model) is None or not self._may(model, caller):
                continue  # a route removed since, or one the caller may not call
            stats = reply.model_stats.add(
                name=model,
                version=model_version,
                last_inference=counts.last_inference_ms,
                inference_count=counts.success,
                execution_count=counts.executions,
            )
            infer = stats.inference_stats
            infer.success.count, infer.success.ns = counts.success, counts.success_ns
            infer.fail.count, infer.fail.ns = counts.fail, counts.fail_ns
            infer.cache_hit.count, infer.cache_hit.ns = counts.cache_hits, counts.cache_hit_ns
        return reply

    def _may(self, name: str, caller: Caller) -> bool:
        try:
            self._visible(name, caller)
        except GatewayError:
            return False
        return True

    def repository_index(self, ready_only: bool, caller=ANONYMOUS) -> oip.RepositoryIndexResponse:
        """The public models (routes), one entry per public version (or one unversioned), with
        READY / UNAVAILABLE from the gateway's health checks."""
        readiness = self._runtime.readiness
        reply = oip.RepositoryIndexResponse()
        for plan in self._runtime.table:
            ready = readiness.route_ready(plan.model)
            if (ready_only and not ready) or not self._may(plan.model, caller):
                continue
            state = "READY" if ready else "UNAVAILABLE"
            reason = "" if ready else "no variant or fallback can answer (backend health checks)"
            for version in plan.versions or ("",):
                reply.models.add(name=plan.model, version=version, state=state, reason=reason)
        return reply


def _public_names(reply: oip.ModelMetadataResponse, target) -> None:
    """Backend tensor names -> the route's public names (Variant.input_names/output_names)."""
    for tensors, names in (
        (reply.inputs, target.input_names),
        (reply.outputs, target.output_names),
    ):
        public = {b: p for p, b in names}
        for tensor in tensors:
            tensor.name = public.get(tensor.name, tensor.name)


def _schema_metadata(schema) -> oip.ModelMetadataResponse:
    """ModelMetadata from the route's declared schema (backends that cannot describe models)."""
    reply = oip.ModelMetadataResponse()
    for tensors, out in ((schema.inputs, reply.inputs), (schema.outputs, reply.outputs)):
        for t in tensors:
            out.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
    return reply


class _Peer:
    """The call's TLS peer, read only when a client certificate is needed."""

    __slots__ = ("_context",)

    def __init__(self, context) -> None:
        self._context = context

    def get(self, key, default=None):
        return (self._context.auth_context() or {}).get(key, default)
