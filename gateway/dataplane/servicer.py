"""The Open Inference Protocol (KServe v2) gRPC service the gateway exposes.

Built on the servicer base class tritonclient ships, so the process holds one definition of the
`inference` protocol and stock Triton/KServe clients work unchanged. Transport only: each RPC
reads its fields, asks the DataPlane (plane.py) and writes the answer; every GatewayError becomes
the call's status in one place (`answers_errors`). ModelInfer keeps its own error path: it also
writes the failed variant's trailers, the access log and the trace span.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback

import grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

import gateway
from gateway.dataplane.pipeline import InferCall, InferResult
from gateway.dataplane.plane import METADATA_TIMEOUT_S, DataPlane
from gateway.errors import GatewayError, shown
from gateway.observability import logs, tracing

log = logging.getLogger(__name__)

DEGRADED_HEADER = "x-tensorgate-degraded"


def answers_errors(handler):
    """A unary RPC's GatewayError (and any bug of ours, as INTERNAL) -> its gRPC status."""

    @functools.wraps(handler)
    async def answered(self, request, context):
        try:
            return await handler(self, request, context)
        except GatewayError as err:
            code, message, _ = _failure(err)
        except Exception as err:
            log.exception("%s failed", handler.__name__)
            code, message, _ = _failure(
                err, GatewayError(grpc.StatusCode.INTERNAL, "internal gateway error")
            )
        # Outside the except block: the abort exception then holds no __context__ (_failure).
        await context.abort(code, message)

    return answered


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._infer = plane.infer

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self._plane.ready)

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name="tensorgate", version=gateway.__version__)

    @answers_errors
    async def ModelReady(self, request, context):
        caller = self._plane.identify(context)
        ready = await self._plane.model_ready(request.name, request.version, caller)
        return oip.ModelReadyResponse(ready=ready)

    @answers_errors
    async def ModelMetadata(self, request, context):
        caller = self._plane.identify(context)
        reply, trailers = await self._plane.metadata(
            request.name, request.version, _timeout(context), caller
        )
        context.set_trailing_metadata(trailers)
        return reply

    @answers_errors
    async def ModelConfig(self, request, context):
        caller = self._plane.identify(context)
        reply, trailers = await self._plane.model_config(
            request.name, request.version, _timeout(context), caller
        )
        context.set_trailing_metadata(trailers)
        return reply

    @answers_errors
    async def ModelStatistics(self, request, context):
        caller = self._plane.identify(context)
        return self._plane.statistics(request.name, request.version, caller)

    @answers_errors
    async def RepositoryIndex(self, request, context):
        caller = self._plane.identify(context)
        return self._plane.repository_index(request.ready, caller)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request on the stream is routed on its own (gateway/dataplane/streaming.py)."""
        route_key, _ = _metadata_values(context.invocation_metadata(), self._plane.route_key_header)
        try:
            caller = self._plane.identify(context)
            relay = self._plane.stream(route_key, context.time_remaining(), caller)
            async for reply in relay.run(request_iterator):
                yield reply
        except GatewayError as err:
            code, message, _ = _failure(err)
        else:
            return
        await context.abort(code, message)

    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        remaining = context.time_remaining()
        metadata = context.invocation_metadata()
        route_key, sent_id = _metadata_values(metadata, self._plane.route_key_header)
        fields = logs.CallFields(logs.request_id(sent_id), request.model_name)
        token = logs.current.set(fields)
        try:
            with tracing.server_span(metadata, request.model_name, request.model_version) as span:
                extra = ()
                try:
                    caller = self._plane.identify(context)
                    fields.caller = caller.id
                    call = InferCall(
                        request=request,
                        model=request.model_name,
                        version=request.model_version,
                        route_key=route_key,
                        deadline=None if remaining is None else time.monotonic() + remaining,
                        caller=caller,
                    )
                    result = await self._infer(call)
                except GatewayError as err:
                    extra = err.trailers
                    code, message, failed = _failure(err)
                except Exception as err:
                    # A bug of ours must not surface as UNKNOWN with a stack trace in it.
                    log.exception("ModelInfer failed for model %s", shown(request.model_name))
                    code, message, failed = _failure(
                        err, GatewayError(grpc.StatusCode.INTERNAL, "internal gateway error")
                    )
                else:
                    target = result.target
                    fields.variant, fields.backend, fields.code = (
                        target.variant, target.backend, "OK",
                    )  # fmt: skip
                    tracing.finish(span, code="OK", variant=target.variant, backend=target.backend,
                                   caller=fields.caller)  # fmt: skip
                    return self._answer(result, context, fields.request_id)
                fields.code = code.name
                trailers = ((logs.REQUEST_ID, fields.request_id), *extra)
                if failed is not None:
                    fields.variant, fields.backend = failed.variant, failed.backend
                    trailers = (*failed.trailers, *trailers)
                tracing.finish(span, code=code.name, variant=fields.variant,
                               backend=fields.backend, message=message,
                               caller=fields.caller)  # fmt: skip
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
        if result.trailers:
            headers += result.trailers
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
