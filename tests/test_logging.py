"""Structured logs of a running gateway (`tensorgate serve`, real Triton): JSON lines a log
collector can parse, the request id a caller greps for, the sampled access log, admin changes
in the log stream, size-rotated files, and no credential or payload byte in any of it."""

from __future__ import annotations

import json
import pathlib

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.builders import oip_stub, triton_backend, variant
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess
from tests.oip import linear_request

SECRET = b"PAYLOAD-7f3a9c-SHOULD-NEVER-BE-LOGGED"
CALLER_TOKEN = "caller-secret-token-5d1e0b"


def _config(triton, tmp_path: pathlib.Path, **logging) -> dict:
    return {
        "backends": [triton_backend(triton.address)],
        "routes": [
            {"model": "linear", "variants": [variant("stable")]},
        ],
        "observability": {"logging": {"access_log_sample": 1.0,
                                      "file": str(tmp_path / "gateway.jsonl"), **logging}},
    }  # fmt: skip


def _lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def logged(triton, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logs")
    with GatewayProcess(_config(triton, tmp), admin=True) as gw:
        with oip_stub(gw.address) as stub:
            ok, call = stub.ModelInfer.with_call(
                linear_request(), metadata=(("x-request-id", "order-42/retry-1"),), timeout=10
            )
            kept = dict(call.trailing_metadata())["x-request-id"]
            _, call = stub.ModelInfer.with_call(
                linear_request(), metadata=(("x-request-id", "bad id; DROP"),), timeout=10
            )
            generated = dict(call.trailing_metadata())["x-request-id"]
            # payload bytes and a caller credential, on an OK call and on refused ones
            secret = linear_request()
            secret.inputs.add(name="EXTRA", datatype="BYTES", shape=[1]).contents.bytes_contents[
                :
            ] = [SECRET]
            auth = (("authorization", f"Bearer {CALLER_TOKEN}"),)
            for request in (secret, _raw_with(SECRET)):
                with pytest.raises(grpc.RpcError):
                    stub.ModelInfer(request, metadata=auth, timeout=10)
            unknown = linear_request(model="no-such-model")
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(unknown, metadata=(("x-request-id", "lost-1"),), timeout=10)
            failed_trailers = dict(err.value.trailing_metadata())
        with grpc.insecure_channel(gw.admin_address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            admin.SetVariantWeights(
                admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 3}),
                metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
            )
    return {
        "stderr": gw.log(),
        "file": (tmp / "gateway.jsonl").read_text(),
        "generated": generated,
        "kept": kept,
        "failed_trailers": failed_trailers,
        "ok": ok,
    }


def _raw_with(payload: bytes) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="linear")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, len(payload) // 4])
    request.raw_input_contents.append(payload[: 4 * (len(payload) // 4)])
    return request


def test_every_line_is_json_with_time_level_logger_message(logged):
    lines = [line for line in logged["stderr"].splitlines() if line.strip()]
    records = _lines(logged["stderr"])
    assert len(records) == len(lines) > 5  # nothing but JSON objects
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys()
        assert record["time"].endswith("Z")


def test_access_log_carries_the_request_id_and_the_calls_outcome(logged):
    access = [r for r in _lines(logged["stderr"]) if r["logger"] == "tensorgate.access"]
    by_id = {r["request_id"]: r for r in access}
    ok = by_id["order-42/retry-1"]  # the caller's id, kept
    assert ok["model"] == "linear" and ok["variant"] == "stable" and ok["backend"] == "triton-a"
    assert ok["code"] == "OK" and 0 < ok["duration_ms"] < 10_000
    # an unusable id (spaces, ;) is replaced by a generated one, returned in the trailers
    assert logged["kept"] == "order-42/retry-1"
    assert "bad id; DROP" not in by_id
    assert len(logged["generated"]) == 32 and by_id[logged["generated"]]["code"] == "OK"
    lost = by_id["lost-1"]
    assert lost["code"] == "NOT_FOUND" and lost["model"] == "no-such-model"
    assert logged["failed_trailers"]["x-request-id"] == "lost-1"
    # the same lines went to the file
    assert {r.get("request_id") for r in _lines(logged["file"])} >= {"order-42/retry-1", "lost-1"}


def test_admin_changes_are_in_the_log_stream(logged):
    audit = [r for r in _lines(logged["stderr"]) if r["logger"] == "tensorgate.audit"]
    assert audit and audit[-1]["audit"]["method"] == "SetVariantWeights"
    assert audit[-1]["audit"]["who"] == "ops"


def test_no_credential_or_payload_byte_is_ever_logged(logged):
    for text in (logged["stderr"], logged["file"]):
        assert SECRET.decode() not in text
        assert SECRET[:12].decode() not in text
        assert CALLER_TOKEN not in text
        assert ADMIN_TOKEN not in text


def test_log_files_are_rotated_by_size(triton, tmp_path):
    config = _config(triton, tmp_path, file_max_bytes=4096, file_backups=2)
    with GatewayProcess(config) as gw, oip_stub(gw.address) as stub:
        for _ in range(200):
            stub.ModelInfer(linear_request(), timeout=10)
    names = sorted(p.name for p in tmp_path.glob("gateway.jsonl*"))
    assert names == ["gateway.jsonl", "gateway.jsonl.1", "gateway.jsonl.2"]
    assert all(p.stat().st_size <= 4096 + 1024 for p in tmp_path.glob("gateway.jsonl*"))
    assert np.all([json.loads(x) for x in (tmp_path / "gateway.jsonl.1").read_text().splitlines()])
