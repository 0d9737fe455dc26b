"""The admin API's OpenAPI document, from AdminService's descriptor: one operation per method
(`POST /admin/v1/<Method>`, and `GET` with query parameters for the read-only ones), request and
response bodies as the messages' proto3 JSON (schemas.py). What the HTTP side does with them is
gateway/controlplane/admin/transcode.py; the two read the same descriptor and the same list of
read-only methods, so the document cannot describe a method the listener does not serve."""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor

from gateway.controlplane.admin.auth import READ_ONLY_METHODS
from gateway.openapi.schemas import Components, comments

PREFIX = "/admin/v1/"
# gRPC status -> HTTP status of an admin call (transcode.py answers with it; the document lists it)
ERRORS = {
    400: "Bad request: the body or a query parameter is not the request message (the error "
    "names the field), or the admin API refused the value (INVALID_ARGUMENT).",
    401: "No valid credentials (UNAUTHENTICATED): send `Authorization: Bearer <token>`, or Basic "
    "with the token as the password.",
    403: "The token is read-only and the method changes state (PERMISSION_DENIED).",
    404: "No such route, variant, backend, revision or rollout (NOT_FOUND).",
    409: "The change conflicts with the live state: a stale `expected_revision` or a rollout "
    "not in the state it needs (FAILED_PRECONDITION), a change that kept losing races to others "
    "(ABORTED), or one already made (ALREADY_EXISTS). Re-read and retry.",
    413: "The body is larger than 4 MiB.",
    415: "The body is not `application/json`.",
    429: "The admin API is out of a resource (RESOURCE_EXHAUSTED).",
    500: "The admin API failed (INTERNAL, UNKNOWN, ...): the gateway's log has the details.",
    501: "The gateway does not implement this method (UNIMPLEMENTED).",
    503: "The admin API or its store cannot answer now (UNAVAILABLE); retry.",
    504: "The call did not finish in time (DEADLINE_EXCEEDED).",
}
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "properties": {
        "error": {"type": "string", "description": "What was wrong, in a sentence."},
        "code": {
            "type": "string",
            "description": "The gRPC status code's name, as the gRPC admin API would answer.",
            "examples": ["INVALID_ARGUMENT"],
        },
    },
    "required": ["error", "code"],
}
DESCRIPTION = """\
The operator API of a tensorgate gateway, over HTTP: the same methods, messages, authentication \
and roles as the gRPC `tensorgate.admin.v1.AdminService` on the same admin listener (the CLI \
`tensorgate admin` uses gRPC), transcoded from the protobuf messages by their proto3 JSON mapping \
(field names as in the .proto, 64-bit integers as strings, durations as `"30s"`).

Call a method with `POST /admin/v1/<Method>` and the request message as a JSON body (an empty \
body is the empty message); read-only methods also answer `GET` with the request fields as query \
parameters. Errors are `{"error": "...", "code": "<gRPC status name>"}`.

Every call needs an admin-API token: `Authorization: Bearer <token>` (or Basic with the token as \
the password). Read-only methods (`GET` allowed) need a read or admin token, the others an admin \
token. This document and the `/docs` page are served without a token: they describe the API and \
hold no secrets.

Not available when `admin.tls` is set: the gRPC server then listens on the admin address itself."""


def build(service) -> dict:
    components = Components()
    paths = {}
    for method in service.methods:
        paths[PREFIX + method.name] = _path(method, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tensorgate admin API",
            "version": service.file.package.rpartition(".")[2],
            "description": DESCRIPTION,
        },
        "tags": [{"name": "admin", "description": comments().get(service.full_name, "")}],
        "security": [{"bearer": []}, {"basic": []}],
        "paths": paths,
        "components": {
            "schemas": {
                **dict(sorted(components.schemas.items())),
                "tensorgate.Error": ERROR_SCHEMA,
            },
            "responses": {
                str(status): {
                    "description": text,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/tensorgate.Error"}
                        }
                    },
                }
                for status, text in ERRORS.items()
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin-API token (admin.tokens_file / admin.tokens_env).",
                },
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "Any user name, the admin-API token as the password.",
                },
            },
        },
    }


def _path(method, components: Components) -> dict:
    summary, description = _summary(method)
    read_only = method.name in READ_ONLY_METHODS
    role = "a read or admin token" if read_only else "an admin token"
    responses = {
        "200": {
            "description": f"The {method.output_type.name} message.",
            "content": {"application/json": {"schema": components.ref(method.output_type)}},
        },
        **{str(status): {"$ref": f"#/components/responses/{status}"} for status in ERRORS},
    }
    common = {
        "tags": ["admin"],
        "summary": summary,
        "description": f"{description}\n\nNeeds {role}.".strip(),
        "responses": responses,
    }
    item = {
        "post": {
            **common,
            "operationId": method.name,
            "requestBody": {
                "required": False,
                "description": f"The {method.input_type.name} message; empty is the empty one.",
                "content": {"application/json": {"schema": components.ref(method.input_type)}},
            },
        }
    }
    if read_only:
        item["get"] = {
            **common,
            "operationId": f"{method.name}Get",
            "parameters": [_query(field, components) for field in method.input_type.fields],
        }
        if not item["get"]["parameters"]:
            del item["get"]["parameters"]
    return item


def _query(field: FieldDescriptor, components: Components) -> dict:
    """A request field as a query parameter (read-only methods have scalar fields only;
    transcode.py refuses message-typed ones in a query)."""
    schema = components.field(field)
    parameter = {"name": field.name, "in": "query", "required": False, "schema": schema}
    text = comments().get(field.full_name)
    if text:
        parameter["description"] = text
    if field.is_repeated:
        parameter.update(style="form", explode=True)
    return parameter


def _summary(method) -> tuple[str, str]:
    """The first sentence of the method's comment, and the rest; from its name without one."""
    text = comments().get(method.full_name, "")
    if not text:
        words = re.sub(r"(?<!^)(?=[A-Z])", " ", method.name).lower()
        return words[0].upper() + words[1:] + ".", ""
    first, _, rest = text.partition(". ")
    return (first if first.endswith(".") else first + "."), rest.strip()
