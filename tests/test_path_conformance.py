"""One route policy, every request path: each scenario is a route plus calls plus what a caller
sees (answer, status, trailers, metrics), run against every path that serves it: the unary Python
path (ModelInfer on the gateway), ModelStreamInfer on the gateway, Envoy mode (a real Envoy
fed by the gateway over xDS), and the KServe v2 REST listener (JSON bodies over HTTP/1.1). All
against one real Triton.

Where a path cannot apply a policy itself it must hand the call to one that does (Envoy mode
hands the route to the Python data plane; the stream relay runs the message through the unary
chain), and the caller must see the same outcome. Outputs show which variant answered on every
path: version 1 of demo_linear answers Y_V1, version 2 Y_V2.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from adapters.codecs.oip import input_array
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.backends.process import free_port
from tests.builders import oip_stub, triton_backend, variant
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess
from tests.loadgen import scrape
from tests.oip import Y_V1, Y_V2, linear_request, output, sleep_request
from tests.test_envoy_dataplane import envoy_in_front

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
PATHS = ("unary", "stream", "envoy", "rest")
# The gRPC code a REST status stands for (gateway/dataplane/rest/app.py maps the other way).
CODE_OF_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                  501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip

STATIC = {"outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3],
                       "fp_values": [0.5, 0.5, 0.5]}]}  # fmt: skip
ROUTES = [
    {"model": "weighted",
     "variants": [variant("v1", version="1", weight=80),
                  variant("v2", backend_version="2", version="2", weight=20)]},
    {"model": "renamed", "variants": [variant("only", version="7")]},
    {"model": "fallback_variant",
     "variants": [variant("down", backend="dead", version="1"), variant("up", version="1", weight=0)],
     "policy": {"fallback": [{"variant": "up"}]}},
    {"model": "fallback_model", "variants": [variant("down", backend="dead", version="1")],
     "policy": {"fallback": [{"model": "renamed"}]}},
    {"model": "fallback_static", "variants": [variant("down", backend="dead", version="1")],
     "policy": {"fallback": [{"static_response": STATIC}]}},
    {"model": "schema", "variants": [variant("only", version="1")],
     "schema": {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 3]}]}},
    {"model": "cached", "variants": [variant("only", version="1")],
     "policy": {"response_cache": {"deterministic": True}}},
    {"model": "batched",
     "variants": [variant("only", version="1",
                          batching={"max_batch_size": 4, "max_queue_delay": "0.05s"})]},
    {"model": "drifted", "variants": [variant("only", backend_version="2", version="2")],
     "policy": {"drift": {"outputs": ["OUTPUT0"], "sample_ratio": 1.0, "window": 100,
                          "reference_size": 10}}},
    {"model": "slow", "variants": [variant("s", backend_model="demo_sleep", backend_version=None)],
     "policy": {"timeout": "0.3s"}},
    # a fallback to model "fb" from a route that batches a variant of the same name: fb's call
    # takes fb's own chain, not fa's (whose batcher for "stable" it could join)
    {"model": "fa",
     "variants": [variant("stable", backend="dead", version="1",
                          batching={"max_batch_size": 4, "max_queue_delay": "0.01s"})],
     "policy": {"fallback": [{"model": "fb"}]}},
    # half of fb's weight is on a backend health checks find down: fb's own calls avoid it, and
    # so must a fallback to fb (it used to resolve without the health checks' verdict)
    {"model": "fb",
     "variants": [variant("stable", version="1", weight=50),
                  variant("other", backend="dead", backend_version="2", version="2", weight=50)]},
    # half the weight on a backend health checks find down: every path sends all calls to "up"
    {"model": "half_down",
     "variants": [variant("up", version="1", weight=50),
                  variant("down", backend="dead", backend_version="2", version="2", weight=50)]},
    # demo_flaky fails about 1 call in 5 (INTERNAL): ten tries make a failure ~1 in 10 million
    {"model": "retried",
     "variants": [variant("only", backend="triton-flaky", backend_model="demo_flaky", version="1")],
     "policy": {"retry": {"max_attempts": 10, "retry_on": ["INTERNAL", "UNAVAILABLE"],
                          "base_delay": "0.001s", "max_delay": "0.005s", "budget_ratio": 1.0,
                          "budget_min_per_second": 1000}}},
    {"model": "flaky_bare",
     "variants": [variant("only", backend="triton-flaky", backend_model="demo_flaky", version="1")]},
    {"model": "per_try",
     "variants": [variant("s", backend="triton-short", backend_model="demo_sleep", backend_version=None)]},
    {"model": "shadowed",
     "variants": [variant("v1", version="1"), variant("v2", backend_version="2", version="2", weight=0)],
     # (max_concurrency: a stream sends its 10 calls at once; the default 8 would drop two)
     "policy": {"shadow": {"variant": "v2", "fraction": 1.0, "max_concurrency": 32}}},
    # one per path, each on a backend of its own: a breaker's state is per backend (and Envoy's
    # per cluster), so each path must open its own
    *({"model": f"breakable_{path}",
       "variants": [variant("only", backend=f"triton-brk-{path}", backend_model="demo_fail", version="1")]}
      for path in PATHS),
    {"model": "drainable",
     "variants": [variant("x", version="1", weight=50),
                  variant("y", backend="triton-b", backend_version="2", version="2", weight=50)]},
]  # fmt: skip


def _config(triton: str, xds: int, listen: int) -> dict:
    return {
        "listeners": {"xds": f"127.0.0.1:{xds}"},
        "envoy": {"listen": f"127.0.0.1:{listen}"},
        "lifecycle": {"health_check_interval": "0.2s"},
        "backends": [
            triton_backend(triton),
            triton_backend(triton, "triton-b"),
            triton_backend(triton, "triton-short", per_try_timeout="0.3s"),
            *(triton_backend(triton, f"triton-brk-{path}",
                             circuit_breaker={"consecutive_failures": 3, "open_duration": "60s"})
              for path in PATHS),
            # its failures are the model's, by design: they must not open a shared breaker
            triton_backend(triton, "triton-flaky", circuit_breaker={"disabled": True}),
            triton_backend(f"127.0.0.1:{free_port()}", "dead", circuit_breaker={"disabled": True}),
        ],
        "routes": ROUTES,
    }  # fmt: skip


@pytest.fixture(scope="module")
def stack(triton):
    xds, listen = free_port(), free_port()
    gateway = GatewayProcess(_config(triton.address, xds, listen), admin=True, rest=True)
    with envoy_in_front(gateway, "envoy-conformance", 45) as envoy:
        yield gateway, envoy, f"127.0.0.1:{listen}"


@dataclass
class Outcome:
    code: str  # a gRPC code name; in a stream, "OK" or the code the message maps to
    message: str = ""
    outputs: list = field(default_factory=list)
    model: str = ""
    version: str = ""
    trailers: dict = field(default_factory=dict)


class Caller:
    """Calls through one path: a list of requests in, an Outcome per request out (in order)."""

    def __init__(self, path: str, stack) -> None:
        gateway, _, envoy_address = stack
        self.path = path
        self.channel = grpc.insecure_channel(envoy_address if path == "envoy" else gateway.address)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __call__(self, requests, metadata=(), timeout=10.0, concurrent=False) -> list[Outcome]:
        if self.path == "stream":
            return self._stream(requests, metadata, timeout)
        if concurrent:
            futures = [
                self.stub.ModelInfer.future(r, metadata=metadata, timeout=timeout) for r in requests
            ]
            return [self._unary(lambda f=f: f.result(), f) for f in futures]
        return [
            self._unary(
                lambda r=r: self.stub.ModelInfer.with_call(r, metadata=metadata, timeout=timeout)
            )
            for r in requests
        ]

    @staticmethod
    def _unary(call, future=None) -> Outcome:
        try:
            result = call()
        except grpc.RpcError as err:
            return Outcome(err.code().name, err.details() or "")
        if future is not None:
            response, trailers = result, dict(future.trailing_metadata() or ())
        else:
            response, info = result
            trailers = dict(info.trailing_metadata() or ())
        return Outcome(
            "OK", "", output(response), response.model_name, response.model_version, trailers
        )

    def _stream(self, requests, metadata, timeout) -> list[Outcome]:
        ids = []
        for i, request in enumerate(requests):
            copy = oip.ModelInferRequest()
            copy.CopyFrom(request)
            copy.id = f"c{i}"
            ids.append(copy)
        answers: dict[str, Outcome] = {}
        for reply in self.stub.ModelStreamInfer(iter(ids), metadata=metadata, timeout=timeout):
            response = reply.infer_response
            if reply.error_message:
                answers[response.id] = Outcome("ERROR", reply.error_message)
            else:
                answers[response.id] = Outcome(
                    "OK", "", output(response), response.model_name, response.model_version
                )
        return [answers.get(f"c{i}", Outcome("MISSING")) for i in range(len(requests))]


class RestCaller:
    """Calls the REST listener with the v2 JSON form of each request."""

    def __init__(self, gateway) -> None:
        self.client = httpx.Client(base_url=gateway.rest_url, timeout=30)

    def close(self) -> None:
        self.client.close()

    def __call__(self, requests, metadata=(), timeout=10.0, concurrent=False) -> list[Outcome]:
        if concurrent:
            with ThreadPoolExecutor(len(requests)) as pool:
                return list(pool.map(lambda r: self._one(r, metadata, timeout), requests))
        return [self._one(r, metadata, timeout) for r in requests]

    def _one(self, request, metadata, timeout) -> Outcome:
        version = f"/versions/{request.model_version}" if request.model_version else ""
        body = {"inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
             "data": input_array(request, i).reshape(-1).tolist()}
            for i, t in enumerate(request.inputs)]}  # fmt: skip
        headers = {**dict(metadata), "x-tensorgate-timeout-ms": str(int(timeout * 1000))}
        reply = self.client.post(f"/v2/models/{request.model_name}{version}/infer", json=body,
                                 headers=headers)  # fmt: skip
        if reply.status_code != 200:
            return Outcome(CODE_OF_STATUS.get(reply.status_code, "UNKNOWN"),
                           reply.json()["error"], trailers=dict(reply.headers))  # fmt: skip
        document = reply.json()
        return Outcome("OK", "", [float(v) for v in document["outputs"][0]["data"]],
                       document["model_name"], document["model_version"],
                       dict(reply.headers))  # fmt: skip


@pytest.fixture(scope="module")
def callers(stack):
    made = {path: RestCaller(stack[0]) if path == "rest" else Caller(path, stack) for path in PATHS}
    yield made
    for caller in made.values():
        caller.close()


def total(gateway, name: str, model: str) -> float:
    """The sum of a metric's samples for one model, over its other labels."""
    return sum(
        value
        for (sample, labels), value in scrape(gateway.metrics_url).items()
        if sample == name and ("model", model) in labels
    )


