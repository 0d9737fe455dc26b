"""The admin API over HTTP: `POST /admin/v1/<Method>` with the request message as JSON (an empty
body is the empty message), and `GET` with the request fields as query parameters for the
read-only methods. The message comes from AdminService's descriptor and the proto3 JSON mapping
(google.protobuf.json_format), the same source gateway/openapi/admin.py documents; the call goes to
the admin gRPC server on its Unix socket with the caller's Authorization as metadata, so the one
AuthInterceptor applies the same authentication and roles, and the audit log names the same
token. The reply is the response message as JSON (field names as in the .proto, as the config
file writes them), or `{"error": ..., "code": <gRPC status name>}` with the matching HTTP status.
AdminService has no streaming methods; one added later would answer 501 here until it is mapped.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass

import grpc
from google.protobuf import json_format, message_factory

from gateway.controlplane.admin.auth import READ_ONLY_METHODS
from gateway.errors import HTTP_STATUS

PREFIX = "/admin/v1/"
MAX_BODY = 4 << 20
# Longer than any admin call takes (a store write with its retries), short enough that a wedged
# server does not hold a connection for ever.
CALL_TIMEOUT = 60.0
# A stale expected_revision (FAILED_PRECONDITION) is a conflict with the stored table here.
_HTTP_STATUS = {**HTTP_STATUS, grpc.StatusCode.FAILED_PRECONDITION: 409}
JSON = "application/json"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    kind: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def error(status: int, code: str, message: str, headers=()) -> Reply:
    body = json.dumps({"error": message, "code": code}, ensure_ascii=False) + "\n"
    return Reply(status, body.encode(), JSON, tuple(headers))


class BadRequest(ValueError):
    pass


class Transcoder:
    def __init__(self, socket: str, service=None) -> None:
        if service is None:
            from tensorgate.admin.v1 import admin_pb2

            service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
        self._service = service
        self._socket = socket
        self._channel: grpc.aio.Channel | None = None

    def allowed(self, name: str) -> tuple[str, ...]:
        """The HTTP methods `/admin/v1/<name>` answers; () for no such method."""
        method = self._service.methods_by_name.get(name)
        if method is None:
            return ()
        return ("GET", "POST") if name in READ_ONLY_METHODS else ("POST",)

    def unknown(self, name: str) -> Reply:
        names = ", ".join(m.name for m in self._service.methods)
        return error(404, "NOT_FOUND", f"no admin method {name!r}: {PREFIX}<Method> is one of "
                     f"{names}")  # fmt: skip

    def empty(self, name: str):
        """Method `name`'s request message, empty."""
        return self._request(name)

    def from_json(self, name: str, body: bytes):
        """The request message of method `name` from a JSON body; BadRequest naming the problem."""
        request = self._request(name)
        if not body.strip():
            return request
        try:
            value = json.loads(body)
        except UnicodeDecodeError:
            raise BadRequest("the body is not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise BadRequest(f"the body is not JSON: {err.msg} at line {err.lineno} column "
                             f"{err.colno}") from None  # fmt: skip
        except RecursionError:
            raise BadRequest("the body is nested too deeply") from None
        if not isinstance(value, dict):
            raise BadRequest(f"the body must be a JSON object (a {request.DESCRIPTOR.name}), "
                             f"not {type(value).__name__}")  # fmt: skip
        return self._parse(value, request)

    def from_query(self, name: str, query: str):
        """The request message of read-only method `name` from a query string."""
        request = self._request(name)
        try:
            pairs = urllib.parse.parse_qsl(
                query, keep_blank_values=True, strict_parsing=bool(query), errors="strict"
            )
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(f"malformed query string {query[:200]!r}") from None
        fields = request.DESCRIPTOR.fields_by_name
        value: dict = {}
        for key, text in pairs:
            field = fields.get(key)
            if field is None:
                raise BadRequest(f"unknown query parameter {key!r}: {request.DESCRIPTOR.name} "
                                 f"has {_field_list(request)}")  # fmt: skip
            if field.type == field.TYPE_MESSAGE:
                raise BadRequest(f"{key} is a message: send it with POST and a JSON body")
            if field.type == field.TYPE_BOOL:
                if text not in ("true", "false"):
                    raise BadRequest(f"query parameter {key} must be true or false, not {text!r}")
                item = text == "true"
            else:
                item = text  # the JSON mapping reads numbers and enums from strings as well
            if field.is_repeated:
                value.setdefault(key, []).append(item)
            elif key in value:
                raise BadRequest(f"query parameter {key} given more than once")
            else:
                value[key] = item
        return self._parse(value, request)

    async def call(self, name: str, request, authorization: str) -> Reply:
        """Calls method `name` on the admin gRPC server as the holder of `authorization`."""
        method = self._service.methods_by_name[name]
        if method.client_streaming or method.server_streaming:
            return error(501, "UNIMPLEMENTED", f"{name} streams: use the gRPC admin API")
        response_class = message_factory.GetMessageClass(method.output_type)
        # gRPC refuses metadata that is not printable ASCII; such a header cannot hold a token,
        # so the call goes without it and the server answers it as unauthenticated.
        valid = authorization and all(" " <= c <= "~" for c in authorization)
        metadata = (("authorization", authorization),) if valid else ()
        stub = self._open().unary_unary(
            f"/{self._service.full_name}/{name}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        try:
            response = await stub(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return _from_status(err.code(), err.details() or "")
        body = json_format.MessageToDict(
            response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return Reply(200, (json.dumps(body, ensure_ascii=False) + "\n").encode())

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            # Route tables of thousands of routes exceed gRPC's default 4 MiB per message.
            self._channel = grpc.aio.insecure_channel(
                f"unix:{self._socket}", options=[("grpc.max_receive_message_length", 256 << 20)]
            )
        return self._channel

    def _request(self, name: str):
        return message_factory.GetMessageClass(self._service.methods_by_name[name].input_type)()

    @staticmethod
    def _parse(value: dict, request):
        try:
            return json_format.ParseDict(value, request)
        except json_format.ParseError as err:
            text = str(err).split("\n", 1)[0]
            if "has no field named" in text:
                text = f"{text.rstrip('.')}; it has {_field_list(request)}"
            raise BadRequest(text) from None
        except RecursionError:
            raise BadRequest("the body is nested too deeply") from None


def _field_list(request) -> str:
    names = [field.name for field in request.DESCRIPTOR.fields]
    return ", ".join(names) if names else "no fields"


def _from_status(code: grpc.StatusCode, details: str) -> Reply:
    status = _HTTP_STATUS.get(code, 500)
    headers = ()
    if status == 401:
        headers = (("WWW-Authenticate", 'Bearer realm="tensorgate admin"'),)
    return error(status, code.name, details or code.name.lower().replace("_", " "), headers)
