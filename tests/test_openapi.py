"""The OpenAPI 3.1 documents (gateway/openapi): generated from one source and committed fresh,
valid OpenAPI 3.1, the /docs page rendered in a real headless Chromium, and both HTTP APIs fuzzed
against their own document by schemathesis, live:

- the admin API (admin listener) with a read token (every change refused: the route table's
  revision never moves) and with an admin token (a call that failed changed nothing);
- the KServe v2 REST data plane (REST listener) in front of a real Triton behind a recording
  pass-through (tests/recording_proxy.py): nothing reached Triton that Triton refused, i.e. that
  the gateway could have refused itself.
Throughout: no 5xx, and every response conforms to the document (status code, content type,
headers, body schema). Hypothesis runs derandomized with a fixed number of examples per operation,
so a run is reproducible and bounded in time."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess

import grpc
import jsonschema
import pytest
import referencing
import schemathesis
from google.protobuf import json_format
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import openapi
from gateway.controlplane.admin.auth import READ_ONLY_METHODS
from gateway.openapi import schemas
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tensorgate.config.v1 import config_pb2
from tests.backends.triton import REPO_ROOT
from tests.gateway_process import ADMIN_TOKEN, READ_TOKEN, GatewayProcess, triton_backend
from tests.recording_proxy import RecordingProxy

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)
ROUTES = [
    {"model": "linear", "variants": [  # demo_linear: FP32 [-1,4] -> [-1,3]
        {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear",
         "backend_version": "1", "version": "1", "weight": 90},
        {"name": "canary", "backend": "triton-a", "backend_model": "demo_linear",
         "backend_version": "2", "version": "2", "weight": 10},
    ]},
    {"model": "identity", "variants": [  # demo_identity: INT32 INPUT0 [-1], BYTES INPUT1 [-1]
        {"name": "only", "backend": "triton-a", "backend_model": "demo_identity", "weight": 1}]},
]  # fmt: skip


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_openapi", REPO_ROOT / "scripts" / "gen_openapi.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the documents ------------------------------------------------------------------------------


def test_committed_documents_are_what_the_generator_writes():
    for path, content in _generator().generated().items():
        relative = path.relative_to(REPO_ROOT)
        assert path.exists(), f"{relative} is missing: run scripts/gen_openapi.py"
        assert path.read_bytes() == content, f"{relative} is stale: run scripts/gen_openapi.py"
    served = {kind: openapi.document_json(kind) for kind in openapi.KINDS}
    assert served["admin"] == (REPO_ROOT / "docs/openapi/admin.json").read_bytes()
    assert served["data_plane"] == (REPO_ROOT / "docs/openapi/data-plane.json").read_bytes()


@pytest.mark.parametrize("kind", openapi.KINDS)
def test_documents_are_valid_openapi_3_1(kind):
    document = json.loads(openapi.document_json(kind))
    assert document["openapi"] == "3.1.0"
    validate(document, cls=OpenAPIV31SpecValidator)
    broken = json.loads(openapi.document_json(kind))
    first_path = next(iter(broken["paths"].values()))
    next(iter(first_path.values()))["responses"] = "none"
    with pytest.raises(Exception, match='is not of type "object"'):
        validate(broken, cls=OpenAPIV31SpecValidator)  # the validator does look


def test_admin_document_has_every_method_and_get_only_for_reads():
    document = openapi.document("admin")
    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert [p.removeprefix("/admin/v1/") for p in document["paths"]] == [
        m.name for m in service.methods
    ]
    for method in service.methods:
        item = document["paths"][f"/admin/v1/{method.name}"]
        assert set(item) == ({"get", "post"} if method.name in READ_ONLY_METHODS else {"post"})
        post = item["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{method.input_type.full_name}"
        }
        assert {"200", "400", "401", "403", "409", "413", "503"} <= set(post["responses"])
    weights = document["paths"]["/admin/v1/SetVariantWeights"]["post"]
    assert weights["summary"] == "Set the weights of a route's variants at once."
    assert "a stale revision gets ABORTED" in weights["description"]
    assert weights["description"].endswith("Needs an admin token.")
    listing = document["paths"]["/admin/v1/ListRevisions"]["get"]["parameters"]
    assert listing == [
        {"name": "limit", "in": "query", "required": False, "description": "0: all stored.",
         "schema": {"type": "integer", "minimum": 0, "maximum": 4294967295, "examples": [0]}}
    ]  # fmt: skip


def test_schemas_follow_the_proto3_json_mapping():
    found = openapi.document("admin")["components"]["schemas"]
    request = found["tensorgate.admin.v1.StartRolloutRequest"]["properties"]
    assert request["min_step_duration"]["$ref"].endswith("/google.protobuf.Duration")
    assert found["google.protobuf.Duration"]["pattern"] == "^-?[0-9]{1,11}(\\.[0-9]{1,9})?s$"
    assert found["google.protobuf.Timestamp"] == {
        "type": "string", "format": "date-time",
        "description": 'An RFC 3339 time in UTC, e.g. "2026-12-06T07:00:00Z".',
    }  # fmt: skip
    assert request["steps"] == {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 4294967295, "examples": [0]},
        "description": request["steps"]["description"],
    }
    assert request["max_error_ratio_factor"]["type"] == ["number", "string"]
    weights = found["tensorgate.admin.v1.SetVariantWeightsRequest"]["properties"]["weights"]
    assert weights["type"] == "object" and weights["additionalProperties"]["maximum"] == 2**32 - 1
    number = found["tensorgate.admin.v1.Revision"]["properties"]["number"]
    assert number["type"] == ["integer", "string"] and number["pattern"] == "^[0-9]{1,19}$"
    state = found["tensorgate.admin.v1.Rollout.State"]
    assert state["type"] == "string" and "STATE_ROLLED_BACK" in state["enum"]
    step = found["tensorgate.config.v1.FallbackStep"]
    assert {"required": ["variant", "model"]} in step["not"]["anyOf"]
    assert step["properties"]["variant"]["description"].startswith("Another variant")


def _validator(kind: str, name: str) -> jsonschema.Draft202012Validator:
    document = openapi.document(kind)
    resource = referencing.Resource.from_contents(
        document, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource("urn:doc", resource)
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:doc#/components/schemas/{name}"}, registry=registry
    )


def test_what_json_format_writes_the_schemas_accept_and_what_they_refuse_it_refuses():
    table = admin_pb2.GetRouteTableResponse(revision=admin_pb2.Revision(number=7, author="ops"))
    table.revision.created_at.FromSeconds(1_700_000_000)
    route = json_format.ParseDict(ROUTES[0], config_pb2.Route())
    route.policy.timeout.FromMilliseconds(1500)
    route.policy.fallback.add(model="identity")
    table.routes.append(route)
    written = json_format.MessageToDict(
        table, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    validator = _validator("admin", "tensorgate.admin.v1.GetRouteTableResponse")
    validator.validate(written)
    assert written["revision"]["number"] == "7" and written["routes"][0]["policy"]["timeout"]
    bad = {"routes": [{**ROUTES[0], "policy": {"fallback": [{"variant": "a", "model": "b"}]}}]}
    assert not _validator("admin", "tensorgate.admin.v1.ApplyRouteTableRequest").is_valid(bad)
    with pytest.raises(json_format.ParseError, match="multiple"):
        json_format.ParseDict(bad, admin_pb2.ApplyRouteTableRequest())
    for value in ({"weights": {"a": -1}}, {"weights": {"a": "x"}}, {"model": 3}, {"x": 1}):
        assert not _validator("admin", "tensorgate.admin.v1.SetVariantWeightsRequest").is_valid(
            value
        ), value
        with pytest.raises(json_format.ParseError):
            json_format.ParseDict(value, admin_pb2.SetVariantWeightsRequest())


def test_the_proto_comments_file_is_fresh_and_describes_the_api():
    # (also covered by the first test; this says which part is stale)
    from gateway.openapi import comments

    assert json.loads(schemas.COMMENTS.read_text()) == comments.extract()
    assert schemas.comments()["tensorgate.admin.v1.AdminService.ListRevisions"] == (
        "Stored revisions, newest first."
    )


def test_vendored_swagger_ui_is_the_pinned_npm_package():
    pinned = json.loads((REPO_ROOT / "package.json").read_text())["devDependencies"]
    lock = json.loads((REPO_ROOT / "package-lock.json").read_text())["packages"]
    installed = REPO_ROOT / "node_modules" / "swagger-ui-dist"
    assert installed.is_dir(), "node_modules/swagger-ui-dist is missing: run scripts/bootstrap"
    version = json.loads((installed / "package.json").read_text())["version"]
    assert pinned["swagger-ui-dist"] == lock["node_modules/swagger-ui-dist"]["version"] == version
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"):
        vendored = openapi.STATIC / name
        assert vendored.read_bytes() == (installed / name).read_bytes(), f"{name} differs"
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert openapi.asset(name)[0] == (installed / name).read_bytes()
    assert openapi.asset("LICENSE") is None and openapi.asset("../__init__.py") is None


def test_docs_page_loads_only_its_own_assets():
    page = openapi.docs_page('/o.json?a=1&b="2"', "t <x>")
    assert "<title>t &lt;x&gt;</title>" in page
    assert 'data-spec="/o.json?a=1&amp;b=&quot;2&quot;"' in page
    sources = [part.split('"')[0] for part in page.split('src="')[1:]]
    sources += [part.split('"')[0] for part in page.split('href="')[1:]]
    assert sources and all(openapi.asset(s.removeprefix("/docs/")) for s in sources), sources
    assert "<script>" not in page  # no inline script: the CSP refuses it


# -- live: the page in Chromium, and the fuzzing ---------------------------------------------------


@pytest.fixture(scope="module")
def proxy(triton):
    recorder = RecordingProxy(triton.address)
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def admin_gateway(triton):
    with GatewayProcess({"backends": [triton_backend(triton.address)], "routes": ROUTES},
                        admin=True) as gw:  # fmt: skip
        yield gw


@pytest.fixture(scope="module")
def rest_gateway(proxy):
    with GatewayProcess({"backends": [triton_backend(proxy.address)], "routes": ROUTES},
                        rest=True) as gw:  # fmt: skip
        yield gw


@pytest.fixture(scope="module")
def admin_grpc(admin_gateway):
    with grpc.insecure_channel(admin_gateway.admin_address) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def dump_dom(url: str, tmp_path) -> str:
    """The page's DOM after its scripts ran, from a real headless Chromium."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/system-tools", pytrace=False)
    run = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_admin_docs_page_renders_in_chromium(admin_gateway, tmp_path):
    dom = dump_dom(f"http://{admin_gateway.admin_address}/docs", tmp_path)
    assert "tensorgate admin API" in dom
    # Swagger UI drew an operation block per method, from the served document
    assert dom.count('class="opblock-summary-path"') >= 13, dom[-3000:]
    assert "/admin/v1/SetVariantWeights" in dom
    assert "Set the weights of a route's variants at once." in dom.replace("&#39;", "'")