def same_error(outcome: Outcome, code: str, text: str) -> None:
    """A refusal: the gRPC code on unary paths; in a stream the same message as error_message."""
    if outcome.code == "ERROR":
        assert text in outcome.message, outcome
    else:
        assert (outcome.code, text in outcome.message) == (code, True), outcome


# --- scenarios: each runs on every path ---------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_weights_80_20(callers, path):
    outcomes = callers[path]([linear_request("weighted")] * 400)
    assert all(o.code == "OK" for o in outcomes), outcomes[:3]
    v1 = sum(o.outputs == Y_V1 for o in outcomes)
    assert v1 + sum(o.outputs == Y_V2 for o in outcomes) == 400
    assert 0.72 <= v1 / 400 <= 0.88, v1


@pytest.mark.parametrize("path", PATHS)
def test_pinning_and_unknown_versions_and_models(callers, path):
    for version, y in (("1", Y_V1), ("2", Y_V2)):
        outcomes = callers[path]([linear_request("weighted", version)] * 10)
        assert {(o.code, tuple(o.outputs), o.version) for o in outcomes} == {
            ("OK", tuple(y), version)
        }
    (unknown_version,) = callers[path]([linear_request("weighted", "9")])
    same_error(unknown_version, "NOT_FOUND", "9")
    (unknown_model,) = callers[path]([linear_request("no_such_model")])
    same_error(unknown_model, "NOT_FOUND", "no_such_model")


