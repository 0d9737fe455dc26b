"""The ASGI servers bench/rest.py measures against uvicorn+httptools inside the gateway
(TENSORGATE_BENCH_REST_SERVER=bench.rest_servers:<factory>), each behind RestServer's interface:
start() -> port, stop(timeout). Plain HTTP only: enough to compare CPU per
call; the gateway ships uvicorn (gateway/dataplane/rest/server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.dataplane.rest.server import RestServer


class _Polled:
    """A server that binds inside its own serve(): start() waits until the port answers."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.port = int(address.rpartition(":")[2])
        self._task: asyncio.Task | None = None

    async def _bound(self) -> int:
        host = self.address.rpartition(":")[0]
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection(host, self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return self.port
        raise OSError(f"{type(self).__name__} did not bind {self.address}")


class _Hypercorn(_Polled):
    def __init__(self, app, address: str) -> None:
        super().__init__(address)
        import hypercorn

        self._app = app
        self._config = hypercorn.Config()
        self._config.bind = [address]
        self._config.accesslog = None
        self._config.errorlog = None
        self._done = asyncio.Event()

    async def start(self) -> int:
        from hypercorn.asyncio import serve

        self._task = asyncio.create_task(
            serve(self._app, self._config, shutdown_trigger=self._done.wait, mode="asgi")
        )
        return await self._bound()

    async def stop(self, timeout: float = 5.0) -> None:
        self._done.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout)


class _Granian(_Polled):
    def __init__(self, app, address: str) -> None:
        super().__init__(address)
        from granian.constants import Interfaces
        from granian.server.embed import Server

        host = address.rpartition(":")[0]
        self._server = Server(app, address=host, port=self.port, interface=Interfaces.ASGINL,
                              log_enabled=False)  # fmt: skip

    async def start(self) -> int:
        self._task = asyncio.create_task(self._server.serve())
        return await self._bound()

    async def stop(self, timeout: float = 5.0) -> None:
        self._server.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout)


def hypercorn(app, address, tls, reuse_port):
    return _Hypercorn(app, address)


def granian(app, address, tls, reuse_port):
    return _Granian(app, address)


class _NoDelayH11(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the shipped one


def uvicorn_h11(app, address, tls, reuse_port):
    """uvicorn with its pure-Python h11 parser (bounded heads: h11_max_incomplete_event_size)."""
    server = RestServer(app, address, tls, reuse_port)
    config = server._config
    server._config = uvicorn.Config(
        app, http=_NoDelayH11, loop="none", lifespan="off", interface="asgi3", log_config=None,
        access_log=False, server_header=False, timeout_keep_alive=config.timeout_keep_alive,
    )  # fmt: skip
    return server
