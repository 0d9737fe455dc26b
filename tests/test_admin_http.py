"""The admin API over HTTP (`/admin/v1/<Method>` on the admin listener, transcoded from the admin
protos): what gRPC answers, HTTP answers as JSON, with the same tokens and roles, gRPC status codes
mapped to HTTP ones, and every bad request refused with a 4xx naming what was wrong. Against a
real gateway process and a real Triton; the gRPC admin API on the same port is the reference."""

from __future__ import annotations

import base64
import http.client
import json
import subprocess

import grpc
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import openapi
from gateway.controlplane.admin import transcode
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway_process import ADMIN_TOKEN, READ_TOKEN, GatewayProcess, triton_backend

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def variant(name: str, weight: int, version: str = "1") -> dict:
    return {"name": name, "backend": "triton-a", "backend_model": "demo_linear",
            "backend_version": version, "weight": weight}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(triton):
    config = {
        "backends": [triton_backend(triton.address)],
        "routes": [{"model": "linear", "variants": [variant("stable", 90), variant("canary", 10, "2")]}],
    }  # fmt: skip
    with GatewayProcess(config, admin=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def admin_grpc(gateway):
    with grpc.insecure_channel(gateway.admin_address) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def call(gw, method: str, path: str, body=None, token: str | None = ADMIN_TOKEN, headers=None):
    """(status, headers, body as JSON when it is JSON, else bytes)."""
    host, _, port = gw.admin_address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Bearer {token}")
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=body, headers=sent)
        reply = connection.getresponse()
        data = reply.read()
        kind = reply.getheader("Content-Type", "")
        return reply.status, dict(reply.getheaders()), json.loads(data) if "json" in kind else data
    finally:
        connection.close()


def live_revision(admin_grpc) -> int:
    table = admin_grpc.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=10)
    return table.revision.number


def test_reads_answer_what_grpc_answers(gateway, admin_grpc):
    reference = admin_grpc.GetRouteTable(
        admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=10
    )
    expected = json_format.MessageToDict(
        reference, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for method, body in (("POST", None), ("POST", {}), ("GET", None)):
        status, headers, got = call(gateway, method, "/admin/v1/GetRouteTable", body)
        assert status == 200 and headers["Content-Type"] == "application/json", got
        assert got == expected
    # Field names as in the .proto (and the config file); 64-bit integers as strings.
    assert got["routes"][0]["variants"][0]["backend_model"] == "demo_linear"
    assert got["revision"]["number"] == str(reference.revision.number)
    # A read-only method with its fields as query parameters.
    status, _, got = call(gateway, "GET", "/admin/v1/ListRevisions?limit=1")
    assert status == 200 and len(got["revisions"]) == 1


def test_a_change_over_http_is_a_change_everywhere(gateway, admin_grpc):
    before = live_revision(admin_grpc)
    status, _, got = call(
        gateway, "POST", "/admin/v1/SetVariantWeights",
        {"model": "linear", "weights": {"stable": 70, "canary": 30}, "expected_revision": before},
    )  # fmt: skip
    assert status == 200, got
    assert got["revision"]["number"] == str(before + 1) and got["revision"]["author"] == "ops"
    weights = {v["name"]: v["weight"] for v in got["route"]["variants"]}
    assert weights == {"stable": 70, "canary": 30}
    table = admin_grpc.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=10)
    assert table.revision.number == before + 1
    assert [v.weight for v in table.routes[0].variants] == [70, 30]
    # A stale expected_revision: FAILED_PRECONDITION, 409, nothing changed.
    status, _, got = call(
        gateway, "POST", "/admin/v1/SetVariantWeights",
        {"model": "linear", "weights": {"stable": 1}, "expected_revision": str(before)},
    )  # fmt: skip
    assert status == 409 and got["code"] == "FAILED_PRECONDITION", got
    assert f"the live revision is {before + 1}" in got["error"]
    assert live_revision(admin_grpc) == before + 1


