"""What every RPC passes before its handler runs: decoding, a memory bulkhead, the shutdown gate.

grpcio decodes a request before any handler or interceptor sees it. Left alone, an undecodable
body becomes UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>" plus a traceback
in the log per call, for any unauthenticated caller; and grpcio's own server shutdown cancels
calls that reached the transport but not yet a handler, so callers get CANCELLED (not retryable)
for calls they sent before SIGTERM. `Intake` wraps each method handler as it is registered
(`Intake.register(server)` is passed where a server is expected), so all services get:

- a decoder that never raises: an undecodable message is answered INVALID_ARGUMENT
  "request is not a valid <type>", counted, and logged at most once per LOG_EVERY_S;
- a size limit checked before parsing (limits.max_request_bytes), and a byte budget for
  requests in flight (a memory bulkhead): a unary request that would take the
  bytes held by requests in flight over the budget is answered RESOURCE_EXHAUSTED before it is
  parsed, so a few callers with large bodies cannot push the process into its memory limit;
- a gate: after `close()` new calls are answered UNAVAILABLE (retryable: the caller's retry
  goes to another replica), and `quiesce()` waits for admitted calls to finish, so the server is
  only stopped when nothing is pending;
- exactly one request message on a unary call: grpcio's unary handling runs no handler and
  sends no status for a call half-closed without a message (the caller waits for its deadline,
  a drain for its whole grace), and drops a second message unseen. So a method with a unary
  request is registered as a streaming-request one (the wire is the same) and reads its
  message itself: none or several is answered INVALID_ARGUMENT at once. The cost is one more
  receive operation per call, which completes at once for a well-formed call (the message and
  the end of the stream arrive together). Measured at 16 in flight on a shared 2-core machine:
  ServerLive +26 to +44 us of gateway CPU per call (on ~270 us), ModelInfer about +15 us on
  ~900 us (runs from -33 to +47: within the noise).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable

import grpc

from gateway.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
# Quiet time with no new arrival before the server is stopped: calls that reached the transport
# but no handler yet would be cancelled by the stop, so wait until the arrivals have dried up.
QUIET_S = 0.1
# Turns of the event loop a call takes from the transport to its handler (request matched, call
# task, handler task, interceptors), with room to spare.
SETTLE_TURNS = 16


class _Rejected:
    """What the decoder hands the handler instead of a request it must not run."""

    __slots__ = ("code", "message")

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


_SHUTTING_DOWN = _Rejected(
    grpc.StatusCode.UNAVAILABLE, "tensorgate is shutting down: retry on another replica"
)
_ONE = "a unary call carries exactly one request message; got "
_NO_MESSAGE = _Rejected(
    grpc.StatusCode.INVALID_ARGUMENT, _ONE + "none (the call was closed before any message)"
)
_SEVERAL = _Rejected(
    grpc.StatusCode.INVALID_ARGUMENT, _ONE + "several (a second message followed the first)"
)
_EOF = grpc.aio.EOF


class Intake:
    def __init__(
        self, metrics: GatewayMetrics, *, max_request_bytes: int, max_in_flight_bytes: int
    ) -> None:
        self._metrics = metrics
        self._max_request = max_request_bytes
        self._budget = max_in_flight_bytes
        self.bytes_in_flight = 0
        self.calls_in_flight = 0
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_arrival = 0.0
        self._last_log = -LOG_EVERY_S
        self._unlogged = 0
        self._bytes_gauge = metrics.request_bytes_in_flight
        self._bytes_gauge.set_function(lambda: self.bytes_in_flight)

    # -- registration ---------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> _Registrar:
        """A stand-in for `server` to pass to generated add_*Servicer_to_server functions."""
        return _Registrar(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None):
        if handler is None:
            return None
        parse = handler.request_deserializer
        if parse is None:
            return handler
        message_type = _message_type(parse, method)
        if handler.request_streaming:
            return self._wrap_streaming(method, handler, parse, message_type)
        decode = self._decoder(method, parse, message_type)
        # Streaming-request handlers with no deserializer: the handler reads the raw message
        # and the end of the stream itself (see the module's docstring).
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, decode),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            self._unary(handler.unary_unary, decode),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    # -- the checks -----------------------------------------------------------------------------

    def _decoder(self, method: str, parse: Callable, message_type: str) -> Callable:
        undecodable = _Rejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {message_type}"
        )
        count = self._metrics.undecodable.labels(method)

        def decode(raw: bytes):
            size = len(raw)
            if size > self._max_request:
                return self._oversized(size)
            if self.bytes_in_flight + size > self._budget:
                return self._over_budget(size)
            try:
                return parse(raw), size
            except Exception as err:  # DecodeError, or anything a hostile body provokes
                count.inc()
                self._log_rejection(method, err)
                return undecodable

        return decode

    def _oversized(self, size: int) -> _Rejected:
        # Refused before parsing, so the body is never copied into a message.
        return _Rejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request is {size} bytes, over the gateway's limit of {self._max_request} bytes "
            "(limits.max_request_bytes)",
        )

    def _over_budget(self, size: int) -> _Rejected:
        self._metrics.memory_rejections.inc()
        return _Rejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the gateway is holding {self.bytes_in_flight} bytes of requests in flight; this "
            f"{size}-byte request would exceed limits.max_in_flight_bytes ({self._budget}): "
            "retry later or with a smaller request",
        )

    def _log_rejection(self, method: str, err: Exception) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_S:
            self._unlogged += 1
            return
        log.warning(
            "undecodable request to %s (%s)%s",
            method,
            type(err).__name__,
            f"; {self._unlogged} more since the last report" if self._unlogged else "",
        )
        self._last_log, self._unlogged = now, 0

    def _refusal(self, decoded) -> _Rejected | None:
        """Why a new call must not run, or None when it may. Refusals are answered with a raised
        abort: only that gives a trailers-only response, where proxies such as Envoy read
        grpc-status to decide on a retry (UNAVAILABLE at shutdown must be retried elsewhere)."""
        self._last_arrival = time.monotonic()
        if not self._accepting:
            return _SHUTTING_DOWN
        if type(decoded) is _Rejected:
            return decoded
        return None

    def _unary(self, behavior: Callable, decode: Callable) -> Callable:
        async def guarded(_, context):
            # Counted from the handler's start, before its message is read: a drain that saw
            # no call in flight while this one waited for its message would stop the server
            # under it (CANCELLED, which callers do not retry).
            self._last_arrival = time.monotonic()
            self.calls_in_flight += 1
            self._idle.clear()
            size = 0
            request = None
            try:
                raw = await context.read()
                if raw is _EOF:
                    await context.abort(_NO_MESSAGE.code, _NO_MESSAGE.message)
                decoded = decode(raw)
                del raw
                refusal = self._refusal(decoded)
                if refusal is not None:
                    del decoded  # not held by the abort's traceback
                    await context.abort(refusal.code, refusal.message)
                request, size = decoded
                del decoded
                self.bytes_in_flight += size
                # For a well-formed call the end of the stream came with the message: no wait.
                if await context.read() is not _EOF:
                    await context.abort(_SEVERAL.code, _SEVERAL.message)
                return await behavior(request, context)
            except grpc.aio.AbortError as aborted:
                # gRPC keeps the abort, and with it its traceback (the handler's frames and
                # this one), in the call's state, which those frames reference back through
                # `context`: a cycle that only the cycle collector frees, late. Cut the handler's
                # frames off and drop this frame's request, so its memory is freed at once.
                request = None
                raise aborted.with_traceback(None) from None
            finally:
                self.bytes_in_flight -= size
                self.calls_in_flight -= 1
                if not self.calls_in_flight:
                    self._idle.set()

        return guarded

    async def _single(self, context, decode: Callable):
        """The one request of a unary-request, streaming-response call, decoded; aborts the
        call when it must not run."""
        self._last_arrival = time.monotonic()
        raw = await context.read()
        if raw is _EOF:
            await context.abort(_NO_MESSAGE.code, _NO_MESSAGE.message)
        if await context.read() is not _EOF:
            await context.abort(_SEVERAL.code, _SEVERAL.message)
        decoded = decode(raw)
        refusal = self._refusal(decoded)
        if refusal is not None:
            await context.abort(refusal.code, refusal.message)
        return decoded[0]

    def _unary_stream(self, behavior: Callable, decode: Callable) -> Callable:
        # Long-lived streams (health Watch) are not counted as in flight: the drain would wait
        # for them forever. The server's stop grace ends them.
        if inspect.isasyncgenfunction(behavior):

            async def streamed(_, context):
                request = await self._single(context, decode)
                async for item in behavior(request, context):
                    yield item

            return streamed

        async def written(_, context):
            return await behavior(await self._single(context, decode), context)

        return written

    def _wrap_streaming(self, method, handler, parse, message_type):
        decode = self._decoder(method, parse, message_type)

        async def messages(request_iterator, context):
            async for decoded in request_iterator:
                if type(decoded) is _Rejected:
                    await context.abort(decoded.code, decoded.message)
                yield decoded[0]

        def wrap_behavior(behavior):
            if inspect.isasyncgenfunction(behavior):

                async def streamed(request_iterator, context):
                    if self._refusal(None) is not None:
                        await context.abort(_SHUTTING_DOWN.code, _SHUTTING_DOWN.message)
                    async for item in behavior(messages(request_iterator, context), context):
                        yield item

                return streamed

            async def unary(request_iterator, context):
                if self._refusal(None) is not None:
                    await context.abort(_SHUTTING_DOWN.code, _SHUTTING_DOWN.message)
                return await behavior(messages(request_iterator, context), context)

            return unary

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                wrap_behavior(handler.stream_stream),
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            wrap_behavior(handler.stream_unary),
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )

    # -- the REST front door ---------------------------------------------------------------------

    @property
    def max_request_bytes(self) -> int:
        return self._max_request

    def admit(self, size: int) -> _Rejected | None:
        """A REST call whose body has `size` bytes (gateway/dataplane/rest/): why it must not
        run (shutting down, over the memory budget), or None; an admitted call counts as in
        flight, for drains and the budget, until `release(size)`."""
        self._last_arrival = time.monotonic()
        if not self._accepting:
            return _SHUTTING_DOWN
        if size > self._max_request:
            return self._oversized(size)
        if self.bytes_in_flight + size > self._budget:
            return self._over_budget(size)
        self.bytes_in_flight += size
        self.calls_in_flight += 1
        self._idle.clear()
        return None

    def release(self, size: int) -> None:
        self.bytes_in_flight -= size
        self.calls_in_flight -= 1
        if not self.calls_in_flight:
            self._idle.set()

    # -- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """From now on, new calls are answered UNAVAILABLE."""
        self._accepting = False

    async def quiesce(self, timeout: float) -> bool:
        """Wait until no admitted call is running and no call has arrived for QUIET_S, at most
        `timeout` seconds. True when quiet was reached."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                async with asyncio.timeout(left):
                    await self._idle.wait()
            except TimeoutError:
                return False
            quiet_for = time.monotonic() - self._last_arrival
            if quiet_for >= QUIET_S and self._idle.is_set() and await self._still_quiet():
                return True
            await asyncio.sleep(min(max(QUIET_S - quiet_for, 0.01), left))

    async def _still_quiet(self) -> bool:
        """Whether the silence holds once the loop has run what is queued. After the loop was
        held up (a busy machine), the calls that reached the transport meanwhile are queued
        behind this wake-up and need a few turns of the loop to reach a handler: the quiet time
        measured before they do is not real."""
        seen = self._last_arrival
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
        return self._last_arrival == seen and self._idle.is_set()


class _Registrar:
    """Looks like a grpc.aio.Server to generated registration code; wraps every handler."""

    def __init__(self, server: grpc.aio.Server, intake: Intake) -> None:
        self._server = server
        self._intake = intake

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GenericHandler(h, self._intake) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: self._intake.wrap(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            },
        )


class _GenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, intake: Intake) -> None:
        self._inner = inner
        self._intake = intake
        self._wrapped: dict[str, object] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # not ours: the caller gets UNIMPLEMENTED, nothing is cached
            wrapped = self._wrapped[method] = self._intake.wrap(method, handler)
        return wrapped


def _message_type(parse: Callable, method: str) -> str:
    owner = getattr(parse, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else f"request for {method}"