@pytest.mark.parametrize("path", PATHS)
def test_sticky_keys(callers, path):
    seen = set()
    for key in (f"user-{i}" for i in range(12)):
        outcomes = callers[path](
            [linear_request("weighted")] * 5, metadata=(("x-tensorgate-route-key", key),)
        )
        variants = {tuple(o.outputs) for o in outcomes}
        assert len(variants) == 1, (key, variants)  # one key, one variant
        seen |= variants
    assert seen == {tuple(Y_V1), tuple(Y_V2)} or len(seen) == 1  # keys spread where weights say


@pytest.mark.parametrize("path", PATHS)
def test_rename_shows_public_names(callers, path):
    (outcome,) = callers[path]([linear_request("renamed", "7")])
    assert (outcome.code, outcome.outputs) == ("OK", Y_V1)
    assert (outcome.model, outcome.version) == ("renamed", "7")


@pytest.mark.parametrize("path", PATHS)
def test_fallback_to_a_variant_a_model_and_a_static_answer(callers, path):
    (variant,) = callers[path]([linear_request("fallback_variant")])
    assert (variant.code, variant.outputs) == ("OK", Y_V1), variant
    (model,) = callers[path]([linear_request("fallback_model")])
    assert (model.code, model.outputs) == ("OK", Y_V1), model
    (static,) = callers[path]([linear_request("fallback_static")])
    assert (static.code, static.outputs) == ("OK", [0.5, 0.5, 0.5]), static


