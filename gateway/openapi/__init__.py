"""OpenAPI 3.1 documents of the gateway's HTTP APIs, generated from one source each: the admin API
from AdminService's protobuf descriptor (admin.py), the data plane from the KServe v2 REST routes
and the protocol's messages (dataplane.py). Served at `/openapi.json` on the admin and REST
listeners, with a human-readable page at `/docs` (Swagger UI, vendored from the npm package
pinned in package.json: no CDN), and written to docs/openapi/ by scripts/gen_openapi.py."""

from __future__ import annotations

import functools
import html
import json
import pathlib

KINDS = ("data_plane", "admin")
STATIC = pathlib.Path(__file__).with_name("static")
# What the /docs page loads: the vendored Swagger UI and the script that starts it.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "tensorgate-docs.js": "text/javascript; charset=utf-8",
}
# For the /docs page and its assets: nothing from another origin, no inline script (Swagger UI
# styles inline and draws icons from data: URLs).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@functools.cache
def document(kind: str) -> dict:
    """The OpenAPI document of the "data_plane" or the "admin" API (cached: do not change it)."""
    if kind == "admin":
        from gateway.openapi import admin
        from tensorgate.admin.v1 import admin_pb2

        return admin.build(admin_pb2.DESCRIPTOR.services_by_name["AdminService"])
    if kind == "data_plane":
        from gateway.openapi import dataplane

        return dataplane.build()
    raise ValueError(f"no OpenAPI document {kind!r}: one of {', '.join(KINDS)}")


@functools.cache
def document_json(kind: str) -> bytes:
    """document(kind) as the bytes served at /openapi.json and written to docs/openapi/."""
    return (json.dumps(document(kind), indent=2, ensure_ascii=False) + "\n").encode()


def docs_page(spec_url: str, title: str) -> str:
    """The /docs page: Swagger UI reading the document at `spec_url` (same origin). Its scripts
    and style are asset()s under /docs/; serve it with CONTENT_SECURITY_POLICY."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-spec="{html.escape(spec_url, quote=True)}"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/tensorgate-docs.js"></script>
</body>
</html>
"""


def asset(name: str) -> tuple[bytes, str] | None:
    """(bytes, content type) of a file the /docs page loads (served at /docs/<name>), or None."""
    kind = ASSETS.get(name)
    if kind is None:
        return None
    return _read(name), kind


@functools.cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()
