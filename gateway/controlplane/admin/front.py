"""The admin listener's front door: one TCP port for the admin API over gRPC and over HTTP, the
status page and the API's description. A connection that opens with HTTP/2's preface
("PRI * HTTP/2.0") is relayed byte for byte to the admin gRPC server on a private Unix socket; an
HTTP/1.1 request is answered here, one per connection:
- `/admin/v1/<Method>`: the admin API over HTTP (transcode.py), with the same credentials and
  roles as gRPC (it calls the gRPC server);
- `GET /status`: the status page, to a caller with an admin-API credential (`Authorization:
  Bearer <token>`, or Basic with the token as the password, which browsers can prompt for);
- `GET /openapi.json` and `GET /docs`: the admin API's OpenAPI document and its page
  (gateway/openapi), without credentials: they describe the API and hold no secrets;
- 404 for any other path.
With admin.tls the gRPC server listens itself and there is no front: no status page and no HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http
import logging
from collections.abc import Awaitable, Callable

from gateway.controlplane.admin import transcode
from gateway.controlplane.admin.auth import READ_ONLY_METHODS

log = logging.getLogger(__name__)

_MAX_HEAD = 16 * 1024
_HEAD_TIMEOUT = 10.0
_BODY_TIMEOUT = 30.0
# After refusing a body unread, read and drop what the client still sends (up to this much, this
# long) so it gets to read the refusal instead of a connection reset.
_LINGER_BYTES = 16 << 20
_LINGER_SECONDS = 2.0
_TEXT = "text/plain; charset=utf-8"
_NOT_FOUND = b"404 not found: the admin listener serves /admin/v1/<Method>, /status, /openapi.json and /docs\n"  # noqa: E501
_PAGES = ("/status", "/status/", "/openapi.json", "/docs", "/docs/")


class AdminFront:
    def __init__(
        self,
        grpc_socket: str,
        authenticate: Callable[[str], object | None],
        status_page: Callable[[], Awaitable[str]],
    ) -> None:
        """`authenticate(authorization header)` returns a principal (auth.Principal) or None;
        `status_page()` renders the page."""
        self._socket = grpc_socket
        self._authenticate = authenticate
        self._status_page = status_page
        self._transcoder = transcode.Transcoder(grpc_socket)
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
        await self._transcoder.close()
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
        path, _, query = rest.partition(" ")[0].partition("?")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await _body(headers, reader, writer)
        if isinstance(body, transcode.Reply):  # refused unread
            self._answer(writer, body)
            await writer.drain()
            await _linger(reader, writer)
            return
        if path.startswith(transcode.PREFIX):
            try:
                reply = await self._admin(method, path, query, headers, body)
            except Exception:  # a 500 without details: the log has the traceback
                log.exception("admin listener: %s %r failed", method, path[:200])
                reply = transcode.error(500, "INTERNAL", "internal error: see the gateway's log")
        else:
            reply = await self._page(method, path, headers)
        self._answer(writer, reply, head_only=method == "HEAD")
        await writer.drain()

    async def _admin(self, method, path, query, headers, body: bytes) -> transcode.Reply:
        name = path.removeprefix(transcode.PREFIX)
        allowed = self._transcoder.allowed(name)
        if not allowed:
            return self._transcoder.unknown(name)
        if method not in allowed:
            return _not_allowed(allowed)
        authorization = _bearer(headers.get("authorization", ""))
        principal = self._authenticate(authorization)
        if principal is None or (principal.role != "admin" and name not in READ_ONLY_METHODS):
            # Credentials before the body is parsed; the refusal is the gRPC API's own (its
            # interceptor answers before any handler, whatever the message).
            return await self._transcoder.call(name, self._transcoder.empty(name), authorization)
        kind = headers.get("content-type", "").partition(";")[0].strip().lower()
        if body and kind not in ("application/json", ""):
            return transcode.error(415, "INVALID_ARGUMENT", f"the body must be application/json, "
                                   f"not {kind[:80]!r}")  # fmt: skip
        try:
            if method == "POST":
                request = self._transcoder.from_json(name, body)
            else:
                request = self._transcoder.from_query(name, query)
        except transcode.BadRequest as err:
            return transcode.error(400, "INVALID_ARGUMENT", str(err))
        return await self._transcoder.call(name, request, authorization)

    async def _page(self, method: str, path: str, headers: dict) -> transcode.Reply:
        """/status (behind the admin credentials), and the API's description (without)."""
        from gateway import openapi

        if path not in _PAGES and not path.startswith("/docs/"):
            return transcode.Reply(404, _NOT_FOUND, _TEXT)
        if method not in ("GET", "HEAD"):
            return _not_allowed(("GET", "HEAD"))
        if path in ("/status", "/status/"):
            if self._authenticate(_bearer(headers.get("authorization", ""))) is None:
                return transcode.Reply(
                    401, b"401: send an admin API token (Bearer, or Basic: any user, the token "
                    b"as password)\n", _TEXT,
                    (("WWW-Authenticate", 'Basic realm="tensorgate admin: password = token"'),),
                )  # fmt: skip
            page = (await self._status_page()).encode()
            return transcode.Reply(200, page, "text/html; charset=utf-8")
        if path == "/openapi.json":
            return transcode.Reply(200, openapi.document_json("admin"))
        csp = (("Content-Security-Policy", openapi.CONTENT_SECURITY_POLICY),)
        if path in ("/docs", "/docs/"):
            page = openapi.docs_page("/openapi.json", "tensorgate admin API").encode()
            return transcode.Reply(200, page, "text/html; charset=utf-8", csp)
        found = openapi.asset(path.removeprefix("/docs/"))
        if found is None:
            return transcode.Reply(404, _NOT_FOUND, _TEXT)
        content, kind = found
        return transcode.Reply(200, content, kind, (*csp, ("Cache-Control", "max-age=3600")))

    @staticmethod
    def _answer(writer, reply: transcode.Reply, head_only: bool = False) -> None:
        extra = dict(reply.headers)
        head = [
            f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}",
            f"Content-Type: {reply.kind}",
            f"Content-Length: {len(reply.body)}",
            f"Cache-Control: {extra.pop('Cache-Control', 'no-store')}",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra.items()),
        ]
        payload = b"" if head_only else reply.body
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)