@pytest.mark.parametrize("path", PATHS)
def test_fallback_to_a_model_takes_that_models_chain_and_health(callers, path):
    outcomes = callers[path]([linear_request("fa")] * 20)
    assert [(o.code, o.outputs) for o in outcomes] == [("OK", Y_V1)] * 20, outcomes


@pytest.mark.parametrize("path", PATHS)
def test_a_variant_health_checks_mark_down_gets_no_calls(callers, path):
    outcomes = callers[path]([linear_request("half_down")] * 60)
    assert [(o.code, o.outputs) for o in outcomes] == [("OK", Y_V1)] * 60, [
        o for o in outcomes if o.code != "OK"
    ][:3]


@pytest.mark.parametrize("path", PATHS)
def test_schema_refusal(callers, path):
    # Triton would run this request ([1,4]); the route's schema says [-1,3]
    (outcome,) = callers[path]([linear_request("schema")])
    same_error(outcome, "INVALID_ARGUMENT", "INPUT0")


@pytest.mark.parametrize("path", PATHS)
def test_response_cache_hit(stack, callers, path):
    gateway = stack[0]
    request = linear_request("cached", x=[float(PATHS.index(path)), 1.0, 2.0, 3.0])
    hits = "tensorgate_cache_requests_total"
    before = total(gateway, hits, "cached")
    first, second = callers[path]([request, request])
    assert first.code == second.code == "OK" and first.outputs == second.outputs
    if path != "stream":  # a stream has no trailers per message
        assert "x-tensorgate-cache" not in first.trailers
        assert second.trailers.get("x-tensorgate-cache") == "hit", second.trailers
    assert total(gateway, hits, "cached") == before + 2  # a miss, then a hit


@pytest.mark.parametrize("path", PATHS)
def test_batching_each_caller_gets_its_own_answer(stack, callers, path):
    gateway = stack[0]
    requests = [linear_request("batched", x=[float(i), 0.0, 0.0, 0.0]) for i in range(4)]
    before = total(gateway, "tensorgate_batch_size_count", "batched")
    outcomes = callers[path](requests, concurrent=True)
    direct = [o.outputs for o in callers["unary"]([linear_request("renamed", "7", x=r) for r in (
        [float(i), 0.0, 0.0, 0.0] for i in range(4))])]  # fmt: skip
    assert [o.outputs for o in outcomes] == direct
    assert total(gateway, "tensorgate_batch_size_count", "batched") > before  # batched


