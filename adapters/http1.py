"""An httpx transport for plain HTTP/1.1 keep-alive on asyncio protocols and httptools' parser.

Why it exists: httpx's default transport (httpcore over anyio, with h11's pure-Python parser and a
pool that re-scans every waiting request on each change) cost the TorchServe adapter milliseconds
of CPU per call at 16 calls in flight (docs/benchmarks.md), far more than the backend's answer
takes. This keeps httpx's client API (Request, Response, Timeout, the exception classes the
adapter maps to gRPC codes) and replaces only the wire: one asyncio.Protocol per connection,
llhttp (the C parser uvicorn already uses, via httptools), and a LIFO pool of idle connections.

Scope, on purpose: http:// only (no TLS, no proxy tunnels, no HTTP/2, no upgrades, no HEAD);
request and response bodies are buffered whole, which is what the adapter does with them anyway.

Timeouts follow httpx's meaning: connect, write (waiting for the socket to drain), read (the
longest wait for the next bytes of the answer, not the whole answer), pool (waiting for one of
`max_connections`). Errors are httpx's: ConnectError / ConnectTimeout, WriteTimeout, ReadTimeout,
PoolTimeout, ReadError (reset), RemoteProtocolError (closed early, unparseable answer).
"""

from __future__ import annotations

import asyncio
import math
import select
import sys
import time
from collections.abc import Iterable

import httptools
import httpx

_CLOSED_EARLY = "Server disconnected without sending a response."
_CUT_SHORT = "peer closed connection without sending complete message body"


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one exchange at a time (no pipelining)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future | None = None
        self._drained: asyncio.Future | None = None
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout: float | None = None
        self._last_read = 0.0
        self._reset()

    def _reset(self) -> None:
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self._delimited = False  # Content-Length or chunked: the answer does not end at EOF
        self._received = False
        self._keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for (an idle connection, or after an answer): the framing is
            # lost, so the connection cannot be reused.
            self.close()
            return
        self._received = True
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._finish(httpx.RemoteProtocolError(f"malformed HTTP answer: {err}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_done and not self._delimited and exc is None:
            self._finish(None)  # an answer framed by the end of the connection
        elif exc is not None:
            self._finish(httpx.ReadError(f"{type(exc).__name__}: {exc}"))
        else:
            self._finish(httpx.RemoteProtocolError(_CUT_SHORT if self._received else _CLOSED_EARLY))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._waiter is not None and self._waiter.done():
            self.close()  # a second answer to one request: the framing is lost

    def on_status(self, status: bytes) -> None:
        self._reason += status  # llhttp may hand the reason phrase over in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._reset()
            return
        # llhttp forgets this once feed_data returns: read it while the answer is current.
        self._keep_alive = self._parser.should_keep_alive()
        self._finish(None)

    # the exchange
    def _finish(self, error: Exception | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
            return
        # A snapshot: bytes after the answer (which make the connection unusable) must not
        # reach the answer the caller reads.
        status = self._parser.get_status_code()
        waiter.set_result((status, self._reason, self._headers, b"".join(self._body)))

    def _check_read(self) -> None:
        # One timer per exchange, re-armed only when it fires: data_received just notes the time.
        timeout = self._read_timeout
        assert timeout is not None
        waited = self._loop.time() - self._last_read
        if waited >= timeout:
            self._finish(httpx.ReadTimeout("timed out waiting for the answer"))
        else:
            self._timer = self._loop.call_later(timeout - waited, self._check_read)

    async def exchange(
        self, message: bytes, timeouts: dict
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        """Send one request, return (status, reason, headers, body). On any exception the caller
        must close the connection: its framing is unknown."""
        if self.closed:  # lost between leaving the pool (or connecting) and this call
            raise httpx.RemoteProtocolError(_CLOSED_EARLY)
        self._reset()
        self._parser = httptools.HttpResponseParser(self)
        waiter = self._waiter = self._loop.create_future()
        assert self._transport is not None
        self._transport.write(message)
        if self._paused and not self.closed:
            self._drained = self._loop.create_future()
            try:
                async with asyncio.timeout(timeouts.get("write")):
                    await self._drained
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
        self._read_timeout = timeouts.get("read")
        if self._read_timeout is not None:
            self._last_read = self._loop.time()
            self._timer = self._loop.call_later(self._read_timeout, self._check_read)
        try:
            return await waiter
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._waiter = None

    def reusable(self) -> bool:
        return not self.closed and self._keep_alive

    def stale(self) -> bool:
        """Whether an idle connection has something to read: the peer's FIN or RST that the
        event loop has not handled yet (a restarted backend), never an answer."""
        if self.closed or self._transport is None:
            return True
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()  # not select(): file descriptors may exceed FD_SETSIZE
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class HTTP1Transport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=HTTP1Transport(limits=...))`: at most
    `limits.max_connections` requests in flight (one per connection), at most
    `limits.max_keepalive_connections` idle connections per origin kept for reuse, each for at
    most `limits.keepalive_expiry` seconds."""

    def __init__(self, *, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits()
        # None in httpx.Limits means no bound.
        self._max_idle = limits.max_keepalive_connections
        if self._max_idle is None:
            self._max_idle = limits.max_connections or sys.maxsize
        self._expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else math.inf
        self._slots = asyncio.Semaphore(limits.max_connections) if limits.max_connections else None
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"HTTP1Transport speaks plain http://, not {url.scheme!r}", request=request
            )
        if request.method == "HEAD":
            raise httpx.UnsupportedProtocol("HTTP1Transport does not send HEAD", request=request)
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        timeouts = request.extensions.get("timeout") or {}
        message = await _serialize(request)
        slots = self._slots
        if slots is not None:
            if slots.locked():
                try:
                    async with asyncio.timeout(timeouts.get("pool")):
                        await slots.acquire()
                except TimeoutError:
                    raise httpx.PoolTimeout(
                        "no connection free in the pool", request=request
                    ) from None
            else:
                await slots.acquire()
        try:
            key = (url.host, url.port or 80)
            connection = self._reuse(key) or await self._connect(key, timeouts, request)
            self._busy.add(connection)
            try:
                status, reason, headers, body = await connection.exchange(message, timeouts)
            except BaseException as err:
                connection.close()
                if isinstance(err, httpx.HTTPError):
                    err.request = request
                raise
            finally:
                self._busy.discard(connection)
            self._release(key, connection)
        finally:
            if slots is not None:
                slots.release()
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(body),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason.strip()},
        )

    def _reuse(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be stale
            if now - connection.idle_since < self._expiry and not connection.stale():
                return connection
            connection.close()
        return None

    async def _connect(self, key: tuple[str, int], timeouts: dict, request) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), key[0], key[1]
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {key[0]}:{key[1]}", request=request) from None
        except OSError as err:
            raise httpx.ConnectError(f"{type(err).__name__}: {err}", request=request) from None
        return connection

    def _release(self, key: tuple[str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or not connection.reusable() or len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()


async def _serialize(request: httpx.Request) -> bytes:
    try:
        body = request.content
    except httpx.RequestNotRead:
        body = b"".join([part async for part in request.stream])
    headers: Iterable[tuple[bytes, bytes]] = request.headers.raw
    if body and request.headers.get("transfer-encoding", "").lower() == "chunked":
        # A streamed request body, buffered: sent as one chunk, as its headers promise.
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif not body and request.headers.get("transfer-encoding", "").lower() == "chunked":
        body = b"0\r\n\r\n"
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts)