async def _body(headers: dict, reader, writer) -> bytes | transcode.Reply:
    """The request's body, bounded before it is read: 411 for a chunked one (no length to check
    first), 413 over transcode.MAX_BODY."""
    if "transfer-encoding" in headers:
        return transcode.error(411, "INVALID_ARGUMENT", "send the body with a Content-Length "
                               "(chunked bodies are not accepted)")  # fmt: skip
    length = headers.get("content-length", "0") or "0"
    if not length.isdigit():
        return transcode.error(400, "INVALID_ARGUMENT", f"bad Content-Length {length[:40]!r}")
    size = int(length)
    if size > transcode.MAX_BODY:
        return transcode.error(413, "RESOURCE_EXHAUSTED", f"the body has {size} bytes: the "
                               f"admin API takes at most {transcode.MAX_BODY}")  # fmt: skip
    if not size:
        return b""
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it before large bodies
    return await asyncio.wait_for(reader.readexactly(size), _BODY_TIMEOUT)


async def _linger(reader, writer) -> None:
    with contextlib.suppress(Exception):
        writer.write_eof()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LINGER_SECONDS
    dropped = 0
    with contextlib.suppress(Exception):
        while dropped < _LINGER_BYTES and (left := deadline - loop.time()) > 0:
            data = await asyncio.wait_for(reader.read(65536), left)
            if not data:
                break
            dropped += len(data)


def _not_allowed(allowed: tuple[str, ...]) -> transcode.Reply:
    return transcode.error(405, "UNIMPLEMENTED", f"use {' or '.join(allowed)}",
                           (("Allow", ", ".join(allowed)),))  # fmt: skip


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
