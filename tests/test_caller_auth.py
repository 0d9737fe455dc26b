"""Caller identity and per-route authorization, on every path: ModelInfer, ModelStreamInfer and
Envoy mode (a real Envoy; with `callers` set it hands every route to the gateway, which then
decides exactly as for a direct call). Real Triton, real tokens (PyJWT, RSA), real mTLS.

The outcomes a caller sees: UNAUTHENTICATED without a valid credential (naming what is
wrong, never echoing the token); PERMISSION_DENIED "caller C may not call model M", the same
for a model that does not exist, so a caller learns nothing of models it may not call; a cache
hit, a fallback or a stream never serves what the route would refuse."""

from __future__ import annotations

import json

import grpc
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from tests.backends.process import free_port
from tests.builders import triton_backend, variant
from tests.callers import Signer, bearer, callers_config, hmac_with_public_key, unsigned
from tests.certs import issue, make_ca
from tests.gateway_process import GatewayProcess
from tests.loadgen import scrape
from tests.oip import Y_V1, Y_V2, linear_request, output
from tests.test_envoy_dataplane import envoy_in_front

PATHS = ("unary", "stream", "envoy")
FRAUD_RULES = {"rules": [
    {"name": "fraud-team", "callers": ["fraud-svc"], "versions": ["1"]},
    {"name": "analysts", "groups": ["analysts"], "route_key": True},
]}  # fmt: skip


