"""The KServe v2 HTTP/REST front door, as an ASGI application over the DataPlane (plane.py).

Transport only, like the gRPC servicer: each endpoint reads its URL and body, asks the DataPlane
the same question the matching RPC asks, and writes the v2 answer. Inference goes through
`DataPlane.answer`, so a REST call passes exactly the layers, checks, logs and metrics a
ModelInfer call does (labelled protocol="rest"); the body is bounded and counted by the same
intake (size limit before it is read, the memory bulkhead, the shutdown gate). A GatewayError's
gRPC code becomes the HTTP status the v2 protocol uses (errors.HTTP_STATUS); the body is always
`{"error": "<message>"}`, never a stack trace.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable

import grpc

import gateway
from gateway.dataplane.plane import METADATA_TIMEOUT_S, DataPlane
from gateway.dataplane.rest import codec
from gateway.errors import HTTP_STATUS, GatewayError, invalid, settled, shown

log = logging.getLogger(__name__)

# The caller's deadline, in milliseconds (gRPC callers send grpc-timeout; HTTP has no standard
# header for it). Without it the route's timeout applies, as for a gRPC call with no deadline.
TIMEOUT_HEADER = "x-tensorgate-timeout-ms"
MAX_TIMEOUT_MS = 24 * 3600 * 1000
EXTENSIONS = ("binary_tensor_data", "model_repository", "statistics")
_JSON = b"application/json"
_BINARY = b"application/octet-stream"


class _Refused(Exception):
    """An HTTP-level refusal with no gRPC code of its own (405, 413, 415)."""

    def __init__(self, status: int, message: str, headers: tuple = ()) -> None:
        self.status, self.message, self.headers = status, message, headers


class RestApp:
    def __init__(self, plane: DataPlane, intake, pages: Callable[[str], tuple] | None = None,
                 jobs=None):  # fmt: skip
        """`intake`: gateway/dataplane/intake.py's Intake (size limit, memory budget, gate).
        `pages(path)`: (status, body, content type, headers) for /openapi.json and /docs, or
        None.
        `jobs`: the Jobs API (gateway/jobs/, config `jobs`), served under /v2/jobs, or None."""
        self._plane = plane
        self._intake = intake
        self._pages = pages
        self._jobs = jobs

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        method = scope["method"]
        parts = scope["path"].split("/")[1:]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        try:
            if parts[:1] == ["v2"]:
                peer = _tls_peer(scope)
                if parts[1:2] == ["jobs"] and self._jobs is not None:
                    status, body, kind, extra = await self._jobs_call(
                        method, parts[2:], scope, headers, peer, receive
                    )
                else:
                    status, body, kind, extra = await self._v2(
                        method, parts[1:], headers, peer, receive
                    )
            elif self._pages is not None and method in ("GET", "HEAD"):
                page = self._pages(scope["path"])
                if page is None:
                    raise _not_found(scope["path"])
                status, body, kind, extra = page
            else:
                raise _not_found(scope["path"])
        except _Refused as refused:
            status, body, extra = refused.status, _error(refused.message), refused.headers
            kind = _JSON
        except GatewayError as err:
            code, message, _ = settled(err)
            status, body, kind, extra = HTTP_STATUS.get(code, 500), _error(message), _JSON, ()
        except Exception:
            log.exception("REST %s %s failed", method, shown(scope["path"]))
            status, body, kind, extra = 500, _error("internal gateway error"), _JSON, ()
        response_headers = [(b"content-type", kind), (b"content-length", b"%d" % len(body))]
        response_headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra)
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    async def _v2(self, method: str, parts: list[str], headers, peer, receive):
        plane = self._plane
        if not parts or parts == [""]:
            _allow(method, "GET")
            document = {
                "name": "tensorgate",
                "version": gateway.__version__,
                "extensions": list(EXTENSIONS),
            }
            return 200, _json(document), _JSON, ()
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            _allow(method, "GET")
            if parts[1] == "ready" and not plane.ready:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "tensorgate is not ready")
            return 200, b"", _JSON, ()
        if parts == ["repository", "index"]:
            _allow(method, "POST")
            body = await self._body(headers, receive, 4096)
            ready = _object_field(body, "ready", bool, False)
            caller = plane.identify_from(headers, peer)
            index = plane.repository_index(ready, caller)
            return 200, _json([codec.plain(m) for m in index.models]), _JSON, ()
        if parts[0] != "models" or len(parts) < 2:
            raise _not_found("/v2/" + "/".join(parts))
        if parts[1:] == ["stats"]:
            _allow(method, "GET")
            reply = plane.statistics("", "", plane.identify_from(headers, peer))
            return 200, _json(codec.plain(reply)), _JSON, ()
        model, rest = parts[1], parts[2:]
        version = ""
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                raise _not_found("/v2/models/" + "/".join(parts[1:]))
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else ("" if not rest else None)
        if action not in ("", "infer", "ready", "config", "stats"):
            raise _not_found("/v2/models/" + "/".join(parts[1:]))
        if action == "infer":
            _allow(method, "POST")
            return await self._infer(model, version, headers, peer, receive)
        _allow(method, "GET")
        caller = plane.identify_from(headers, peer)
        timeout = min(_timeout(headers) or METADATA_TIMEOUT_S, METADATA_TIMEOUT_S)
        if action == "":
            reply, trailers = await plane.metadata(model, version, timeout, caller)
            return 200, _json(codec.metadata_document(reply)), _JSON, trailers
        if action == "ready":
            plane.known(model, version, caller)  # unknown: 404, as for metadata
            if not await plane.model_ready(model, version, caller):
                which = shown(model) + (f" version {shown(version)}" if version else "")
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"model {which} is not ready")
            return 200, _json({"name": model, "ready": True}), _JSON, ()
        if action == "config":
            reply, trailers = await plane.model_config(model, version, timeout, caller)
            return 200, _json(codec.plain(reply.config)), _JSON, trailers
        reply = plane.statistics(model, version, caller)  # "stats"
        return 200, _json(codec.plain(reply)), _JSON, ()

    async def _infer(self, model: str, version: str, headers, peer, receive):
        intake = self._intake
        limit = intake.max_request_bytes
        # Counted against the memory bulkhead before the body is read when its size is
        # declared, so bodies still arriving are in the budget; a chunked body once read.
        size = _declared_length(headers)
        if size is not None:
            if size > limit:
                raise _too_large(size, limit)
            _admit(intake, size)
        try:
            body = await self._body(headers, receive, limit)
            if size is None:
                _admit(intake, len(body))
                size = len(body)
            request, binary = codec.parse_infer(body, _header_length(headers), model, version)
            del body  # the request holds the tensors now
            timeout = _timeout(headers)
            answer = await self._plane.answer(
                request,
                model,
                version,
                headers,
                None if timeout is None else time.monotonic() + timeout,
                lambda: self._plane.identify_from(headers, peer),
                protocol="rest",
            )
        finally:
            if size is not None:
                intake.release(size)
        if answer.result is None:
            status = HTTP_STATUS.get(answer.code, 500)
            return status, _error(answer.message), _JSON, answer.headers
        payload, head_length = codec.infer_response(answer.result.response, binary)
        if head_length is None:
            return 200, payload, _JSON, answer.headers
        extra = (*answer.headers, (codec.HEADER_LENGTH, str(head_length)))
        return 200, payload, _BINARY, extra

    async def _jobs_call(self, method, parts, scope, headers, peer, receive):
        from gateway.jobs import rest as jobs_rest

        caller = self._plane.identify_from(headers, peer)
        body = b""
        if method == "POST":
            body = await self._body(headers, receive, self._intake.max_request_bytes)
        _admit(self._intake, len(body))  # the memory bulkhead and the drain gate, as infer's
        try:
            query = scope.get("query_string", b"").decode("latin-1")
            status, document = await jobs_rest.answer(
                self._jobs, method, parts, headers, body, caller, query=query
            )
        finally:
            self._intake.release(len(body))
        return status, _json(document), _JSON, ()

    async def _body(self, headers, receive, limit: int) -> bytes:
        """The request body, at most `limit` bytes (413 beyond, before more is read), decoded
        from gzip/deflate when the caller compressed it (bounded the same way)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(499, "the caller went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        encoding = _header(headers, "content-encoding")
        if encoding in (None, "", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise _Refused(415, f"content-encoding {shown(encoding)}: send gzip or deflate")
        inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
        try:
            plain = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise invalid(f"the body is not valid {encoding} data") from None
        if len(plain) > limit or inflater.unconsumed_tail:
            raise _too_large(len(plain), limit)
        return plain


def _admit(intake, size: int) -> None:
    refusal = intake.admit(size)
    if refusal is not None:
        raise GatewayError(refusal.code, refusal.message)


def _tls_peer(scope) -> dict | None:
    """The caller's TLS client certificate as gRPC's auth context names it (identity.py reads
    x509_pem_cert), from the ASGI TLS extension our server fills (rest/server.py)."""
    tls = scope.get("extensions", {}).get("tls")
    chain = tls.get("client_cert_chain") if tls else None
    return {"x509_pem_cert": [chain[0].encode()]} if chain else None


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise _Refused(405, f"use {allowed} here", (("allow", allowed),))


def _not_found(path: str) -> _Refused:
    return _Refused(404, f"no such endpoint: {shown(path)} (the KServe v2 REST paths: /docs)")


def _too_large(size: int, limit: int) -> _Refused:
    return _Refused(
        413,
        f"request is {size} bytes, over the gateway's limit of {limit} bytes "
        "(limits.max_request_bytes)",
    )


def _header(headers, name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _declared_length(headers) -> int | None:
    value = _header(headers, "content-length")
    return int(value) if value is not None and value.isdigit() else None


def _header_length(headers) -> int | None:
    value = _header(headers, codec.HEADER_LENGTH)
    if value is None:
        return None
    if not value.isdigit():
        raise invalid("Inference-Header-Content-Length must be a non-negative integer")
    return int(value)


def _timeout(headers) -> float | None:
    value = _header(headers, TIMEOUT_HEADER)
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) <= MAX_TIMEOUT_MS:
        raise invalid(
            f"{TIMEOUT_HEADER} must be a whole number of milliseconds, 1 to {MAX_TIMEOUT_MS}"
        )
    return int(value) / 1000


def _object_field(body: bytes, name: str, kind: type, default):
    if not body.strip():
        return default
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise invalid("the request body must be a JSON object")
    value = document.get(name, default)
    if not isinstance(value, kind):
        raise invalid(f"{name} must be a {kind.__name__}")
    return value


def _json(document) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _error(message: str) -> bytes:
    return _json({"error": message})
