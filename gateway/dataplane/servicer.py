"""The Open Inference Protocol (KServe v2) gRPC service the gateway exposes.

Built on the servicer base class tritonclient ships, so the process holds one definition of the
`inference` protocol and stock Triton/KServe clients work unchanged. ModelInfer goes through the
layered request path; the other RPCs answer from the route table and the chosen backend.
"""

from __future__ import annotations

import logging
import time
import traceback

import grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

import gateway
from gateway.dataplane.layers.validation import MAX_VERSION_BYTES, check_name
from gateway.dataplane.pipeline import InferCall, InferResult, InferService
from gateway.dataplane.streaming import StreamRelay
from gateway.errors import GatewayError, invalid, shown
from gateway.observability import logs, tracing

log = logging.getLogger(__name__)

DEGRADED_HEADER = "x-tensorgate-degraded"
CACHE_HEADER = "x-tensorgate-cache"
_CACHE_HIT = ((CACHE_HEADER, "hit"),)
METADATA_TIMEOUT_S = 10.0


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime, infer: InferService) -> None:
        self._runtime = runtime  # gateway.app.Runtime: live route table, adapters, readiness
        self._infer = infer

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self._runtime.readiness.ready)

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name="tensorgate", version=gateway.__version__)

    async def ModelReady(self, request, context):
        try:
            check_name("name", request.name)
            check_name("version", request.version, MAX_VERSION_BYTES)
        except GatewayError as err:
            code, message, _ = _failure(err)
        else:
            return await self._model_ready(request)
        await context.abort(code, message)

    async def _model_ready(self, request) -> oip.ModelReadyResponse:
        plan = self._runtime.table.get(request.name)
        if plan is None:
            return oip.ModelReadyResponse(ready=False)
        if not request.version:
            return oip.ModelReadyResponse(ready=self._runtime.readiness.route_ready(plan.model))
        for target in plan.candidates(request.version):
            adapter = self._runtime.adapters[target.backend]
            if await adapter.ready(target.backend_model, target.backend_version):
                return oip.ModelReadyResponse(ready=True)
        return oip.ModelReadyResponse(ready=False)

    def _primary(self, request):
        """The route, its primary variant for the requested version, and that variant's adapter:
        metadata requests get one stable answer, not a weighted pick."""
        if not request.name:
            raise invalid("name is required: the public model name")
        check_name("name", request.name)
        check_name("version", request.version, MAX_VERSION_BYTES)
        plan = self._runtime.table.plan(request.name)
        target = plan.primary(request.version)
        return plan, target, self._runtime.adapters[target.backend]

    async def ModelMetadata(self, request, context):
        try:
            plan, target, adapter = self._primary(request)
            if target.schema is not None:
                reply = _schema_metadata(target.schema)
            else:
                reply = await adapter.metadata(
                    target.backend_model,
                    target.backend_version,
                    timeout=_timeout(context),
                    target=target,
                )
                _public_names(reply, target)
        except GatewayError as err:
            code, message, _ = _failure(err)
        else:
            reply.name = plan.model
            del reply.versions[:]
            reply.versions.extend(plan.versions)
            context.set_trailing_metadata(target.trailers)
            return reply
        await context.abort(code, message)

    async def ModelConfig(self, request, context):
        try:
            plan, target, adapter = self._primary(request)
            reply = await adapter.model_config(
                target.backend_model,
                target.backend_version,
                timeout=_timeout(context),
                target=target,
            )
        except GatewayError as err:
            code, message, _ = _failure(err)
        else:
            reply.config.name = plan.model
            context.set_trailing_metadata(target.trailers)
            return reply
        await context.abort(code, message)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request on the stream is routed on its own (gateway/dataplane/streaming.py)."""
        route_key, _ = _metadata_values(
            context.invocation_metadata(), self._runtime.route_key_header
        )
        relay = StreamRelay(self._runtime, route_key, context.time_remaining(), self._infer)
        try:
            async for reply in relay.run(request_iterator):
                yield reply
        except GatewayError as err:
            code, message, _ = _failure(err)
        else:
            return
        await context.abort(code, message)

    async def ModelStatistics(self, request, context):
        """Per public model and version, from the gateway's own counts of the calls it
        answered: inference_count and success are OK answers, fail the others, execution_count
        the backend calls behind them (retries and hedges included, cache hits excluded),
        cache_hit the answers from the response cache. Queue and compute phases are the
        backends' and are not measured here (zero)."""
        try:
            check_name("name", request.name)
            check_name("version", request.version, MAX_VERSION_BYTES)
            if request.name:
                self._runtime.table.plan(request.name)  # NOT_FOUND naming the known models
        except GatewayError as err:
            code, message, _ = _failure(err)
        else:
            reply = oip.ModelStatisticsResponse()
            for (model, version), counts in sorted(self._runtime.recent.models.items()):
                if request.name and model != request.name:
                    continue
                if request.version and version != request.version:
                    continue
                if self._runtime.table.get(model) is None:
                    continue  # a route removed since
                stats = reply.model_stats.add(
                    name=model,
                    version=version,
                    last_inference=counts.last_inference_ms,
                    inference_count=counts.success,
                    execution_count=counts.executions,
                )
                infer = stats.inference_stats
                infer.success.count, infer.success.ns = counts.success, counts.success_ns
                infer.fail.count, infer.fail.ns = counts.fail, counts.fail_ns
                infer.cache_hit.count, infer.cache_hit.ns = counts.cache_hits, counts.cache_hit_ns
            return reply
        await context.abort(code, message)

    async def RepositoryIndex(self, request, context):
        """The public models (routes), one entry per public version (or one unversioned), with
        READY / UNAVAILABLE from the gateway's health checks; `ready`: only the ready ones."""
        readiness = self._runtime.readiness
        reply = oip.RepositoryIndexResponse()
        for plan in self._runtime.table:
            ready = readiness.route_ready(plan.model)
            if request.ready and not ready:
                continue
            state = "READY" if ready else "UNAVAILABLE"
            reason = "" if ready else "no variant or fallback can answer (backend health checks)"
            for version in plan.versions or ("",):
                reply.models.add(name=plan.model, version=version, state=state, reason=reason)
        return reply

    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        remaining = context.time_remaining()
        metadata = context.invocation_metadata()
        route_key, sent_id = _metadata_values(metadata, self._runtime.route_key_header)
        fields = logs.CallFields(logs.request_id(sent_id), request.model_name)
        token = logs.current.set(fields)
        try:
            with tracing.server_span(metadata, request.model_name, request.model_version) as span:
                call = InferCall(
                    request=request,
                    model=request.model_name,
                    version=request.model_version,
                    route_key=route_key,
                    deadline=None if remaining is None else time.monotonic() + remaining,
                )
                try:
                    result = await self._infer(call)
                except GatewayError as err:
                    code, message, failed = _failure(err)
                except Exception as err:
                    # A bug of ours must not surface as UNKNOWN with a stack trace in it.
                    log.exception("ModelInfer failed for model %s", shown(call.model))
                    code, message, failed = _failure(
                        err, GatewayError(grpc.StatusCode.INTERNAL, "internal gateway error")
                    )
                else:
                    target = result.target
                    fields.variant, fields.backend, fields.code = (
                        target.variant, target.backend, "OK",
                    )  # fmt: skip
                    tracing.finish(span, code="OK", variant=target.variant, backend=target.backend)
                    return self._answer(result, context, fields.request_id)
                fields.code = code.name
                trailers = ((logs.REQUEST_ID, fields.request_id),)
                if failed is not None:
                    fields.variant, fields.backend = failed.variant, failed.backend
                    trailers = (*failed.trailers, *trailers)
                tracing.finish(span, code=code.name, variant=fields.variant,
                               backend=fields.backend, message=message)  # fmt: skip
                context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        finally:
            if logs.sampled():
                fields.duration_ms = (time.perf_counter() - started) * 1000
                logs.access(fields)
            logs.current.reset(token)

    def _answer(self, result: InferResult, context, request_id: str):
        headers = (*result.target.trailers, (logs.REQUEST_ID, request_id))
        if result.degraded:
            headers += ((DEGRADED_HEADER, result.degraded),)
        if result.cached:
            headers += _CACHE_HIT
        # Trailing metadata rides with the status in the same batch; a separate
        # send_initial_metadata costs a gRPC op per call (~10% of the gateway's CPU, measured in
        # docs/benchmarks.md).
        context.set_trailing_metadata(headers)
        return result.response


