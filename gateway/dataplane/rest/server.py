"""The REST listener: uvicorn's HTTP/1.1 server (httptools parser) in the gateway's own event
loop, beside the gRPC server, one per worker under `serve --workers N` (SO_REUSEPORT, as the
gRPC port). uvicorn was chosen by measurement over hypercorn and granian (docs/benchmarks.md,
"REST server"); its signal handling is not used (the gateway's own SIGTERM drain stops it).

Three things uvicorn's httptools protocol does not do, added by subclassing it:
- TCP_NODELAY on every connection (the event loop in use does not set it);
- a bound on the request head: llhttp accumulates a header of any length, so a caller could
  grow the process without limit by never ending one; past MAX_HEAD_BYTES the connection gets
  431 and is closed;
- the ASGI TLS extension: the caller's client certificate, for callers identified by
  certificate (callers.client_cert), as the gRPC listener's auth context gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
KEEP_ALIVE_S = 30  # idle keep-alive connections closed after this (uvicorn's default is 5 s)
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


class BoundedHttpTools(HttpToolsProtocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # uvicorn writes a response's head and body separately: with Nagle on, the body
            # waits for the head's ACK, which the caller delays (40 ms per call, measured).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head_bytes = 0
        self._in_head = True
        self._client_pem = _client_certificate(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._client_pem:
            self.scope["extensions"] = {"tls": {"client_cert_chain": [self._client_pem]}}

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Counted after parsing: a chunk that ends the head (the usual case, head and body in
        # one read) is never counted; only heads still open after a read add up.
        if self._in_head and self.parser is not None:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                message = b'{"error":"request head over %d bytes"}' % MAX_HEAD_BYTES
                self.transport.write(_TOO_LARGE % (len(message), message))
                self.transport.close()
                self.parser = None


def _client_certificate(transport) -> str | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der) if der else None


class RestServer:
    """One REST listener on `address` serving `app`; start() binds, stop() closes (the drain
    before it answers new calls 503 through the intake's gate)."""

    def __init__(self, app, address: str, tls=None, reuse_port: bool = False) -> None:
        """`tls`: the data plane's config Tls (cert_file, key_file, client_ca_file) or None."""
        self.address = address
        options = {}
        if tls is not None:
            options = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
            if tls.client_ca_file:
                options.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._config = uvicorn.Config(
            app,
            http=BoundedHttpTools,
            loop="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,  # the gateway's own access log covers inference calls
            server_header=False,
            timeout_keep_alive=KEEP_ALIVE_S,
            **options,
        )
        self._reuse_port = reuse_port
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    async def start(self) -> int:
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as err:
            sock.close()
            reason = err.strerror
            raise OSError(f"cannot listen on {self.address} (listeners.rest): {reason}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._config.load()
        self._server = uvicorn.Server(self._config)
        # What Server.serve() would set before startup(); serve() itself also takes over the
        # process's signals, which the gateway's drain owns.
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=[sock])
        # main_loop ticks the Date header and watches should_exit; shutdown ends it.
        self._ticker = asyncio.create_task(self._server.main_loop())
        return self.port

    async def stop(self, timeout: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        server.config.timeout_graceful_shutdown = timeout
        if self._ticker is not None:
            with contextlib.suppress(Exception):
                await self._ticker
        await server.shutdown(sockets=[self._socket] if self._socket else None)