def test_data_plane_docs_page_renders_the_infer_operation(rest_gateway, tmp_path):
    dom = dump_dom(f"{rest_gateway.rest_url}/docs", tmp_path)
    assert "tensorgate data plane (KServe v2 REST)" in dom
    assert "/v2/models/{model}/infer" in dom, dom[-3000:]
    assert "Run the model (the route picks the variant)." in dom


def _revision(admin_grpc) -> int:
    table = admin_grpc.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=10)
    return table.revision.number


# The documents as committed (the first tests show they are what the listeners serve), so the
# operations are known when pytest collects; each call goes to the live listener.
admin_schema = schemathesis.openapi.from_dict(json.loads(openapi.document_json("admin")))
data_plane_schema = schemathesis.openapi.from_dict(json.loads(openapi.document_json("data_plane")))


@admin_schema.parametrize()
@FUZZ
def test_admin_api_fuzzed_with_a_read_token(case, admin_gateway, admin_grpc):
    before = _revision(admin_grpc)
    case.call_and_validate(
        base_url=f"http://{admin_gateway.admin_address}",
        headers={"Authorization": f"Bearer {READ_TOKEN}"},
        checks=CHECKS,
    )
    assert _revision(admin_grpc) == before


@admin_schema.parametrize()
@FUZZ
def test_admin_api_fuzzed_with_an_admin_token(case, admin_gateway, admin_grpc):
    before = _revision(admin_grpc)
    response = case.call_and_validate(
        base_url=f"http://{admin_gateway.admin_address}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        checks=CHECKS,
    )
    if not 200 <= response.status_code < 300:
        assert _revision(admin_grpc) == before, f"a refused {case.operation.label} changed it"


