"""ModelStreamInfer: the bidirectional stream, each request routed and answered on its own.

Each request on the caller's stream is routed on its own (its model_name and model_version, the
stream's route key, and the variants health checks or a drain put down, as ModelInfer routes).
Then one of two things happens, by what the chosen model is:

- **It answers once** (not decoupled, by its ModelConfig; or its backend has no streams: TF
  Serving, TorchServe, an OIP server): the request goes through ModelInfer's own path, the unary
  chain, so every layer of the route (schema, cache, batching, retries, fallback, shadow, drift,
  the route's timeout, breakers) applies exactly as for a unary call, by the same code; its
  answer, or its refusal as `error_message`, is written to the stream. One policy, one reading:
  tests/test_path_conformance.py runs every scenario on both. At most MAX_SINGLE_ANSWER_PENDING
  of them are in flight per caller stream.
- **It is decoupled** (0..N answers per request, which only a stream can carry): the request is
  written on a stream this relay keeps open for that backend model: one backend stream per
  (backend, backend model), opened on first use. Never one per backend: Triton 2.51 aborts
  (`ASSERTION FAILED: !byte_buffer->Valid()`, every model on it gone) when one stream carries
  both a decoupled model and a non-decoupled one. At most MAX_BACKEND_STREAMS are open per caller
  stream; one more is needed only when that many are busy (an idle one is closed to make room),
  and that request is refused in the stream with RESOURCE_EXHAUSTED naming the limit. The
  route's per-answer policies (cache, batching, retries, hedging, fallback, shadow, drift) have
  no meaning for a stream of answers and do not apply to it (docs/streaming.md).

Requests go out under the relay's own ids, so every response finds its way back: the caller's
id and the public model name and version are put back before it is written to the caller.
Responses to one request keep their order (one backend stream carries them in order). A
decoupled model sends 0..N responses per request and then only a flag, which Triton turns into a
response (an empty one, `triton_final_response` true) only when the request sets
`triton_enable_empty_final_response`: the relay sets it on every request it forwards (the
adapter's `stream_request`), since the final response is what releases the request's slot, and
drops that empty response unless the caller's own request asked for it. So a stock client sees
what Triton would send it directly. (One response cannot be told from that empty one: a model's
own final response with no outputs, no error and no parameters; it is dropped too.) Triton flags
every response it sends on a stream with `triton_final_response`, non-decoupled ones true; a
response without the flag (Triton's refusal before running the request) is final.

Bounds, per caller stream: MAX_PENDING requests in flight. Answers queued for the caller
(refusals included): at most MAX_QUEUED_ANSWERS and MAX_QUEUED_BYTES (plus one answer, which may
be larger). When a bound is reached the relay stops reading (the caller's stream; with the queue
full, the backend streams too) until answers come back or the caller reads: gRPC flow control then
holds the senders back, the backends included, instead of the gateway buffering for a caller that
does not read.

Failures: a request the gateway refuses (malformed as ModelInfer would refuse it: no inputs,
duplicate or unnamed inputs, contents that do not fit the shape, oversized names; an unknown
model or version, a parameter off the allowlist, a backend whose breaker is open, too many
backend streams busy) is answered in the stream with `error_message`,
as Triton answers a request it cannot run, and the stream goes on. Errors Triton sends that way
pass through. A backend stream that breaks (the backend died or closed it) ends the caller's
stream with UNAVAILABLE: the requests in flight on it are lost, and the caller must know.
Deadlines: the caller's deadline bounds every backend stream. Per request: the call is counted
in the gateway's metrics (model, variant, backend, code) when its final response arrives, and a
breaker that is open refuses new requests to its backend. docs/streaming.md says this for users.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2 as oip

from gateway.dataplane.identity import ANONYMOUS, Caller
from gateway.dataplane.layers.validation import check_structure
from gateway.dataplane.pipeline import InferCall, InferService
from gateway.errors import GatewayError, shown
from gateway.observability import tracing
from gateway.observability.metrics import UNROUTED

log = logging.getLogger(__name__)

FINAL = "triton_final_response"
ASK_FINAL = "triton_enable_empty_final_response"
# Requests in flight on one caller's stream: beyond it the relay stops reading the caller's
# stream until final answers come back.
MAX_PENDING = 1024
# Backend streams one caller's stream may hold open (one per backend model it uses).
MAX_BACKEND_STREAMS = 16
# Requests of one caller's stream in flight through the unary chain (models that answer once).
# Each holds its answer until the caller's queue has room, so this also bounds what a caller
# that does not read can make the gateway hold. (On a backend stream Triton 2.51 segfaults, in
# TRITONSERVER_InferenceRequestDelete, when hundreds of such requests are in flight on one stream
# to a dynamically batched model: measured, 64 still crashed it, 8 never did. They no longer go on
# backend streams at all.)
MAX_SINGLE_ANSWER_PENDING = 8
# Answers waiting for a caller that reads slowly (or never): a bound on what one stream can make
# the gateway hold, whatever its requests and the backends' answers.
MAX_QUEUED_ANSWERS = 256
MAX_QUEUED_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class _Pending:
    caller_id: str
    model: str
    version: str
    target: object
    stream: _BackendStream
    wants_final: bool  # the caller asked for the empty final response itself
    started: float


class _BackendStream:
    __slots__ = ("backend", "call", "pending", "reader")

    def __init__(self, relay: StreamRelay, backend: str, call) -> None:
        self.backend = backend
        self.call = call
        self.pending = 0  # requests on it without their final response yet
        self.reader = asyncio.create_task(relay._read(self), name=f"stream-read-{backend}")


class _Outbox:
    """Answers waiting for the caller to read them, bounded by count and bytes. A producer waits
    for room before it queues, so while the caller does not read nothing else is read either."""

    __slots__ = ("_bytes", "_closed", "_items", "_ready", "_room")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._closed = False
        self._ready = asyncio.Event()  # an item is queued, or the box closed
        self._room = asyncio.Event()  # set while not full
        self._room.set()

    def _full(self) -> bool:
        return len(self._items) >= MAX_QUEUED_ANSWERS or self._bytes >= MAX_QUEUED_BYTES

    async def room(self) -> None:
        # Re-checked after each wake-up: several producers may wake for one free place.
        while self._full():
            await self._room.wait()

    async def put(self, reply, size: int) -> None:
        await self.room()
        if self._closed:
            return  # the stream is ending: nobody will read it
        self._items.append((reply, size))
        self._bytes += size
        if self._full():
            self._room.clear()
        self._ready.set()

    async def get(self):
        """The next answer; None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        reply, size = self._items.popleft()
        self._bytes -= size
        if not self._full():
            self._room.set()
        return reply

    def close(self) -> None:
        self._closed = True
        self._ready.set()