@pytest.mark.parametrize("path", PATHS)
def test_drift_gauges_move(stack, callers, path):
    gateway = stack[0]

    def samples():
        return total(gateway, "tensorgate_drift_reference_samples", "drifted") + total(
            gateway, "tensorgate_drift_window_samples", "drifted"
        )

    before = samples()
    outcomes = callers[path]([linear_request("drifted")] * 5)
    assert all(o.outputs == Y_V2 for o in outcomes)
    assert samples() >= before + 5


@pytest.mark.parametrize("path", PATHS)
def test_deadline_exceeded(callers, path):
    start = time.monotonic()
    (outcome,) = callers[path]([sleep_request(2.0, "slow")])
    assert time.monotonic() - start < 1.5
    same_error(outcome, "DEADLINE_EXCEEDED", "")


@pytest.mark.parametrize("path", PATHS)
def test_retry_hides_a_flaky_backend(callers, path):
    outcomes = callers[path]([linear_request("retried")] * 100)
    failed = [o for o in outcomes if o.code != "OK"]
    assert failed == [] and all(o.outputs == Y_V1 for o in outcomes), failed[:3]


def test_the_flaky_backend_fails_without_retries(callers):
    # The scenario above proves something only if the model does fail: straight to Triton's
    # model through a route without retries, some of 100 calls fail.
    outcomes = callers["unary"]([linear_request("flaky_bare")] * 100)
    assert 5 <= sum(o.code != "OK" for o in outcomes) <= 45


@pytest.mark.parametrize("path", PATHS)
def test_per_try_timeout(callers, path):
    start = time.monotonic()
    (outcome,) = callers[path]([sleep_request(2.0, "per_try")], timeout=5.0)
    assert time.monotonic() - start < 1.2
    same_error(outcome, "DEADLINE_EXCEEDED", "")


def _v2_inferences(triton) -> int:
    with oip_stub(triton.address) as stub:
        stats = stub.ModelStatistics(oip.ModelStatisticsRequest(name="demo_linear", version="2"))
    return sum(s.inference_stats.success.count for s in stats.model_stats)


@pytest.mark.parametrize("path", PATHS)
def test_shadow_copies_reach_the_shadow_and_the_caller_sees_the_primary(triton, callers, path):
    before = _v2_inferences(triton)
    outcomes = callers[path]([linear_request("shadowed")] * 10)
    assert [(o.code, o.outputs) for o in outcomes] == [("OK", Y_V1)] * 10
    deadline = time.monotonic() + 5
    while _v2_inferences(triton) < before + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _v2_inferences(triton) >= before + 10


@pytest.mark.parametrize("path", PATHS)
def test_an_open_breaker_fails_fast(callers, path):
    model = f"breakable_{path}"
    (good,) = callers[path]([sleep_request(0.0, model)])
    assert good.code == "OK", good  # the backend answers well-formed calls
    # demo_fail fails a negative input (INTERNAL, a backend failure): three in a row open it
    failures = callers[path]([sleep_request(-1.0, model)] * 3)
    assert all(o.code != "OK" for o in failures), failures
    # ... and then a call the backend would answer is refused without reaching it
    start = time.monotonic()
    (refused,) = callers[path]([sleep_request(0.0, model)])
    assert time.monotonic() - start < 0.5
    same_error(refused, "UNAVAILABLE", "")


def test_drain_moves_every_path_off_the_drained_backend(stack, callers):
    gateway = stack[0]
    with grpc.insecure_channel(gateway.admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.DrainBackend(admin_pb2.DrainBackendRequest(backend="triton-b"), metadata=ADMIN)
        try:
            time.sleep(1.0)  # Envoy's weights push
            for path in PATHS:
                outcomes = callers[path]([linear_request("drainable")] * 100)
                assert all(o.outputs == Y_V1 for o in outcomes), (
                    path,
                    sum(o.outputs == Y_V2 for o in outcomes),
                )
        finally:
            admin.UndrainBackend(
                admin_pb2.UndrainBackendRequest(backend="triton-b"), metadata=ADMIN
            )