_alternate = itertools.cycle((True, False))


@data_plane_schema.parametrize()
@FUZZ
def test_data_plane_fuzzed(case, rest_gateway, proxy):
    # Half the calls name a real route, so fuzzed bodies reach its checks (and, if they slip
    # past them, Triton); the other half keep the generated names.
    if "model" in (case.path_parameters or {}) and next(_alternate):
        case.path_parameters["model"] = "linear"
    # Inference-Header-Content-Length splits a binary body; on a JSON one it only makes the JSON
    # end early (a 400), so it goes with the binary bodies only.
    if case.media_type == "application/json" and case.headers:
        case.headers.pop("Inference-Header-Content-Length", None)
    # A deadline shorter than the call is the caller's own 504, by design: not what is looked for.
    deadline = str((case.headers or {}).get("x-tensorgate-timeout-ms", ""))
    if deadline.isdigit() and int(deadline) < 5000:
        case.headers["x-tensorgate-timeout-ms"] = "5000"
    seen = len(proxy.outcomes)
    case.call_and_validate(base_url=rest_gateway.rest_url, checks=CHECKS)
    refused_by_triton = [
        (code, details) for _, code, details in proxy.outcomes[seen:] if code != grpc.StatusCode.OK
    ]
    assert not refused_by_triton, f"{case.operation.label} reached Triton, which refused it"
