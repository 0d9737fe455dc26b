"""The KServe v2 REST front door (listeners.rest) against a real Triton, called the ways users
call it: tritonclient.http (sync and aio, binary tensors by default), curl and plain JSON."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException

from tests.backends.triton import REPO_ROOT
from tests.builders import triton_backend, variant
from tests.callers import Signer, bearer, callers_config, unsigned
from tests.certs import issue, make_ca
from tests.gateway_process import GatewayProcess
from tests.oip import Y_V1, Y_V2

X = [[1.0, 2.0, 3.0, 4.0]]
LIMIT = 1024 * 1024


def _config(triton, **extra) -> dict:
    return {
        "backends": [triton_backend(triton.address)],
        "routes": [
            {"model": "linear", "variants": [variant("stable", version="1", weight=80),
                                             variant("canary", backend_version="2", version="2",
                                                     weight=20)]},
            {"model": "identity", "variants": [variant("only", backend_model="demo_identity",
                                                       backend_version=None)]},
            {"model": "sleep", "variants": [variant("only", backend_model="demo_sleep",
                                                    backend_version=None)]},
            {"model": "fail", "variants": [variant("only", backend_model="demo_fail",
                                                   backend_version=None)]},
        ],
        "limits": {"max_request_bytes": LIMIT},
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def gateway(triton):
    with GatewayProcess(_config(triton), rest=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.rest_url, timeout=10) as client:
        yield client


def _linear_inputs(client_module, x=X):
    item = client_module.InferInput("INPUT0", [1, 4], "FP32")
    item.set_data_from_numpy(np.array(x, dtype=np.float32))
    return [item]


def _triton_count(triton, model: str) -> int:
    stats = httpx.get(f"http://{triton.http_address}/v2/models/{model}/stats").json()
    return sum(
        s["inference_stats"]["success"]["count"] + s["inference_stats"]["fail"]["count"]
        for s in stats["model_stats"]
    )


def test_tritonclient_http_sync_gets_what_direct_triton_gives(gateway, triton):
    through = httpclient.InferenceServerClient(gateway.rest_address)
    direct = httpclient.InferenceServerClient(triton.http_address)
    assert through.is_server_live() and through.is_server_ready()
    assert through.is_model_ready("linear", "1")
    got = through.infer("linear", _linear_inputs(httpclient), model_version="1")
    want = direct.infer("demo_linear", _linear_inputs(httpclient), model_version="1")
    assert got.as_numpy("OUTPUT0").tolist() == want.as_numpy("OUTPUT0").tolist() == [Y_V1]
    assert got.get_response()["model_name"] == "linear"
    assert got.get_response()["model_version"] == "1"
    # Outputs asked for by name, as JSON (binary_data=False) and as binary (the default).
    for binary in (False, True):
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
        got = through.infer("linear", _linear_inputs(httpclient), model_version="2",
                            outputs=outputs)  # fmt: skip
        assert got.as_numpy("OUTPUT0").tolist() == [Y_V2]
    # The version-less route is weighted: both variants answer over 60 calls.
    seen = {
        tuple(through.infer("linear", _linear_inputs(httpclient)).as_numpy("OUTPUT0")[0])
        for _ in range(60)
    }
    assert seen == {tuple(Y_V1), tuple(Y_V2)}
    through.close()
    direct.close()


def test_tritonclient_http_aio(gateway):
    async def run():
        client = httpclient_aio.InferenceServerClient(gateway.rest_address)
        try:
            results = await asyncio.gather(
                *(client.infer("linear", _linear_inputs(httpclient_aio), model_version="1")
                  for _ in range(8))
            )  # fmt: skip
            metadata = await client.get_model_metadata("linear")
        finally:
            await client.close()
        return [r.as_numpy("OUTPUT0").tolist() for r in results], metadata

    outputs, metadata = asyncio.run(run())
    assert outputs == [[Y_V1]] * 8
    assert metadata["name"] == "linear"
    assert [i["name"] for i in metadata["inputs"]] == ["INPUT0"]


def test_plain_json_call_answers_v2_json_with_the_variant_headers(http):
    body = {"id": "call-7", "inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}  # fmt: skip
    reply = http.post("/v2/models/linear/versions/2/infer", json=body,
                      headers={"x-request-id": "req-42"})  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-tensorgate-variant"] == "canary"
    assert reply.headers["x-request-id"] == "req-42"
    document = reply.json()
    assert document["model_name"] == "linear" and document["id"] == "call-7"
    assert document["outputs"] == [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3], "data": Y_V2}
    ]


def test_bytes_tensors_round_trip_as_json_and_binary(gateway, http):
    body = {"inputs": [
        {"name": "INPUT0", "shape": [2], "datatype": "INT32", "data": [5, -6]},
        {"name": "INPUT1", "shape": [2], "datatype": "BYTES", "data": ["héllo", "w"]}]}  # fmt: skip
    reply = http.post("/v2/models/identity/infer", json=body)
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
    assert outputs == {"OUTPUT0": [5, -6], "OUTPUT1": ["héllo", "w"]}
    client = httpclient.InferenceServerClient(gateway.rest_address)
    a = httpclient.InferInput("INPUT0", [2], "INT32")
    a.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    b = httpclient.InferInput("INPUT1", [2], "BYTES")
    b.set_data_from_numpy(np.array([b"\x00\xffraw", b"x"], dtype=np.object_))
    result = client.infer("identity", [a, b])
    assert result.as_numpy("OUTPUT1").tolist() == [b"\x00\xffraw", b"x"]
    client.close()


def test_curl_as_the_readme_shows_it(gateway):
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]})  # fmt: skip
    out = subprocess.run(
        ["curl", "-sS", "-i", "-X", "POST", "-H", "content-type: application/json", "-d", body,
         f"{gateway.rest_url}/v2/models/linear/versions/1/infer"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout  # fmt: skip
    head, _, payload = out.partition("\n\n")  # text mode: curl's CRLFs read as newlines
    assert head.startswith("HTTP/1.1 200")
    assert json.loads(payload)["outputs"][0]["data"] == Y_V1


def test_metadata_ready_config_stats_and_index_match_the_grpc_answers(gateway, triton, http):
    meta = http.get("/v2/models/linear/versions/1").json()
    direct = httpx.get(f"http://{triton.http_address}/v2/models/demo_linear/versions/1").json()
    assert meta["name"] == "linear" and meta["versions"] == ["1", "2"]
    assert meta["inputs"] == direct["inputs"] and meta["outputs"] == direct["outputs"]
    config = http.get("/v2/models/linear/config")
    assert config.status_code == 200
    direct_config = httpx.get(f"http://{triton.http_address}/v2/models/demo_linear/config").json()
    assert config.json()["name"] == "linear"
    assert config.json()["max_batch_size"] == direct_config["max_batch_size"]
    assert config.json()["input"][0]["dims"] == direct_config["input"][0]["dims"]
    assert http.get("/v2/models/linear/ready").json() == {"name": "linear", "ready": True}
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    server = http.get("/v2").json()
    assert server["name"] == "tensorgate" and "binary_tensor_data" in server["extensions"]
    http.post("/v2/models/linear/versions/1/infer", json={"inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})  # fmt: skip
    stats = http.get("/v2/models/linear/versions/1/stats").json()["model_stats"]
    assert stats[0]["name"] == "linear" and stats[0]["inference_stats"]["success"]["count"] >= 1
    assert isinstance(stats[0]["inference_stats"]["success"]["count"], int)
    index = http.post("/v2/repository/index", json={"ready": True}).json()
    assert {"name": "linear", "version": "2", "state": "READY"}.items() <= index[1].items()
    assert {m["name"] for m in index} == {"linear", "identity", "sleep", "fail"}


def _linear(data, shape=(1, 4), datatype="FP32", name="INPUT0"):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v2/models/nope/infer", _linear([1, 2, 3, 4]), 404, "nope"),
        ("/v2/models/linear/versions/9/infer", _linear([1, 2, 3, 4]), 404, "9"),
        ("/v2/models/linear/infer", b"{not json", 400, "not valid JSON"),
        ("/v2/models/linear/infer", [1, 2], 400, "JSON object"),
        ("/v2/models/linear/infer", _linear([1, 2, 3]), 400, "has 4 elements, data has 3"),
        ("/v2/models/linear/infer", _linear(["a", "b", "c", "d"]), 400, "string values, not FP32"),
        ("/v2/models/linear/infer", _linear([1, 2, 3, 4], datatype="FP99"), 400, "datatype"),
        ("/v2/models/linear/infer", _linear([[1, 2], [3]]), 400, "rectangular"),
        ("/v2/models/linear/infer", {"inputs": [], "extra": 1}, 400, "unknown field(s) 'extra'"),
        ("/v2/models/linear/infer", _linear([1, 2, 3, 4], shape=(1, -4)), 400, "non-negative"),
        ("/v2/models/identity/infer", _linear([1, 1 << 40], shape=(2,), datatype="INT32"), 400,
         "out of INT32's range"),
        ("/v2/models/linear/infer", _linear([1, 2, 3, 4], name="WRONG"), 400, "WRONG"),
        ("/v2/models/linear/nothing", _linear([1]), 404, "no such endpoint"),
        ("/v3/anything", {}, 404, "no such endpoint"),
    ],
)  # fmt: skip
def test_bad_requests_get_the_v2_status_and_a_message_naming_the_problem(
    http, triton, path, body, status, says
):
    before = _triton_count(triton, "demo_linear")
    if isinstance(body, bytes):
        reply = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        reply = http.post(path, json=body)
    assert reply.status_code == status, reply.text
    assert says in reply.json()["error"]
    assert "Traceback" not in reply.text
    assert _triton_count(triton, "demo_linear") == before  # refused before any backend


def test_method_size_encoding_and_deadline_are_checked_before_any_backend(http, triton):
    assert http.get("/v2/models/linear/infer").status_code == 405
    assert http.get("/v2/models/linear/infer").headers["allow"] == "POST"
    before = _triton_count(triton, "demo_linear")
    big = json.dumps(_linear([0.5] * (LIMIT // 4), shape=(1, LIMIT // 4))).encode()
    reply = http.post("/v2/models/linear/infer", content=big)
    assert reply.status_code == 413 and "limits.max_request_bytes" in reply.json()["error"]
    # A gzip bomb: a few KiB that inflate past the limit are refused, not inflated.
    bomb = gzip.compress(b" " * (LIMIT * 4))
    reply = http.post("/v2/models/linear/infer", content=bomb,
                      headers={"content-encoding": "gzip"})  # fmt: skip
    assert reply.status_code == 413
    assert http.post("/v2/models/linear/infer", content=b"x",
                     headers={"content-encoding": "br"}).status_code == 415  # fmt: skip
    assert _triton_count(triton, "demo_linear") == before
    # Compressed bodies that fit are served (tritonclient's request_compression_algorithm).
    packed = zlib.compress(json.dumps(_linear([1, 2, 3, 4])).encode())
    reply = http.post("/v2/models/linear/versions/1/infer", content=packed,
                      headers={"content-encoding": "deflate"})  # fmt: skip
    assert reply.status_code == 200 and reply.json()["outputs"][0]["data"] == Y_V1
    bad = http.post("/v2/models/linear/infer", json=_linear([1, 2, 3, 4]),
                    headers={"x-tensorgate-timeout-ms": "soon"})  # fmt: skip
    assert bad.status_code == 400 and "x-tensorgate-timeout-ms" in bad.json()["error"]


def test_the_deadline_header_bounds_the_call_504(http):
    started = time.monotonic()
    reply = http.post("/v2/models/sleep/infer", json=_linear([2.0], shape=(1,)),
                      headers={"x-tensorgate-timeout-ms": "300"})  # fmt: skip
    elapsed = time.monotonic() - started
    assert reply.status_code == 504, reply.text
    assert 0.25 < elapsed < 1.5


def test_a_model_error_is_a_v2_error_with_the_backend_message(http):
    reply = http.post("/v2/models/fail/infer", json=_linear([-1.0], shape=(1,)))
    assert reply.status_code in (400, 500), reply.text
    assert "demo_fail: INPUT0 must be >= 0" in reply.json()["error"]
    assert http.post("/v2/models/fail/infer", json=_linear([1.0], shape=(1,))).status_code == 200


def test_an_endless_request_head_is_cut_off(gateway):
    host, port = gateway.rest_address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Long: ")
        answer = b""
        try:
            for _ in range(200):  # 200 x 1 KiB: past the 64 KiB bound
                conn.sendall(b"a" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]


def test_rest_calls_are_counted_by_protocol(gateway, http):
    http.post("/v2/models/linear/versions/1/infer", json=_linear([1, 2, 3, 4]))
    metrics = httpx.get(gateway.metrics_url).text
    rest = [line for line in metrics.splitlines()
            if line.startswith("tensorgate_requests_total{") and 'protocol="rest"' in line
            and 'model="linear"' in line and 'code="OK"' in line]  # fmt: skip
    assert rest and float(rest[0].rsplit(" ", 1)[1]) >= 1


def test_sigterm_drain_finishes_rest_calls_in_flight_and_refuses_new_ones(triton):
    config = _config(triton, lifecycle={"shutdown_grace": "10s", "drain_delay": "0s"})
    gw = GatewayProcess(config, rest=True).start()
    try:
        results = {}

        def slow_call():
            results["slow"] = httpx.post(
                f"{gw.rest_url}/v2/models/sleep/infer", json=_linear([1.5], shape=(1,)),
                timeout=10,
            )  # fmt: skip

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        gw.proc.send_signal(signal.SIGTERM)
        caller.join(10)
        assert results["slow"].status_code == 200, results["slow"].text
        assert gw.proc.wait(15) == 0
    finally:
        gw.stop()


def test_serve_workers_2_both_serve_rest(triton):
    with GatewayProcess(_config(triton), rest=True, workers=2) as gw:
        answered = 0
        for _ in range(20):
            with httpx.Client(base_url=gw.rest_url, timeout=10) as fresh:  # a new connection
                reply = fresh.post("/v2/models/linear/versions/1/infer",
                                   json=_linear([1, 2, 3, 4]))  # fmt: skip
                answered += reply.status_code == 200
        assert answered == 20
        metrics = httpx.get(gw.metrics_url).text
        workers = {line.split('worker="')[1].split('"')[0] for line in metrics.splitlines()
                   if line.startswith("tensorgate_requests_total{") and 'protocol="rest"' in line}  # fmt: skip
        assert workers == {"0", "1"}, workers


def test_tritonclient_http_errors_raise_with_the_gateway_message(gateway):
    client = httpclient.InferenceServerClient(gateway.rest_address)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("nope", _linear_inputs(httpclient))
    assert "nope" in str(raised.value)
    client.close()


def test_callers_by_jwt_rules_and_limits_apply_as_on_grpc(triton, tmp_path):
    signer = Signer(tmp_path)
    config = _config(triton, callers=callers_config(signer))
    config["routes"][0]["authorization"] = {"rules": [{"name": "fraud", "callers": ["fraud-svc"]}]}
    config["routes"][1]["rate_limits"] = [{"name": "tight", "calls_per_second": 1, "burst": 2}]
    with GatewayProcess(config, rest=True) as gw, httpx.Client(base_url=gw.rest_url) as http:
        body = _linear([1, 2, 3, 4])
        anonymous = http.post("/v2/models/linear/versions/1/infer", json=body)
        assert anonymous.status_code == 401 and "Bearer" in anonymous.json()["error"]
        forged = http.post("/v2/models/linear/versions/1/infer", json=body,
                           headers=dict(bearer(unsigned("fraud-svc"))))  # fmt: skip
        assert forged.status_code == 401
        other = dict(bearer(signer.token("web-svc")))
        refused = http.post("/v2/models/linear/versions/1/infer", json=body, headers=other)
        assert refused.status_code == 403 and "web-svc" in refused.json()["error"]
        # the same refusal for a model that does not exist: nothing learned
        missing = http.post("/v2/models/secret/infer", json=body, headers=other)
        assert (missing.status_code, "web-svc" in missing.json()["error"]) == (403, True)
        allowed = dict(bearer(signer.token("fraud-svc")))
        reply = http.post("/v2/models/linear/versions/1/infer", json=body, headers=allowed)
        assert reply.status_code == 200 and reply.json()["outputs"][0]["data"] == Y_V1
        index = http.post("/v2/repository/index", headers=other).json()
        assert "linear" not in {m["name"] for m in index}
        statuses = [
            http.post("/v2/models/identity/infer", headers=other, json={"inputs": [
                {"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [1]}]}).status_code
            for _ in range(6)
        ]  # fmt: skip
        assert statuses[:2] == [200, 200] and 429 in statuses, statuses
        limited = http.post("/v2/models/identity/infer", headers=other, json={"inputs": [
            {"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [1]}]})  # fmt: skip
        assert limited.status_code == 429 and "x-tensorgate-retry-after-ms" in limited.headers


def test_https_with_client_certificates_names_the_caller(triton, tmp_path):
    ca = make_ca(tmp_path, "ca")
    server = issue(tmp_path, ca, "gateway", server=True)
    fraud = issue(tmp_path, ca, "fraud", server=False, uri="spiffe://test/ns/risk/sa/fraud")
    other = issue(tmp_path, ca, "other", server=False, uri="spiffe://test/ns/web/sa/frontend")
    config = _config(triton, callers={"client_cert": {}})
    config["listeners"] = {
        "data_plane_tls": {
            "cert_file": str(server[1]),
            "key_file": str(server[0]),
            "client_ca_file": str(ca[1]),
        }
    }
    config["routes"][0]["authorization"] = {"rules": [
        {"name": "risk", "callers": ["spiffe://test/ns/risk/sa/fraud"]}]}  # fmt: skip
    gateway = GatewayProcess(config, rest=True).start(wait="none")
    with gateway:
        url = f"https://{gateway.rest_address}/v2/models/linear/versions/1/infer"

        def call(client_cert):
            context = ssl.create_default_context(cafile=str(ca[1]))
            context.load_cert_chain(str(client_cert[1]), str(client_cert[0]))
            deadline = time.monotonic() + 30
            while True:
                try:
                    return httpx.post(url, json=_linear([1, 2, 3, 4]), verify=context,
                                      timeout=10)  # fmt: skip
                except httpx.ConnectError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        assert call(fraud).json()["outputs"][0]["data"] == Y_V1
        refused = call(other)
        assert refused.status_code == 403
        assert "spiffe://test/ns/web/sa/frontend" in refused.json()["error"]
        with pytest.raises(httpx.HTTPError):  # no client certificate: no TLS session
            no_cert = ssl.create_default_context(cafile=str(ca[1]))
            httpx.post(url, json=_linear([1, 2, 3, 4]), verify=no_cert, timeout=10)


@pytest.mark.parametrize("doc", ["README.md", "docs/rest.md"])
def test_the_docs_curl_commands_answer_as_shown(gateway, doc):
    text = (REPO_ROOT / doc).read_text()
    blocks = re.findall(r"^(curl -s[^\n]*(?:\\\n[^\n]*)*)\n# (\{[^\n]*\})$", text, re.M)
    assert blocks, f"{doc}: no curl command followed by its answer"
    for command, shown in blocks:
        command = command.replace("127.0.0.1:8000", gateway.rest_address)
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=20)
        assert json.loads(out.stdout) == json.loads(shown), (command, out.stdout, out.stderr)


def test_bodies_in_flight_share_the_memory_bulkhead(triton):
    # Budget 3 KiB, each request 2 KiB (padded JSON): while one waits on the slow model, a
    # second does not fit and is refused 429 before it is parsed; the first is answered.
    config = _config(triton)
    config["limits"] = {"max_request_bytes": 2048, "max_in_flight_bytes": 3072}
    with GatewayProcess(config, rest=True) as gw:
        body = json.dumps(_linear([1.0], shape=(1,))).encode()  # demo_sleep: 1 s
        padded = body[:-1] + b" " * (2000 - len(body)) + b"}"
        results = {}

        def call(name):
            results[name] = httpx.post(f"{gw.rest_url}/v2/models/sleep/infer", content=padded,
                                       headers={"content-type": "application/json"}, timeout=10)  # fmt: skip

        first = threading.Thread(target=call, args=("first",))
        first.start()
        time.sleep(0.3)
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32",
                                       "data": [0.0]}]}).encode()  # fmt: skip
        second = httpx.post(f"{gw.rest_url}/v2/models/sleep/infer",
                            content=body[:-1] + b" " * (2000 - len(body)) + b"}", timeout=10)  # fmt: skip
        first.join(10)
        assert second.status_code == 429, second.text
        assert "limits.max_in_flight_bytes" in second.json()["error"]
        assert results["first"].status_code == 200