def test_same_tokens_and_roles_as_grpc(gateway, admin_grpc):
    before = live_revision(admin_grpc)
    change = {"model": "linear", "weights": {"stable": 50}}
    status, headers, got = call(gateway, "POST", "/admin/v1/SetVariantWeights", change, token=None)
    assert status == 401 and got["code"] == "UNAUTHENTICATED"
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    assert "authorization: Bearer <token>" in got["error"]
    for token in ("not-a-token-0123456789", "é-not-ascii-0123456789"):
        status, _, got = call(gateway, "GET", "/admin/v1/GetRouteTable", token=token)
        assert status == 401 and got["code"] == "UNAUTHENTICATED", got
    status, _, got = call(gateway, "POST", "/admin/v1/SetVariantWeights", change, token=READ_TOKEN)
    assert status == 403 and got["code"] == "PERMISSION_DENIED"
    assert "'viewer' has read-only access" in got["error"]
    # Refused before the body is read: a malformed body from a read-only token is still a 403.
    status, _, got = call(gateway, "POST", "/admin/v1/SetShadow", b"{nope", token=READ_TOKEN)
    assert status == 403, got
    assert live_revision(admin_grpc) == before
    # Read methods take a read token; Basic with the token as the password works like Bearer.
    assert call(gateway, "GET", "/admin/v1/GetBackendStatus", token=READ_TOKEN)[0] == 200
    basic = base64.b64encode(f"anyone:{READ_TOKEN}".encode()).decode()
    auth = {"Authorization": f"Basic {basic}"}
    assert call(gateway, "GET", "/admin/v1/GetRouteTable", token=None, headers=auth)[0] == 200
    for token in (ADMIN_TOKEN, READ_TOKEN):
        assert token not in gateway.log()


