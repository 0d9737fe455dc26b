"""ModelStreamInfer: the bidirectional stream, relayed to backends request by request.

Each request on the caller's stream is routed on its own (its model_name and model_version,
the stream's route key) to a variant, and written on a stream this relay keeps open to that
variant's backend (one per backend, opened on first use). Requests go out under the relay's own
ids, so every response (a decoupled model sends 0..N per request, the last flagged
`triton_final_response`) finds its way back: the caller's id and the public model name and
version are put back before it is written to the caller. Responses to one request keep their
order (one backend stream carries them in order).

Failures: a request the gateway refuses (malformed as ModelInfer would refuse it: no inputs,
duplicate or unnamed inputs, contents that do not fit the shape, oversized names; an unknown
model or version, a parameter off the allowlist, a backend whose breaker is open, a backend kind
without streams) is answered in the stream with `error_message`, as Triton answers a request it
cannot run, and the stream goes on. Errors Triton sends that way pass through. A backend stream
that breaks (the backend died or closed it) ends the caller's stream with UNAVAILABLE: the
requests in flight on it are lost, and the caller must know. Deadlines: the caller's deadline
bounds every backend stream. Per request: the call is counted in the gateway's metrics (model,
variant, backend, code) when its final response arrives, and a breaker that is open refuses new
requests to its backend.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2 as oip

from gateway import tracing
from gateway.errors import GatewayError, shown
from gateway.layers.validation import check_structure
from gateway.metrics import UNROUTED

log = logging.getLogger(__name__)

FINAL = "triton_final_response"
# Requests in flight on one caller's stream: beyond it the relay stops reading the caller's
# stream until answers come back (memory per caller is bounded).
MAX_PENDING = 1024


@dataclass(slots=True)
class _Pending:
    caller_id: str
    model: str
    version: str
    target: object
    started: float


class _BackendStream:
    def __init__(self, relay: StreamRelay, backend: str, call) -> None:
        self.backend = backend
        self.call = call
        self.reader = asyncio.create_task(relay._read(self), name=f"stream-read-{backend}")


class StreamRelay:
    def __init__(self, runtime, route_key: str | None, timeout: float | None) -> None:
        self._runtime = runtime
        self._route_key = route_key
        self._timeout = timeout
        self._out: asyncio.Queue = asyncio.Queue()
        self._streams: dict[str, _BackendStream] = {}
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._room = asyncio.Semaphore(MAX_PENDING)
        self._broken: GatewayError | None = None
        self._settled = asyncio.Event()  # set when a request got its final answer

    async def run(self, requests):
        """Yields the responses for the caller's `requests` (an async iterator)."""
        writer = asyncio.create_task(self._write_all(requests), name="stream-write")
        try:
            while True:
                item = await self._out.get()
                if item is None:
                    break
                yield item
            if self._broken is not None:
                raise self._broken
            await writer  # re-raise what reading the caller's stream raised, if anything
        finally:
            writer.cancel()
            for stream in self._streams.values():
                stream.reader.cancel()
                stream.call.cancel()
            await asyncio.gather(
                writer, *(s.reader for s in self._streams.values()), return_exceptions=True
            )

    # --- caller -> backends ------------------------------------------------------------------

    async def _write_all(self, requests) -> None:
        try:
            async for request in requests:
                await self._room.acquire()
                try:
                    await self._write(request)
                except GatewayError as err:
                    self._room.release()
                    self._refuse(request, err)
            for stream in self._streams.values():
                await stream.call.done_writing()
            await self._drained()
        finally:
            self._out.put_nowait(None)

    async def _drained(self) -> None:
        while self._pending and self._broken is None:
            self._settled.clear()
            await self._settled.wait()

    async def _write(self, request: oip.ModelInferRequest) -> None:
        runtime = self._runtime
        # The same checks as ModelInfer's validation layer (each message's size was checked on
        # the wire by the intake).
        check_structure(request, max_inputs=runtime.config.limits.max_inputs)
        plan = runtime.table.plan(request.model_name)
        target = plan.resolve(request.model_version, self._route_key)
        adapter = runtime.adapters[target.backend]
        if not hasattr(adapter, "stream"):
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"model {shown(plan.model)}: its backend {target.backend!r} has no streaming "
                "inference (ModelStreamInfer needs an Open Inference Protocol gRPC backend)",
            )
        breaker = runtime.breakers.get(target.backend)
        if breaker is not None and breaker.state == "open":
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE,
                f"backend {target.backend!r} unavailable: its circuit breaker is open",
            )
        backend_id = str(next(self._ids))
        body = adapter.stream_request(request, target, backend_id)
        stream = self._streams.get(target.backend)
        if stream is None:
            call = adapter.stream(timeout=self._timeout, metadata=tracing.outgoing())
            stream = self._streams[target.backend] = _BackendStream(self, target.backend, call)
        self._pending[backend_id] = _Pending(
            request.id, plan.model, request.model_version, target, time.perf_counter()
        )
        try:
            await stream.call.write(body)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            self._pending.pop(backend_id, None)
            self._break(target.backend, err)

    def _refuse(self, request: oip.ModelInferRequest, err: GatewayError) -> None:
        reply = oip.ModelStreamInferResponse(error_message=err.message)
        reply.infer_response.id = request.id
        reply.infer_response.model_name = request.model_name
        reply.infer_response.model_version = request.model_version
        self._count(request.model_name, None, err.code.name, 0.0, known=False)
        self._out.put_nowait(reply)

    # --- backends -> caller ------------------------------------------------------------------

    async def _read(self, stream: _BackendStream) -> None:
        try:
            async for reply in stream.call:
                self._answer(reply)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED or self._pending:
                self._break(stream.backend, err)
        except asyncio.CancelledError:
            raise
        if self._pending and any(
            p.target.backend == stream.backend for p in self._pending.values()
        ):  # the backend closed its stream with requests unanswered
            self._break(stream.backend, None)

    def _answer(self, reply: oip.ModelStreamInferResponse) -> None:
        response = reply.infer_response
        backend_id = response.id
        pending = self._pending.get(backend_id)
        if pending is None:
            log.debug("stream: a response for unknown id %r", backend_id[:32])
            return
        final = True
        flag = response.parameters.get(FINAL)
        if flag is not None and flag.WhichOneof("parameter_choice") == "bool_param":
            final = flag.bool_param
        response.id = pending.caller_id
        response.model_name = pending.model
        response.model_version = pending.target.version or pending.version
        if final:
            del self._pending[backend_id]
            self._room.release()
            self._settled.set()
            code = "OK" if not reply.error_message else "INTERNAL"
            seconds = time.perf_counter() - pending.started
            self._count(pending.model, pending.target, code, seconds, known=True)
        self._out.put_nowait(reply)

    def _break(self, backend: str, err: grpc.aio.AioRpcError | None) -> None:
        if self._broken is not None:
            return
        detail = f"{err.code().name}: {err.details()}" if err is not None else "closed early"
        lost = sum(1 for p in self._pending.values() if p.target.backend == backend)
        self._broken = GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            f"backend {backend!r} stream ended ({detail}); {lost} request(s) in flight on it "
            "got no final response",
        )
        for pending in self._pending.values():
            self._count(pending.model, pending.target, "UNAVAILABLE",
                        time.perf_counter() - pending.started, known=True)  # fmt: skip
        self._pending.clear()
        self._settled.set()
        self._out.put_nowait(None)

    def _count(self, model: str, target, code: str, seconds: float, *, known: bool) -> None:
        metrics = self._runtime.metrics
        if not known and self._runtime.table.get(model) is None:
            model = UNROUTED  # as the observe layer labels it: callers cannot create series
        variant = target.variant if target is not None else ""
        backend = target.backend if target is not None else ""
        metrics.observe(model, variant, backend, code, seconds)
