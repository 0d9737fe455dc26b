"""The Jobs API on the REST listener, under /v2/jobs. Bodies are the protobuf JSON mapping of
tensorgate.jobs.v1's messages (google.protobuf.json_format), so a job reads the same over REST,
grpcurl and gRPC:

    POST /v2/jobs                 SubmitRequest  -> 201 SubmitResponse (200 when the
                                                    idempotency key named an existing job)
    GET  /v2/jobs/{id}            -> 200 Job
    POST /v2/jobs/{id}/cancel     -> 200 Job
    GET  /v2/jobs?model=&state=&page_size=&page_token=   -> 200 ListResponse

The REST listener identifies the caller (DataPlane.identify_from) and passes it in; errors are
{"error": message} with the HTTP status of the gRPC code (the REST listener's mapping)."""

from __future__ import annotations

import urllib.parse

import grpc
from google.protobuf import json_format

from gateway.errors import HTTP_STATUS, GatewayError, invalid, settled
from tensorgate.jobs.v1 import jobs_pb2


def _dict(message) -> dict:
    return json_format.MessageToDict(message)


def _parse(body: bytes, message_type):
    try:
        return json_format.Parse(body or b"{}", message_type(), ignore_unknown_fields=False)
    except json_format.ParseError as err:
        name = message_type.DESCRIPTOR.full_name
        reason = str(err).split("\n")[0]  # the first line; the rest lists fields in jargon
        raise invalid(f"the body is not a JSON {name}: {reason}") from None


async def answer(
    service, method: str, parts: list[str], headers, body: bytes, caller, query=None
) -> tuple[int, dict | list]:
    """`parts`: the path's segments after /v2/jobs (a query string may ride on the last one, or
    come as `query`: a dict of name -> value or a raw query string)."""
    parts = list(parts)
    if parts and "?" in parts[-1]:
        parts[-1], _, raw = parts[-1].partition("?")
        query = query or raw
        if not parts[-1]:
            parts.pop()
    if isinstance(query, str):
        query = dict(urllib.parse.parse_qsl(query))
    query = query or {}
    try:
        return await _route(service, method, [p for p in parts if p], body, caller, query)
    except GatewayError as err:
        code, message, _ = settled(err)
    return HTTP_STATUS.get(code, 500), {"error": message}


async def _route(service, method, parts, body, caller, query) -> tuple[int, dict]:
    if not parts:
        if method == "POST":
            request = _parse(body, jobs_pb2.SubmitRequest)
            job, created = await service.submit(request, caller)
            return (201 if created else 200), _dict(
                jobs_pb2.SubmitResponse(job=job, created=created)
            )
        if method == "GET":
            return 200, _dict(await service.list(_list_request(query), caller))
        return _not_allowed(method, "GET, POST")
    if len(parts) == 1:
        if method != "GET":
            return _not_allowed(method, "GET")
        return 200, _dict(await service.get(parts[0], caller))
    if len(parts) == 2 and parts[1] == "cancel":
        if method != "POST":
            return _not_allowed(method, "POST")
        return 200, _dict(await service.cancel(parts[0], caller))
    raise GatewayError(grpc.StatusCode.NOT_FOUND, "no such path under /v2/jobs")


def _not_allowed(method: str, allowed: str) -> tuple[int, dict]:
    return 405, {"error": f"method {method} not allowed here (allowed: {allowed})"}


def _list_request(query: dict) -> jobs_pb2.ListRequest:
    request = jobs_pb2.ListRequest(model=query.get("model", ""),
                                   page_token=query.get("page_token", ""))  # fmt: skip
    state = query.get("state", "")
    if state:
        name = state.upper()
        name = name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
        if name not in jobs_pb2.JobState.keys():
            known = ", ".join(
                n.removeprefix("JOB_STATE_").lower() for n in jobs_pb2.JobState.keys()[1:]
            )
            raise invalid(f"state {state!r} is not a job state ({known})")
        request.state = jobs_pb2.JobState.Value(name)
    size = query.get("page_size", "")
    if size:
        if not size.isdigit():
            raise invalid("page_size must be a whole number")
        request.page_size = int(size)
    return request
