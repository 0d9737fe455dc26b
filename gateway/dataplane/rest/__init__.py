"""The KServe v2 HTTP/REST front door (listeners.rest; docs/rest.md): `app` maps the v2 paths
onto the DataPlane, `codec` the v2 JSON and binary bodies onto the Open Inference Protocol
messages, `server` runs uvicorn in the gateway's event loop."""

from __future__ import annotations

import importlib
import os

from gateway.dataplane.rest.app import RestApp
from gateway.dataplane.rest.server import RestServer

_HTML = b"text/html; charset=utf-8"
# For measurement only (bench/rest.py compares ASGI servers inside the gateway): "module:factory"
# of another server with RestServer's interface. Unset, always, in production.
SERVER_ENV = "TENSORGATE_BENCH_REST_SERVER"


def rest_server(plane, intake, address: str, tls, reuse_port: bool, jobs=None):
    app = RestApp(plane, intake, api_pages, jobs)
    other = os.environ.get(SERVER_ENV)
    if other:
        module, _, factory = other.partition(":")
        return getattr(importlib.import_module(module), factory)(app, address, tls, reuse_port)
    return RestServer(app, address, tls, reuse_port)


def api_pages(path: str):
    """(status, body, content type, headers) of the API's own pages: /openapi.json (the data plane's
    OpenAPI document), /docs (a page rendering it) and the page's assets; None elsewhere."""
    from gateway import openapi

    if path == "/openapi.json":
        return 200, openapi.document_json("data_plane"), b"application/json", ()
    csp = (("content-security-policy", openapi.CONTENT_SECURITY_POLICY),)
    if path in ("/docs", "/docs/"):
        page = openapi.docs_page("/openapi.json", "tensorgate data plane (KServe v2 REST)")
        return 200, page.encode(), _HTML, csp
    if path.startswith("/docs/"):
        found = openapi.asset(path.removeprefix("/docs/"))
        if found is not None:
            body, kind = found
            return 200, body, kind.encode() if isinstance(kind, str) else kind, csp
    return None
