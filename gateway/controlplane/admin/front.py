"""The admin listener's front door: one TCP port for the admin API (gRPC) and the status page
(HTTP/1.1 `GET /status`). A connection that opens with HTTP/2's preface ("PRI * HTTP/2.0") is
relayed byte for byte to the admin gRPC server on a private Unix socket; an HTTP/1.1 request is
answered here: /status to a caller with an admin-API credential (`Authorization: Bearer <token>`,
or Basic with the token as the password, which browsers can prompt for), 401 without one, 404
for any other path. With admin.tls the gRPC server listens itself and there is no status page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

_MAX_HEAD = 16 * 1024
_HEAD_TIMEOUT = 10.0


class AdminFront:
    def __init__(
        self,
        grpc_socket: str,
        authenticate: Callable[[str], object | None],
        status_page: Callable[[], Awaitable[str]],
    ) -> None:
        """`authenticate(authorization header)` returns a principal or None; `status_page()`
        renders the page."""
        self._socket = grpc_socket
        self._authenticate = authenticate
        self._status_page = status_page
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.socket = grpc_socket
        self.directory = ""  # removed on close (for_admin's private directory)

    async def bind(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        try:
            self._server = await asyncio.start_server(
                self._connection, host.strip("[]"), int(port), reuse_address=True
            )
        except OSError as err:
            raise OSError(f"cannot listen on {address} (listeners.admin): {err.strerror}") from None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self.directory:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            first = await asyncio.wait_for(reader.readexactly(3), _HEAD_TIMEOUT)
            if first == b"PRI":
                await self._relay(first, reader, writer)
            else:
                await self._http(first, reader, writer)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        except Exception:  # one connection's bug must not take the listener down
            log.exception("admin listener: connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _relay(self, first: bytes, reader, writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(self._socket)
        upstream_writer.write(first)

        async def pipe(source, sink) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                with contextlib.suppress(Exception):
                    if sink.can_write_eof():
                        sink.write_eof()

        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            upstream_writer.close()

    async def _http(self, first: bytes, reader, writer) -> None:
        head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT)
        if len(head) > _MAX_HEAD:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD") or path not in ("/status", "/status/"):
            self._answer(writer, 404, b"404 not found: the admin listener serves /status\n")
        elif self._authenticate(_bearer(headers.get("authorization", ""))) is None:
            self._answer(
                writer, 401, b"401: send an admin API token (Bearer, or Basic: any user, the "
                b"token as password)\n",
                extra=(("WWW-Authenticate", 'Basic realm="tensorgate admin: password = token"'),),
            )  # fmt: skip
        else:
            page = (await self._status_page()).encode()
            self._answer(writer, 200, page if method == "GET" else b"", "text/html")
        await writer.drain()

    @staticmethod
    def _answer(writer, status: int, body: bytes, kind: str = "text/plain", extra=()) -> None:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found"}[status]
        head = [
            f"HTTP/1.1 {status} {reason}",
            f"Content-Type: {kind}; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


def _bearer(header: str) -> str:
    """A Basic credential's password as a Bearer header (browsers send Basic); others as is."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return header
    try:
        password = base64.b64decode(value.strip()).decode().partition(":")[2]
    except (ValueError, UnicodeDecodeError):
        return ""
    return f"Bearer {password}" if password else ""


def for_admin(view, routes, rollouts, authenticator) -> AdminFront:
    """The front of a gateway's admin listener: its gRPC server goes on `front.socket` (a Unix
    socket in a private temporary directory), its status page reads `view`, `routes` and
    `rollouts`, both behind `authenticator` (admin/auth.py)."""
    import os
    import tempfile

    from gateway.controlplane.admin import status

    directory = tempfile.mkdtemp(prefix="tensorgate-admin-")
    os.chmod(directory, 0o700)

    def authenticate(header: str):
        return authenticator.principal((("authorization", header),) if header else (), None)

    async def page() -> str:
        return status.render(*await status.snapshot(view, routes, rollouts))

    front = AdminFront(os.path.join(directory, "admin.sock"), authenticate, page)
    front.directory = directory
    return front
