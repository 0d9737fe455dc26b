"""A fault-injecting TCP proxy for tests.

Sits between a client and a server (e.g. the gateway and a backend) as a plain byte pipe, and can
add latency, reset connections, black-hole traffic or refuse connects, switched at run time from
any thread. It runs its own asyncio loop on a daemon thread so that sync tests and async tests
(whose pytest-asyncio loop it must neither share nor depend on) drive it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

_CHUNK = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on with 0 s: close() sends RST instead of FIN


class _Mode(enum.Enum):
    FORWARD = "forward"
    RESET = "reset"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    task: asyncio.Task[Any] | None
    upstream: asyncio.StreamWriter | None = None


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST, so the peer sees a reset rather than an orderly shutdown."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class FaultProxy:
    """TCP proxy on 127.0.0.1:<free port> forwarding to `upstream` ("host:port"), with faults.

    Fault methods block until the proxy's loop has applied them, so when e.g. `reset()` returns,
    existing connections are already gone. They must not be called from the proxy's own thread.
    Data is read as fast as peers send it and queued without bound while held: fine for tests.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = upstream
        self._upstream = (host, int(port))
        self.port = 0  # chosen on first listen, then kept so heal() after refuse() re-listens on it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Everything below except the counters is only touched on the proxy's loop thread.
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._mode = _Mode.FORWARD
        self._latency = 0.0
        self._changed = asyncio.Event()  # set and replaced on every fault change; wakes held chunks
        # Counters are written on the loop thread and read from any thread.
        self._lock = threading.Lock()
        self._accepted = self._active = self._bytes_up = self._bytes_down = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        if self._loop is not None:
            raise RuntimeError("FaultProxy already started")
        self._loop = asyncio.new_event_loop()
        self._changed = asyncio.Event()  # an Event binds to the first loop that waits on it
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"FaultProxy->{self.upstream}", daemon=True
        )
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Deliver every chunk, in each direction, `seconds` after the proxy read it."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._call(self._apply(latency=seconds))

    def reset(self) -> None:
        """RST all connections, and every new one right after accept, until heal()."""
        self._call(self._apply(mode=_Mode.RESET))

    def blackhole(self) -> None:
        """Accept and read, but forward nothing and close nothing (a hung peer), until heal()."""
        self._call(self._apply(mode=_Mode.BLACKHOLE))

    def refuse(self) -> None:
        """Stop listening (connects get ECONNREFUSED) and RST all connections, until heal()."""
        self._call(self._apply(mode=_Mode.REFUSE))

    def heal(self) -> None:
        """Back to plain forwarding with no latency; data held by blackhole() is delivered."""
        self._call(self._apply(mode=_Mode.FORWARD, latency=0.0))

    # -- counters --------------------------------------------------------------------------------

    @property
    def connections_accepted(self) -> int:
        with self._lock:
            return self._accepted

    @property
    def active_connections(self) -> int:
        with self._lock:
            return self._active

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client -> upstream (not merely read: black-holed data is not counted)."""
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes delivered upstream -> client."""
        with self._lock:
            return self._bytes_down

    # -- loop-thread internals -------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._loop is None or threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FaultProxy is not started, or was called from its own thread")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        # asyncio's default reuse_address lets heal() rebind the port despite TIME_WAIT entries
        # left by earlier connections; reuse_port stays off so nothing else can share the port.
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_port=False
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, mode: _Mode | None = None, latency: float | None = None) -> None:
        if latency is not None:
            self._latency = latency
        if mode is not None:
            self._mode = mode
            if mode in (_Mode.RESET, _Mode.REFUSE):
                await self._abort_all()
            if mode is _Mode.REFUSE:
                if self._server is not None:
                    self._server.close()  # closes the listening socket now; no need to wait
                    self._server = None
            elif self._server is None:
                await self._listen()
        # Chunks held for latency or blackhole re-evaluate against the new settings at once.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._abort_all()

    async def _abort_all(self) -> None:
        tasks = []
        for conn in list(self._conns):
            _rst(conn.client)
            _rst(conn.upstream)
            if conn.task is not None:
                conn.task.cancel()
                tasks.append(conn.task)
        # Wait for their cleanup so the counters are settled when the fault method returns.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._accepted += 1
        if self._mode is _Mode.RESET:
            _rst(writer)
            return
        # Registered before connecting upstream so a fault applied meanwhile still aborts it.
        conn = _Conn(writer, asyncio.current_task())
        self._conns.add(conn)
        with self._lock:
            self._active += 1
        try:
            await self._pipe(conn, reader)
        except asyncio.CancelledError:
            pass  # aborted by a fault, already reset; re-raising would only make asyncio log it
        finally:
            self._conns.discard(conn)
            with self._lock:
                self._active -= 1
            writer.close()
            if conn.upstream is not None:
                conn.upstream.close()

    async def _pipe(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self._upstream)
            async with asyncio.TaskGroup() as group:
                for src, dst, up in (
                    (reader, conn.upstream, True),
                    (up_reader, conn.client, False),
                ):
                    # One FIFO per direction: reading never waits on delivery, so latency adds
                    # delay without throttling, and delivery in queue order never reorders bytes.
                    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
                    group.create_task(self._read(src, queue))
                    group.create_task(self._deliver(queue, dst, up))
        except* OSError:
            # One side reset (or upstream refused): the other side sees a reset too, as it would
            # with no proxy in between.
            _rst(conn.client)
            _rst(conn.upstream)

    @staticmethod
    async def _read(src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        while data := await src.read(_CHUNK):
            queue.put_nowait((loop.time(), data))
        queue.put_nowait((loop.time(), b""))  # EOF travels in order behind the data

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter, up: bool
    ) -> None:
        while True:
            read_at, data = await queue.get()
            await self._hold(read_at)
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()  # pass on a half-close; the other direction may go on
                return
            dst.write(data)
            await dst.drain()
            with self._lock:
                if up:
                    self._bytes_up += len(data)
                else:
                    self._bytes_down += len(data)

    async def _hold(self, read_at: float) -> None:
        """Wait until a chunk read at `read_at` is `latency` old and traffic is not black-holed."""
        loop = asyncio.get_running_loop()
        while True:
            changed = self._changed
            timeout = None
            if self._mode is not _Mode.BLACKHOLE:
                timeout = read_at + self._latency - loop.time()
                if timeout <= 0:
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
