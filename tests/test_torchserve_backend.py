"""The real-TorchServe harness, the test models and the OIP handler (deploy/torchserve) together.

One TorchServe for the module: the first run on a machine builds the venv (~2 min) and the .mar
files (~10-20 s); later starts take ~6-9 s, more on a busy machine (each worker imports torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from tests.backends.torchserve import TorchServe

# Must match tests/backends/make_torchserve_models.py and deploy/demo/models/demo_linear.
W = {
    "1": [[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]],
    "2": [[0, 1, 1], [1, 0, 2], [-1, 3, 0], [2, -2, 1]],
}
B = {"1": [1, 0, -1], "2": [10, 20, 30]}
X = [1, 2, 3, 4]
LINEAR_Y = {"1": [4.0, 8.0, 12.0], "2": [17.0, 22.0, 39.0]}


@pytest.fixture(scope="module")
def server(torchserve) -> Iterator[TorchServe]:
    yield torchserve  # the session's TorchServe (tests/conftest.py)


@pytest.fixture(scope="module")
def client(server: TorchServe) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.inference_url, timeout=30.0) as c:
        yield c


def _x(rows: list[list[Any]], datatype: str = "FP32", name: str = "x") -> dict[str, Any]:
    flat = [v for row in rows for v in row]
    return {
        "inputs": [
            {"name": name, "datatype": datatype, "shape": [len(rows), len(rows[0])], "data": flat}
        ]
    }


def _expected(version: str, rows: list[list[int]]) -> list[float]:
    w, b = W[version], B[version]
    return [float(sum(row[k] * w[k][j] for k in range(4)) + b[j]) for row in rows for j in range(3)]


def test_server_ready(server: TorchServe) -> None:
    assert server.running and server.pid
    assert len(set(server.ports.values())) == 5
    assert server.inference_url == f"http://127.0.0.1:{server.inference_port}"
    assert httpx.get(f"{server.inference_url}/ping").json() == {"status": "Healthy"}
    assert server.model_store is not None and (server.model_store / "linear-2.mar").is_file()
    assert server.log_dir.is_dir()
    assert httpx.get(f"{server.metrics_url}/metrics").status_code == 200


@pytest.mark.parametrize("version", ["1", "2"])
def test_linear_versions(client: httpx.Client, version: str) -> None:
    r = client.post(f"/predictions/linear/{version}", json=_x([X]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "linear"
    assert body["model_version"] == version
    assert body["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": LINEAR_Y[version]}
    ]


@pytest.mark.parametrize("version", ["1", "2"])
def test_linear_batch_of_64_rows_is_exact(client: httpx.Client, version: str) -> None:
    rows = [[i, -i, (7 * i) % 13 - 6, 100 - 3 * i] for i in range(64)]
    r = client.post(f"/predictions/linear/{version}", json=_x(rows))
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["shape"] == [64, 3]
    assert out["data"] == _expected(version, rows)


def test_default_version_is_1(server: TorchServe, client: httpx.Client) -> None:
    r = client.post("/predictions/linear", json=_x([X]))
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "1"
    assert r.json()["outputs"][0]["data"] == LINEAR_Y["1"]
    assert server.describe("linear")["modelVersion"] == "1"


def test_requested_outputs_and_id(client: httpx.Client) -> None:
    body = _x([X]) | {"id": "req-7", "outputs": [{"name": "y"}]}
    r = client.post("/predictions/linear/2", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "req-7"
    assert [o["name"] for o in r.json()["outputs"]] == ["y"]


@pytest.mark.parametrize(
    ("datatype", "shape", "data"),
    [
        ("FP32", [2, 3], [0.5, -1.25, 3.0, float(np.float32(1e-3)), float(np.float32(0.1)), -0.0]),
        ("INT64", [4], [0, -(2**63), 2**63 - 1, 2**53 + 1]),
        ("INT32", [2, 2], [-(2**31), 2**31 - 1, 0, 7]),
        ("BOOL", [3], [True, False, True]),
        ("UINT8", [1, 4], [0, 1, 128, 255]),
        ("FP64", [2], [0.1, 1e300]),
        ("INT8", [2], [-128, 127]),
    ],
)
def test_echo_round_trips_datatype(
    client: httpx.Client, datatype: str, shape: list[int], data: list[Any]
) -> None:
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}
    r = client.post("/predictions/echo/1", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == [
        {"name": "y", "datatype": datatype, "shape": shape, "data": data}
    ]


def test_echo_fp32_rounds_to_float32(client: httpx.Client) -> None:
    r = client.post(
        "/predictions/echo",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.1]}]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [float(np.float32(0.1))]


@pytest.mark.parametrize(
    "path", ["/predictions/nope", "/predictions/nope/1", "/predictions/linear/9"]
)
def test_unknown_model_or_version_is_404(client: httpx.Client, path: str) -> None:
    r = client.post(path, json=_x([X]))
    assert r.status_code == 404
    assert r.json()["code"] == 404  # TorchServe's own error body: {"code", "type", "message"}


BAD_REQUESTS = [
    # (model, body (str = raw), fragment of the error message)
    ("linear", '{"inputs": [', "not valid JSON"),
    ("linear", "[1, 2]", "JSON object"),
    ("linear", {"inputs": []}, "non-empty list"),
    (
        "linear",
        {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": X}]},
        "unknown input",
    ),
    (
        "linear",
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": X}]},
        "model expects FP32",
    ),
    (
        "linear",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": X[:3]}]},
        "model expects [-1, 4]",
    ),
    (
        "linear",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[:3]}]},
        "needs 4 elements",
    ),
    (
        "linear",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, "a", 4]}]},
        "JSON numbers",
    ),
    ("linear", _x([X]) | {"outputs": [{"name": "nope"}]}, "unknown output"),
    (
        "echo",
        {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]},
        "JSON integers",
    ),
    (
        "echo",
        {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [256]}]},
        "out of range",
    ),
    (
        "echo",
        {"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]},
        "true/false",
    ),
    (
        "echo",
        {"inputs": [{"name": "x", "datatype": "UINT32", "shape": [1], "data": [1]}]},
        "UINT32 is not supported",
    ),
    (
        "echo",
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [{"b64": "aGk="}]}]},
        "BYTES is not supported",
    ),
    (
        "echo",
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
        '{"b64"',
    ),
    (
        "echo",
        {"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]},
        "unknown datatype",
    ),
]


@pytest.mark.parametrize(("model", "body", "message"), BAD_REQUESTS)
def test_bad_request_is_400_with_message(
    client: httpx.Client, model: str, body: Any, message: str
) -> None:
    if isinstance(body, str):
        r = client.post(
            f"/predictions/{model}", content=body, headers={"Content-Type": "application/json"}
        )
    else:
        r = client.post(f"/predictions/{model}", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_form_encoded_body_is_400(client: httpx.Client) -> None:
    r = client.post(
        "/predictions/linear",
        content=b'{"inputs": []}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]


def test_management_describe_shows_ready_workers(server: TorchServe) -> None:
    for name, version in server.models:
        info = server.describe(name, version)
        assert info["modelVersion"] == version
        assert [w["status"] for w in info["workers"]] == ["READY"]


def test_customized_describe_is_oip_metadata(server: TorchServe) -> None:
    r = httpx.get(
        f"{server.management_url}/models/linear/2", params={"customized": "true"}, timeout=30
    )
    meta = r.json()[0]["customizedMetadata"]
    assert meta["name"] == "linear" and meta["versions"] == ["2"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]


def test_server_side_batch_answers_each_request_with_its_own_status(server: TorchServe) -> None:
    """With TorchServe batching, one bad request must not fail the others in its batch."""
    mgmt = httpx.Client(base_url=server.management_url, timeout=60)
    params = {
        "url": "echo-1.mar",
        "model_name": "echo_batched",
        "batch_size": 4,
        "max_batch_delay": 500,
        "initial_workers": 1,
        "synchronous": "true",
    }
    mgmt.post("/models", params=params).raise_for_status()
    try:
        good = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [7]}]}
        bad = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [7.5]}]}

        def send(body: dict[str, Any]) -> httpx.Response:
            return httpx.post(
                f"{server.inference_url}/predictions/echo_batched", json=body, timeout=30
            )

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(send, [good, bad, good, bad]))
        assert [r.status_code for r in responses] == [200, 400, 200, 400]
        assert responses[0].json()["outputs"][0]["data"] == [7]
        assert "JSON integers" in responses[1].json()["error"]
    finally:
        mgmt.delete("/models/echo_batched/1")
        mgmt.close()