def _routes() -> list[dict]:
    dead = {"backend": "dead", "backend_version": "1"}
    return [
        {"model": "open", "variants": [variant("v1")]},
        {"model": "fraud", "authorization": FRAUD_RULES,
         "variants": [variant("v1", version="1"), variant("v2", backend_version="2", version="2")]},
        {"model": "fraud_cached", "authorization": FRAUD_RULES,
         "variants": [variant("v1", version="1")],
         "policy": {"response_cache": {"deterministic": True}}},
        # open to all, but its fallback is fraud's: only fraud's callers may be rescued by it
        {"model": "via_fallback", "variants": [variant("down", **dead)],
         "policy": {"fallback": [{"model": "fraud"}]}},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return Signer(tmp_path_factory.mktemp("jwks"))


@pytest.fixture(scope="module")
def stack(triton, signer):
    xds, listen = free_port(), free_port()
    config = {
        "listeners": {"xds": f"127.0.0.1:{xds}"},
        "envoy": {"listen": f"127.0.0.1:{listen}"},
        "backends": [
            triton_backend(triton.address),
            {"name": "dead", "kind": "BACKEND_KIND_TRITON", "address": f"127.0.0.1:{free_port()}",
             "circuit_breaker": {"disabled": True}},
        ],
        "callers": callers_config(signer, metric_labels=["fraud-svc"]),
        "routes": _routes(),
        "observability": {"logging": {"format": "FORMAT_JSON", "access_log_sample": 1.0}},
    }  # fmt: skip
    gateway = GatewayProcess(config, admin=True)
    with envoy_in_front(gateway, "envoy-callers", 46) as envoy:
        yield gateway, envoy, f"127.0.0.1:{listen}"


class Caller:
    """ModelInfer or a one-message ModelStreamInfer through one path: (code, message, outputs)."""

    def __init__(self, path: str, stack) -> None:
        gateway, _, envoy_address = stack
        self.path = path
        self.channel = grpc.insecure_channel(envoy_address if path == "envoy" else gateway.address)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def __call__(self, request, metadata=()):
        if self.path == "stream":
            try:
                (reply,) = list(self.stub.ModelStreamInfer(iter([request]), metadata=metadata,
                                                           timeout=10))  # fmt: skip
            except grpc.RpcError as err:
                return err.code().name, err.details(), None
            if reply.error_message:
                return "ERROR", reply.error_message, None
            return "OK", "", output(reply.infer_response)
        try:
            response = self.stub.ModelInfer(request, metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            return err.code().name, err.details(), None
        return "OK", "", output(response)


@pytest.fixture(scope="module")
def callers(stack):
    made = {path: Caller(path, stack) for path in PATHS}
    yield made
    for caller in made.values():
        caller.channel.close()


def refused(outcome, code: str, text: str) -> None:
    """The same refusal on every path: the status on unary ones, the message in a stream."""
    got, message, _ = outcome
    assert got in (code, "ERROR") and text in message, outcome


@pytest.mark.parametrize("path", PATHS)
def test_unauthenticated_calls_are_refused_and_say_why(callers, signer, path):
    call = callers[path]
    refused(call(linear_request("open")), "UNAUTHENTICATED", "bearer token")
    bad = {
        "expired": signer.token("fraud-svc", expires_in=-120),
        "audience": signer.token("fraud-svc", audience="another-service"),
        "issuer is not": signer.token("fraud-svc", issuer="https://evil.test"),
        "not valid yet": signer.token("fraud-svc", not_before=600),
        "algorithm": unsigned("fraud-svc"),
        "algorithm is not accepted": hmac_with_public_key(signer, "fraud-svc"),
        "not a JWT": "not.a.jwt",
    }
    for reason, token in bad.items():
        outcome = call(linear_request("open"), bearer(token))
        refused(outcome, "UNAUTHENTICATED", reason)
        assert token not in outcome[1]  # never echoed
    elsewhere = signer.jwks.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    forged = Signer(elsewhere, kid=signer.kid).token("fraud-svc")  # same kid, another key
    refused(call(linear_request("open"), bearer(forged)), "UNAUTHENTICATED", "signature")
    # Over the gateway's 4 KiB for a token (gRPC itself refuses metadata over 8 KiB in all,
    # RESOURCE_EXHAUSTED, before any of this runs).
    large = signer.token("fraud-svc", padding="x" * 5000)
    refused(call(linear_request("open"), bearer(large)), "UNAUTHENTICATED", "4096 bytes")
    refused(call(linear_request("open"), (("authorization", "Basic Zm9v"),)),
            "UNAUTHENTICATED", "Bearer")  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
def test_rules_allow_deny_versions_and_route_keys(callers, signer, path):
    call = callers[path]
    fraud = bearer(signer.token("fraud-svc"))
    analyst = bearer(signer.token("alice", groups=["analysts"]))
    other = bearer(signer.token("other-svc"))
    assert call(linear_request("open"), other) == ("OK", "", Y_V1)
    assert call(linear_request("fraud", "1"), fraud) == ("OK", "", Y_V1)
    refused(call(linear_request("fraud", "2"), fraud), "PERMISSION_DENIED", "pin version '2'")
    key = (("x-tensorgate-route-key", "user-7"),)
    refused(call(linear_request("fraud"), fraud + key), "PERMISSION_DENIED", "route key")
    assert call(linear_request("fraud", "2"), analyst) == ("OK", "", Y_V2)
    assert call(linear_request("fraud"), analyst + key)[0] == "OK"
    denied = call(linear_request("fraud"), other)
    refused(denied, "PERMISSION_DENIED", "caller 'other-svc' may not call model 'fraud'")
    # a model that does not exist: the same answer, nothing about what exists
    missing = call(linear_request("no_such_model"), other)
    refused(missing, "PERMISSION_DENIED", "caller 'other-svc' may not call model 'no_such_model'")
    assert "fraud" not in missing[1] and "open" not in missing[1]


@pytest.mark.parametrize("path", PATHS)
def test_a_cache_hit_never_serves_a_refused_caller(callers, signer, path):
    call = callers[path]
    request = linear_request("fraud_cached", x=[9.0, PATHS.index(path), 0.0, 1.0])
    fraud = bearer(signer.token("fraud-svc"))
    assert call(request, fraud)[0] == call(request, fraud)[0] == "OK"  # the second is a hit
    refused(call(request, bearer(signer.token("other-svc"))), "PERMISSION_DENIED", "fraud_cached")


@pytest.mark.parametrize("path", PATHS)
def test_a_fallback_does_not_reach_a_model_the_caller_may_not_call(callers, signer, path):
    call = callers[path]
    # fraud-svc may call fraud: its fallback answers (v1, the only version it may use unpinned)
    assert call(linear_request("via_fallback"), bearer(signer.token("fraud-svc")))[0] == "OK"
    # other-svc may call via_fallback but not fraud: the primary's failure, not fraud's answer
    outcome = call(linear_request("via_fallback"), bearer(signer.token("other-svc")))
    assert outcome[0] in ("UNAVAILABLE", "ERROR") and outcome[2] is None, outcome


def test_metadata_and_index_show_only_what_the_caller_may_call(stack, signer):
    gateway = stack[0]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        other = bearer(signer.token("other-svc"))
        index = stub.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=other)
        assert {m.name for m in index.models} == {"open", "via_fallback"}
        for rpc, request in (
            (stub.ModelMetadata, oip.ModelMetadataRequest(name="fraud")),
            (stub.ModelConfig, oip.ModelConfigRequest(name="fraud")),
            (stub.ModelReady, oip.ModelReadyRequest(name="fraud")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                rpc(request, metadata=other)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        fraud = bearer(signer.token("fraud-svc"))
        assert stub.ModelMetadata(oip.ModelMetadataRequest(name="fraud"), metadata=fraud).name
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(oip.ModelMetadataRequest(name="open"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health stays open: probes carry no credentials
        assert stub.ServerLive(oip.ServerLiveRequest()).live


def test_admin_shows_who_may_call_what(stack):
    from tests.test_admin_cli import cli

    shown = cli(stack[0].admin_address, "access")
    assert shown.returncode == 0, shown.stderr
    lines = [line.split() for line in shown.stdout.splitlines()]
    assert ["fraud", "fraud-team", "fraud-svc", "-", "1", "no"] in lines
    assert ["fraud", "analysts", "-", "analysts", "any", "yes"] in lines
    assert any(line[:2] == ["open", "(none)"] for line in lines)


def test_many_callers_grow_neither_metrics_nor_memory(stack, signer):
    gateway = stack[0]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for i in range(300):  # warm-up: allocator pools, the identity cache's first entries
            stub.ModelInfer(linear_request("open"), metadata=bearer(signer.token(f"warm-{i}")))
        before = _rss_kib(gateway)
        for i in range(3000):
            token = signer.token(f"svc-{i}")
            assert output(stub.ModelInfer(linear_request("open"), metadata=bearer(token))) == Y_V1
        grown = _rss_kib(gateway) - before
    labels = {
        dict(labelset).get("caller")
        for (sample, labelset) in scrape(gateway.metrics_url)
        if sample == "tensorgate_caller_requests_total"
    }
    assert labels <= {"fraud-svc", "other", "anonymous"}, labels
    assert grown < 30 * 1024, f"RSS grew {grown} KiB over 3,000 distinct callers"
    log = gateway.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("caller") == "svc-2999" for line in lines)  # the id is logged
    assert token not in log and "eyJ" not in log  # ... the token never


def _rss_kib(gateway) -> int:
    total = 0
    for pid in gateway.pids():
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def test_client_certificates_name_callers_and_a_foreign_ca_is_refused(triton, tmp_path):
    ca = make_ca(tmp_path, "ca")
    server = issue(tmp_path, ca, "gateway", server=True)
    fraud = issue(tmp_path, ca, "fraud", server=False, uri="spiffe://test/ns/risk/sa/fraud")
    other = issue(tmp_path, ca, "other", server=False, uri="spiffe://test/ns/web/sa/frontend")
    foreign_ca = make_ca(tmp_path, "foreign")
    foreign = issue(tmp_path, foreign_ca, "intruder", server=False,
                    uri="spiffe://test/ns/risk/sa/fraud")  # fmt: skip
    config = {
        "listeners": {"data_plane_tls": {"cert_file": str(server[1]), "key_file": str(server[0]),
                                         "client_ca_file": str(ca[1])}},
        "backends": [triton_backend(triton.address)],
        "callers": {"client_cert": {}},
        "routes": [{"model": "fraud", "variants": [variant("v1")], "authorization": {"rules": [
            {"name": "risk", "callers": ["spiffe://test/ns/risk/sa/fraud"]}]}}],
    }  # fmt: skip

    def call(gateway, client) -> tuple[str, str]:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca[1].read_bytes(),
            private_key=client[0].read_bytes(),
            certificate_chain=client[1].read_bytes(),
        )
        with grpc.secure_channel(gateway.address, credentials) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=30)
            except grpc.FutureTimeoutError:
                return "UNAVAILABLE", "no TLS session"
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ModelInfer(linear_request("fraud"), timeout=10)
            except grpc.RpcError as err:
                return err.code().name, err.details()
        return "OK", ""

    gateway = GatewayProcess(config).start(wait="none")  # a TLS listener: reached below
    with gateway:
        assert call(gateway, fraud) == ("OK", "")
        code, message = call(gateway, other)
        assert code == "PERMISSION_DENIED" and "spiffe://test/ns/web/sa/frontend" in message
        assert call(gateway, foreign)[0] == "UNAVAILABLE"  # the TLS handshake fails


def test_check_config_refuses_rules_without_callers_and_bad_keys(tmp_path):
    from gateway.controlplane.config import ConfigError, from_dict

    base = {"backends": [triton_backend("127.0.0.1:1")]}
    with pytest.raises(ConfigError) as err:
        from_dict({**base, "routes": [{"model": "m", "variants": [variant("v")],
                   "authorization": FRAUD_RULES, "rate_limits": [{"name": "x"}]}]})  # fmt: skip
    text = str(err.value)
    assert "routes[0].authorization: needs `callers`" in text
    assert "routes[0].rate_limits[0]: limits nothing" in text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        from_dict({**base, "routes": [{"model": "m", "variants": [variant("v")]}],
                   "callers": {"jwt": [{"issuer": "i", "jwks_file": str(tmp_path / "bad.json"),
                                        "algorithms": ["none"]}]}})  # fmt: skip
    text = str(err.value)
    assert "callers.jwt[0].audiences" in text and "callers.jwt[0].algorithms[0]" in text
    assert "callers.jwt[0].jwks_file" in text