def _failure(raised: BaseException, answer: GatewayError | None = None) -> tuple:
    """(code, message, target that failed or None) to abort with for `raised` (or `answer`),
    after clearing the locals of every frame its traceback holds. Otherwise an exception kept in
    a layer's local (fallback's primary error, hedge's errors) closes a cycle through its own
    traceback (exception -> frames -> request), and a rejected 40 MiB request stays resident
    until the cycle collector happens to run. Plain values, not the exception, for the same
    reason (a local holding it would close a cycle through the caller's frame); and abort is
    called outside the `except` block so the abort exception has no __context__ to hold either.

    Aborting (not set_code + return) matters: only a raised abort gives a trailers-only
    response, which is where Envoy and other proxies read grpc-status to decide on retries."""
    answer = answer or raised
    error: BaseException | None = raised
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__context__
    return answer.code, answer.message, getattr(answer, "target", None)


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


def _metadata_values(metadata, route_key_header: str) -> tuple[str | None, str | None]:
    """(route key, caller's request id) from the call's metadata, in one pass."""
    route_key = request_id = None
    for key, value in metadata or ():
        if key == route_key_header:
            route_key = value or None
        elif key == logs.REQUEST_ID:
            request_id = value
    return route_key, request_id


def _timeout(context) -> float:
    remaining = context.time_remaining()
    return METADATA_TIMEOUT_S if remaining is None else min(remaining, METADATA_TIMEOUT_S)
