"""The Open Inference Protocol (KServe v2) gRPC service the gateway exposes.

Built on the servicer base class tritonclient ships, so the process holds one definition of the
`inference` protocol and stock Triton/KServe clients work unchanged. Transport only: each RPC
reads its fields, asks the DataPlane (plane.py) and writes the answer; every GatewayError becomes
the call's status in one place (`answers_errors`). ModelInfer's answer, trailers, access log and
trace span come from `DataPlane.answer`, the same as the REST front door's.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

import gateway
from gateway.dataplane.plane import METADATA_TIMEOUT_S, DataPlane, metadata_values
from gateway.errors import GatewayError, settled

log = logging.getLogger(__name__)


def answers_errors(handler):
    """A unary RPC's GatewayError (and any bug of ours, as INTERNAL) -> its gRPC status."""

    @functools.wraps(handler)
    async def answered(self, request, context):
        try:
            return await handler(self, request, context)
        except GatewayError as err:
            code, message, _ = settled(err)
        except Exception as err:
            log.exception("%s failed", handler.__name__)
            code, message, _ = settled(
                err, GatewayError(grpc.StatusCode.INTERNAL, "internal gateway error")
            )
        # Outside the except block: the abort exception then holds no __context__ (settled).
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
        route_key = metadata_values(context.invocation_metadata(), self._plane.route_key_header)[0]
        try:
            caller = self._plane.identify(context)
            relay = self._plane.stream(route_key, context.time_remaining(), caller)
            async for reply in relay.run(request_iterator):
                yield reply
        except GatewayError as err:
            code, message, _ = settled(err)
        else:
            return
        await context.abort(code, message)

    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        answer = await self._plane.answer(
            request,
            request.model_name,
            request.model_version,
            context.invocation_metadata(),
            None if remaining is None else time.monotonic() + remaining,
            lambda: self._plane.identify(context),
        )
        # Trailing metadata rides with the status in the same batch; a separate
        # send_initial_metadata costs a gRPC op per call (~10% of the gateway's CPU, measured in
        # docs/benchmarks.md).
        context.set_trailing_metadata(answer.headers)
        if answer.result is not None:
            return answer.result.response
        # Aborting (not set_code + return) matters: only a raised abort gives a trailers-only
        # response, which is where Envoy and other proxies read grpc-status to decide on
        # retries.
        await context.abort(answer.code, answer.message)


def _timeout(context) -> float:
    remaining = context.time_remaining()
    return METADATA_TIMEOUT_S if remaining is None else min(remaining, METADATA_TIMEOUT_S)