class StreamRelay:
    def __init__(
        self,
        runtime,
        route_key: str | None,
        timeout: float | None,
        infer: InferService,
        caller: Caller = ANONYMOUS,
    ) -> None:
        self._runtime = runtime
        self._caller = caller
        self._route_key = route_key
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._infer = infer  # the unary chain (ModelInfer's path)
        self._chained: set[asyncio.Task] = set()
        self._chain_slots = asyncio.Semaphore(MAX_SINGLE_ANSWER_PENDING)
        self._out = _Outbox()
        self._streams: dict[tuple[str, str], _BackendStream] = {}  # open for writing
        self._opened: list[_BackendStream] = []  # every one, closed ones too, for the teardown
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._slots = asyncio.Semaphore(MAX_PENDING)  # one per request in flight
        self._broken: GatewayError | None = None
        self._settled = asyncio.Event()  # set when a request got its final answer

    async def run(self, requests):
        """Yields the responses for the caller's `requests` (an async iterator)."""
        writer = asyncio.create_task(self._write_all(requests), name="stream-write")
        try:
            while (item := await self._out.get()) is not None:
                yield item
            if self._broken is not None:
                raise self._broken
            await writer  # re-raise what reading the caller's stream raised, if anything
        finally:
            writer.cancel()
            for stream in self._opened:
                stream.reader.cancel()
                stream.call.cancel()
            for task in self._chained:
                task.cancel()
            await asyncio.gather(
                writer,
                *(s.reader for s in self._opened),
                *self._chained,
                return_exceptions=True,
            )

    # --- caller -> backends ------------------------------------------------------------------

    async def _write_all(self, requests) -> None:
        try:
            async for request in requests:
                await self._out.room()  # a caller that does not read is not read either
                await self._slots.acquire()
                try:
                    await self._write(request)
                except GatewayError as err:
                    self._slots.release()
                    await self._refuse(request, err)
            for stream in self._streams.values():
                await self._done_writing(stream)
            await asyncio.gather(*self._chained, return_exceptions=True)
            await self._drained()
        finally:
            self._out.close()

    async def _drained(self) -> None:
        while self._pending and self._broken is None:
            self._settled.clear()
            await self._settled.wait()

    async def _write(self, request: oip.ModelInferRequest) -> None:
        runtime = self._runtime
        # The same checks as ModelInfer's validation layer (each message's size was checked on
        # the wire by the intake).
        check_structure(request, max_inputs=runtime.config.limits.max_inputs)
        access = self._authorized(request) if runtime.gate.enabled else None
        plan = runtime.table.plan(request.model_name)
        target = plan.resolve(request.model_version, self._route_key, runtime.readiness.down)
        adapter = runtime.adapters[target.backend]
        if not (hasattr(adapter, "stream") and await self._decoupled(adapter, target)):
            # One answer per request: the unary chain runs it, so every layer of the route
            # applies exactly as for ModelInfer (one policy, one reading).
            await self._chain_slots.acquire()
            task = asyncio.create_task(self._through_chain(request), name="stream-chained")
            self._chained.add(task)
            task.add_done_callback(self._chained.discard)
            return
        if access is not None and access.limits:
            # Calls/s and bytes/s as for ModelInfer; not max_concurrent: a relayed request's
            # answers may take long, and the stream's own bounds (MAX_PENDING) hold it.
            call = InferCall(request, request.model_name, request.model_version,
                             self._route_key, caller=self._caller)  # fmt: skip
            runtime.gate.leave(await runtime.gate.admit(access, call))
        breaker = runtime.breakers.get(target.backend)
        if breaker is not None and breaker.state == "open":
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE,
                f"backend {target.backend!r} unavailable: its circuit breaker is open",
            )
        backend_id = str(next(self._ids))
        body = adapter.stream_request(request, target, backend_id)
        key = (target.backend, target.backend_model)
        stream = self._streams.get(key)
        if stream is None:
            stream = await self._open(key, adapter)
        asked = request.parameters.get(ASK_FINAL)
        self._pending[backend_id] = _Pending(
            request.id,
            plan.model,
            request.model_version,
            target,
            stream,
            asked is not None and asked.bool_param,
            time.perf_counter(),
        )
        stream.pending += 1
        try:
            await stream.call.write(body)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            self._pending.pop(backend_id, None)
            stream.pending -= 1
            self._break(stream, err)

    def _authorized(self, request: oip.ModelInferRequest):
        """The route's access rules once this stream's caller may send `request` (the same
        refusal as ModelInfer's, before anything reveals whether the model exists)."""
        call = InferCall(request, request.model_name, request.model_version, self._route_key,
                         caller=self._caller)  # fmt: skip
        return self._runtime.gate.authorized(self._runtime.table.get(request.model_name), call)

    async def _decoupled(self, adapter, target) -> bool:
        """Whether the model answers 0..N times (its description, shared with the schema layer);
        False when the backend cannot say within 5 s: it then answers the request itself."""
        spec = await self._runtime.specs.backend(adapter, target, wait=5.0)
        return spec is not None and spec.decoupled

    async def _open(self, key: tuple[str, str], adapter) -> _BackendStream:
        if len(self._streams) >= MAX_BACKEND_STREAMS:
            idle = next((k for k, s in self._streams.items() if not s.pending), None)
            if idle is None:
                raise GatewayError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this stream has requests in flight to {MAX_BACKEND_STREAMS} backend models "
                    f"(MAX_BACKEND_STREAMS = {MAX_BACKEND_STREAMS}, one backend stream each): "
                    "wait for their answers, or open another stream",
                )
            await self._done_writing(self._streams.pop(idle))
        call = adapter.stream(timeout=self._timeout, metadata=tracing.outgoing())
        stream = self._streams[key] = _BackendStream(self, key[0], call)
        self._opened.append(stream)
        return stream

    @staticmethod
    async def _done_writing(stream: _BackendStream) -> None:
        try:
            await stream.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream already ended: its reader reports how

    async def _through_chain(self, request: oip.ModelInferRequest) -> None:
        """One request through ModelInfer's path (it counts the call in the metrics), its answer
        or refusal written to the caller's stream as Triton would write it."""
        call = InferCall(
            request=request,
            model=request.model_name,
            version=request.model_version,
            route_key=self._route_key,
            deadline=self._deadline,
            caller=self._caller,
        )
        try:
            result = await self._infer(call)
        except GatewayError as err:
            reply = _refusal(request, err.message)
        except Exception:
            log.exception("ModelStreamInfer: the unary chain failed for %s", shown(call.model))
            reply = _refusal(request, "internal gateway error")
        else:
            reply = oip.ModelStreamInferResponse()
            reply.infer_response.CopyFrom(result.response)  # a cached answer is shared
            reply.infer_response.id = request.id
        finally:
            self._chain_slots.release()
            self._slots.release()
        await self._out.put(reply, reply.ByteSize())

    async def _refuse(self, request: oip.ModelInferRequest, err: GatewayError) -> None:
        reply = _refusal(request, err.message)
        self._count(request.model_name, None, err.code.name, 0.0, known=False)
        await self._out.put(reply, reply.ByteSize())

    # --- backends -> caller ------------------------------------------------------------------

    async def _read(self, stream: _BackendStream) -> None:
        pending_by_id = self._pending
        out = self._out
        try:
            async for size, reply in stream.call:
                response = reply.infer_response
                backend_id = response.id
                pending = pending_by_id.get(backend_id)
                if pending is None:
                    log.debug("stream: a response for unknown id %r", backend_id[:32])
                    continue
                flag = response.parameters.get(FINAL)
                final = flag is None or flag.bool_param
                if not (
                    final
                    and not pending.wants_final
                    and not response.outputs
                    and not reply.error_message
                    and len(response.parameters) == 1
                ):  # else: the empty final response only the relay asked for
                    response.id = pending.caller_id
                    response.model_name = pending.model
                    response.model_version = pending.target.version or pending.version
                    await out.put(reply, size)
                if final:
                    self._settle(backend_id, pending, reply.error_message)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED or stream.pending:
                self._break(stream, err)
            return
        if stream.pending:  # the backend closed its stream with requests unanswered
            self._break(stream, None)

    def _settle(self, backend_id: str, pending: _Pending, error: str) -> None:
        if self._pending.pop(backend_id, None) is None:
            return  # the stream broke meanwhile: counted there
        pending.stream.pending -= 1
        self._slots.release()
        self._settled.set()
        seconds = time.perf_counter() - pending.started
        self._count(pending.model, pending.target, "INTERNAL" if error else "OK", seconds,
                    known=True)  # fmt: skip

    def _break(self, stream: _BackendStream, err: grpc.aio.AioRpcError | None) -> None:
        if self._broken is not None:
            return
        detail = f"{err.code().name}: {err.details()}" if err is not None else "closed early"
        self._broken = GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            f"backend {stream.backend!r} stream ended ({detail}); {stream.pending} request(s) "
            "in flight on it got no final response",
        )
        for pending in self._pending.values():
            self._count(pending.model, pending.target, "UNAVAILABLE",
                        time.perf_counter() - pending.started, known=True)  # fmt: skip
        self._pending.clear()
        self._settled.set()
        self._out.close()

    def _count(self, model: str, target, code: str, seconds: float, *, known: bool) -> None:
        metrics = self._runtime.metrics
        if not known and self._runtime.table.get(model) is None:
            model = UNROUTED  # as the observe layer labels it: callers cannot create series
        variant = target.variant if target is not None else ""
        backend = target.backend if target is not None else ""
        metrics.observe(model, variant, backend, code, seconds)


def _refusal(request: oip.ModelInferRequest, message: str) -> oip.ModelStreamInferResponse:
    reply = oip.ModelStreamInferResponse(error_message=message)
    reply.infer_response.id = request.id
    reply.infer_response.model_name = request.model_name
    reply.infer_response.model_version = request.model_version
    return reply
