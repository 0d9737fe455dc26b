"""The README's and docs' grpcurl commands, run with a real grpcurl (1.8.6, v1alpha reflection)
against a running gateway: data plane and the token-protected admin port."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.backends.process import tool
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess, triton_backend

INFER = {
    "model_name": "linear",
    "inputs": [
        {
            "name": "INPUT0",
            "datatype": "FP32",
            "shape": [1, 4],
            "contents": {"fp32_contents": [1, 2, 3, 4]},
        }
    ],
}


@pytest.fixture(scope="module")
def gateway(triton):
    config = {
        "backends": [triton_backend(triton.address)],
        "routes": [{"model": "linear", "variants": [
            {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear", "backend_version": "1", "version": "1", "weight": 1}]}],
    }  # fmt: skip
    with GatewayProcess(config, admin=True) as gw:
        yield gw


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("grpcurl"), *args], capture_output=True, text=True, timeout=30)


def test_list_describe_and_infer(gateway):
    listed = grpcurl("-plaintext", gateway.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl(
        "-plaintext", gateway.address, "describe", "inference.GRPCInferenceService.ModelInfer"
    )
    assert (
        "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse )"
        in described.stdout
    )
    called = grpcurl("-plaintext", "-v", "-H", "x-tensorgate-route-key: user-42", "-d", json.dumps(INFER),
                     gateway.address, "inference.GRPCInferenceService/ModelInfer")  # fmt: skip
    assert called.returncode == 0, called.stderr
    assert "x-tensorgate-variant: stable" in called.stdout  # in "Response trailers received"
    body = json.loads(called.stdout[called.stdout.index("{") : called.stdout.rindex("}") + 1])
    assert (
        body.get("modelName", body.get("model_name")) == "linear"
        and body["outputs"][0]["name"] == "OUTPUT0"
    )
    health = grpcurl(
        "-plaintext",
        "-d",
        '{"service": "inference.GRPCInferenceService"}',
        gateway.address,
        "grpc.health.v1.Health/Check",
    )
    assert '"status": "SERVING"' in health.stdout


def test_bad_request_says_what_is_wrong(gateway):
    bad = {**INFER, "inputs": [{**INFER["inputs"][0], "shape": [1, 5]}]}
    called = grpcurl(
        "-plaintext",
        "-d",
        json.dumps(bad),
        gateway.address,
        "inference.GRPCInferenceService/ModelInfer",
    )
    assert called.returncode != 0
    assert "InvalidArgument" in called.stderr and "input 'INPUT0'" in called.stderr


def test_admin_with_token_header(gateway):
    token = f"authorization: Bearer {ADMIN_TOKEN}"
    denied = grpcurl("-plaintext", gateway.admin_address, "list")
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    listed = grpcurl("-plaintext", "-H", token, gateway.admin_address, "list")
    assert "tensorgate.admin.v1.AdminService" in listed.stdout.split(), listed.stderr
    table = grpcurl(
        "-plaintext",
        "-H",
        token,
        gateway.admin_address,
        "tensorgate.admin.v1.AdminService/GetRouteTable",
    )
    revision = json.loads(table.stdout)["revision"]["number"]
    changed = grpcurl("-plaintext", "-H", token, "-d", json.dumps({"model": "linear", "weights": {"stable": 5}, "expected_revision": revision}),
                      gateway.admin_address, "tensorgate.admin.v1.AdminService/SetVariantWeights")  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["route"]["variants"][0]["weight"] == 5