@pytest.mark.parametrize(
    "method, path, body, status, code, words",
    [
        ("POST", "/admin/v1/SetVariantWeights", b"{not json", 400, "INVALID_ARGUMENT",
         "the body is not JSON: Expecting property name"),
        ("POST", "/admin/v1/SetVariantWeights", [1, 2], 400, "INVALID_ARGUMENT",
         "must be a JSON object (a SetVariantWeightsRequest), not list"),
        ("POST", "/admin/v1/SetVariantWeights", {"model": "linear", "wieghts": {}}, 400,
         "INVALID_ARGUMENT", 'no field named "wieghts" at "SetVariantWeightsRequest"; it has '
         "model, weights, expected_revision"),
        ("POST", "/admin/v1/SetVariantWeights", {"model": "linear", "weights": {"stable": "x"}},
         400, "INVALID_ARGUMENT", "Failed to parse weights field"),
        ("POST", "/admin/v1/SetVariantWeights", {"model": "linear", "weights": {"stable": -1}},
         400, "INVALID_ARGUMENT", "Value out of range: -1"),
        ("POST", "/admin/v1/StartRollout", {"model": "linear", "min_step_duration": "soon"},
         400, "INVALID_ARGUMENT", "Failed to parse min_step_duration field"),
        ("POST", "/admin/v1/SetVariantWeights", {"model": "nope", "weights": {"a": 1}}, 404,
         "NOT_FOUND", "nope"),
        ("POST", "/admin/v1/SetVariantWeights", {"model": "linear", "weights": {"nope": 1}},
         400, "INVALID_ARGUMENT", "nope"),
        ("GET", "/admin/v1/ListRevisions?limit=many", None, 400, "INVALID_ARGUMENT",
         "Failed to parse limit field"),
        ("GET", "/admin/v1/ListRevisions?lmit=1", None, 400, "INVALID_ARGUMENT",
         "unknown query parameter 'lmit': ListRevisionsRequest has limit"),
        ("GET", "/admin/v1/ListRevisions?limit=1&limit=2", None, 400, "INVALID_ARGUMENT",
         "limit given more than once"),
        ("GET", "/admin/v1/SetVariantWeights", None, 405, "UNIMPLEMENTED", "use POST"),
        ("DELETE", "/admin/v1/GetRouteTable", None, 405, "UNIMPLEMENTED", "use GET or POST"),
        ("POST", "/admin/v1/SetWeights", {}, 404, "NOT_FOUND",
         "no admin method 'SetWeights': /admin/v1/<Method> is one of GetRouteTable, "
         "SetVariantWeights,"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_4xx_naming_the_problem(
    gateway, method, path, body, status, code, words
):
    got_status, headers, got = call(gateway, method, path, body)
    assert (got_status, got["code"]) == (status, code), got
    assert words in got["error"], got["error"]
    assert headers["Content-Type"] == "application/json"
    if status == 405:
        assert headers["Allow"] in ("POST", "GET, POST")
    assert "Traceback" not in got["error"] and "Traceback" not in gateway.log()


def test_bodies_are_bounded_before_they_are_read(gateway):
    big = b'{"source": "' + b"x" * (4 << 20) + b'"}'
    status, _, got = call(gateway, "POST", "/admin/v1/ApplyRouteTable", big)
    assert status == 413 and "at most 4194304" in got["error"], got
    status, _, got = call(
        gateway, "POST", "/admin/v1/GetRouteTable", b"{}",
        headers={"Content-Type": "text/plain"},
    )  # fmt: skip
    assert status == 415 and "must be application/json, not 'text/plain'" in got["error"]
    host, _, port = gateway.admin_address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/admin/v1/GetRouteTable")
    connection.putheader("Authorization", f"Bearer {ADMIN_TOKEN}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders(b"2\r\n{}\r\n0\r\n\r\n")
    reply = connection.getresponse()
    assert reply.status == 411 and b"Content-Length" in reply.read()
    connection.close()


def test_curl_with_a_large_body(gateway):
    """curl asks `Expect: 100-continue` before a body over 1 MiB; it gets the answer at once."""
    routes = [{"model": f"m{i}", "variants": [variant("v", 1)]} for i in range(9000)]
    body = json.dumps({"routes": routes, "dry_run": True, "source": "curl"})
    assert 1 << 20 < len(body) < 4 << 20
    run = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
         "-H", "Content-Type: application/json", "--data-binary", "@-", "-w", "\n%{http_code}",
         f"http://{gateway.admin_address}/admin/v1/ApplyRouteTable"],
        input=body, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    answer, _, status = run.stdout.rpartition("\n")
    assert status == "200", run.stdout[-2000:] + run.stderr
    got = json.loads(answer)
    assert got["dry_run"] is True and got["changed"] is True and "+route m8999" in got["summary"]


def test_the_description_is_served_without_a_token(gateway):
    status, headers, got = call(gateway, "GET", "/openapi.json", token=None)
    assert status == 200 and got == json.loads(openapi.document_json("admin"))
    assert set(got["paths"]) == {
        f"/admin/v1/{m.name}" for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods
    }
    status, headers, page = call(gateway, "GET", "/docs", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'data-spec="/openapi.json"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, headers, script = call(gateway, "GET", "/docs/swagger-ui-bundle.js", token=None)
    assert status == 200 and script == openapi.asset("swagger-ui-bundle.js")[0]
    assert headers["Content-Type"].startswith("text/javascript")
    status, _, _ = call(gateway, "HEAD", "/docs/swagger-ui.css", token=None)
    assert status == 200
    for path in ("/docs/../gateway.yaml", "/docs/swagger-ui-bundle.js.map", "/docs/LICENSE"):
        assert call(gateway, "GET", path, token=None)[0] == 404
    assert call(gateway, "POST", "/openapi.json", {}, token=None)[0] == 405


SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


def shaped(descriptor, depth: int = 0):
    """JSON shaped like `descriptor`'s message (its real field names, nested messages as
    objects), with any JSON value here and there, and unknown keys now and then."""
    fields = list(descriptor.fields)
    if not fields or depth > 3:
        return st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)

    def value(field):
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if field.message_type.full_name.startswith("google.protobuf."):
                item = st.text(max_size=12) | JSON_VALUES
            else:
                item = shaped(field.message_type, depth + 1) | JSON_VALUES
        else:
            item = JSON_VALUES
        return st.lists(item, max_size=3) | JSON_VALUES if field.is_repeated else item

    return st.fixed_dictionaries(
        {}, optional={f.name: value(f) for f in fields} | {"unknown_field": JSON_VALUES}
    )


@st.composite
def bodies(draw):
    """A method and a JSON body shaped like its request (real field names at every level)."""
    method = draw(st.sampled_from(list(SERVICE.methods)))
    return method.name, json.dumps(draw(shaped(method.input_type))).encode()


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(bodies())
def test_any_json_body_is_a_message_or_a_400_never_an_exception(case):
    """Unit-level: the transcoder's parsing alone, against every method's request message."""
    name, body = case
    transcoder = transcode.Transcoder("/nonexistent")
    try:
        message = transcoder.from_json(name, body)
    except transcode.BadRequest as err:
        assert str(err) and "Traceback" not in str(err)
    else:
        message.SerializeToString()
