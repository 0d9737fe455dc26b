"""The TorchServe adapter's transport (adapters/http1.py: httpx on asyncio protocols and
httptools) against real sockets: small HTTP servers that answer in pieces, chunked or framed by
the end of the connection, and that misbehave on purpose (silence, resets, early closes, garbage,
extra bytes). The adapter's whole call against a real TorchServe: tests/test_torchserve_calls.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time

import httpx
import pytest

from adapters.http1 import HTTP1Transport

OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


class Server:
    """An HTTP server on 127.0.0.1 that reads one request head (and its Content-Length body) at
    a time and lets `answer(request, writer)` reply, or not. Counts connections."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_peer += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if await self.answer(request, writer) is False:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


async def ok(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(OK_ANSWER)
    await writer.drain()


def client(**limits) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=HTTP1Transport(limits=httpx.Limits(**limits)), timeout=5)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_keep_alive_reuses_connections_and_sends_the_request_as_built():
    async with Server(ok) as server, client() as http:
        for _ in range(30):
            reply = await http.post(
                f"{server.url}/predictions/m/1?q=1", content=b'{"a": 1}', headers={"X-Trace": "t"}
            )
            assert reply.status_code == 200 and reply.json() == {}
            assert reply.reason_phrase == "OK" and reply.http_version == "HTTP/1.1"
        assert server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /predictions/m/1?q=1 HTTP/1.1\r\n")
        assert (
            b"\r\nX-Trace: t" in head and b"\r\nContent-Length: 8" in head and body == b'{"a": 1}'
        )
        for _ in range(5):  # 16 in flight: at most 16 connections, kept and reused
            replies = await asyncio.gather(*(http.get(f"{server.url}/x") for _ in range(16)))
            assert all(r.status_code == 200 for r in replies)
        assert server.connections <= 17


async def test_chunked_and_close_delimited_answers():
    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> None:
        answer = (b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b'8;ext=1\r\n{"error"\r\n9\r\n: "down"}\r\n0\r\n\r\n')  # fmt: skip
        parts = [answer[i : i + 7] for i in range(0, len(answer), 7)]
        for part in parts:  # in pieces, so the parser sees every boundary
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)

    async with Server(chunked) as server, client() as http:
        for _ in range(2):
            reply = await http.get(server.url)
            assert reply.status_code == 503 and reply.reason_phrase == "Service Unavailable"
            assert reply.json() == {"error": "down"}
        assert server.connections == 1

    async def until_close(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        writer.write(b'{"data": [1, 2]}')
        await writer.drain()
        return False  # the server closes: that ends the body

    async with Server(until_close) as server, client() as http:
        for _ in range(2):
            assert (await http.get(server.url)).json() == {"data": [1, 2]}
        assert server.connections == 2  # "Connection: close" is never reused


async def test_bytes_after_an_answer_close_the_connection_not_the_answer():
    async def chatty(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_ANSWER + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()

    async with Server(chatty) as server, client() as http:
        for _ in range(2):
            reply = await http.get(server.url)
            assert reply.status_code == 200 and reply.content == b"{}"
            await asyncio.sleep(0.05)
        assert server.connections == 2


async def test_interim_100_continue_is_skipped():
    async def interim(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_ANSWER)
        await writer.drain()

    async with Server(interim) as server, client() as http:
        assert (await http.get(server.url)).status_code == 200


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("close", httpx.RemoteProtocolError),  # closed without a word
        ("half-then-reset", httpx.ReadError),  # reset in the middle of the body
        ("half-then-close", httpx.RemoteProtocolError),  # FIN before the body is complete
        ("garbage", httpx.RemoteProtocolError),
        ("silent", httpx.ReadTimeout),
    ],
)
async def test_failures_are_httpx_errors(behaviour, error):
    async def answer(request: bytes, writer: asyncio.StreamWriter):
        if behaviour == "garbage":
            writer.write(b"SMTP ready\r\n\r\n")
        elif behaviour.startswith("half"):
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"outputs"')
            await writer.drain()
            await asyncio.sleep(0.05)
            if behaviour == "half-then-reset":
                reset(writer)
            return False
        elif behaviour == "silent":
            await asyncio.sleep(1)
        return False

    async with Server(answer) as server, client() as http:
        with pytest.raises(error):
            await http.get(server.url, timeout=0.3)


async def test_refused_connect_is_connect_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connects are refused
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/ping")


async def test_idle_connection_closed_by_the_server_is_not_reused():
    # What a TorchServe restart (or its idle timeout) does to the pool: FIN on idle connections.
    async def answer_then_close(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK_ANSWER)
        await writer.drain()
        await asyncio.sleep(0.05)
        return False

    async with Server(answer_then_close) as server, client() as http:
        for _ in range(3):
            assert (await http.get(server.url)).status_code == 200
            await asyncio.sleep(0.2)  # the FIN arrives while the connection is idle
        assert server.connections == 3


async def test_connection_reset_while_idle_is_not_reused_even_before_the_loop_sees_it():
    # A backend restarted between two calls: its RST reaches the idle connection's socket, but
    # the event loop has not run since, so only a look at the socket can tell.
    accepted: list[socket.socket] = []
    ready = threading.Event()

    def serve(listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.recv(65536)
            conn.sendall(OK_ANSWER)
            ready.set()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        async with client() as http:
            assert (await http.get(url)).status_code == 200
            ready.wait(5)
            old = accepted[0]
            old.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            old.close()  # RST
            time.sleep(0.1)  # noqa: ASYNC251  (blocks the loop: the RST arrives, unhandled)
            assert (await http.get(url)).status_code == 200
            assert len(accepted) == 2
        listener.close()
        for conn in accepted:
            conn.close()


async def test_pool_bound_and_pool_timeout():
    release = asyncio.Event()

    async def held(request: bytes, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await ok(request, writer)

    async with Server(held) as server, client(max_connections=2) as http:
        calls = [asyncio.create_task(http.get(server.url)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await http.get(server.url, timeout=httpx.Timeout(5, pool=0.2))
        waiting = asyncio.create_task(http.get(server.url))
        await asyncio.sleep(0.1)
        release.set()
        assert [r.status_code for r in await asyncio.gather(*calls, waiting)] == [200] * 3
        assert server.connections == 2


async def test_cancelled_call_closes_its_connection():
    answered = asyncio.Event()

    async def slow_first(request: bytes, writer: asyncio.StreamWriter) -> None:
        if not answered.is_set():
            answered.set()
            await asyncio.sleep(0.5)  # the caller has given up by then
        await ok(request, writer)

    async with Server(slow_first) as server, client() as http:
        call = asyncio.create_task(http.get(server.url))
        await answered.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert (await http.get(server.url)).status_code == 200
        assert server.connections == 2  # the abandoned connection's answer is never read


async def test_closed_transport_closes_idle_connections():
    async with Server(ok) as server:
        http = client()
        await http.get(server.url)
        await http.aclose()
        for _ in range(50):
            if server.closed_by_peer:
                break
            await asyncio.sleep(0.01)
        assert server.closed_by_peer == 1
