"""The real-Triton harness and the demo model repository (deploy/demo/models) work together."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.backends.triton import REPO_ROOT, TritonServer

MODELS = REPO_ROOT / "deploy" / "demo" / "models"

# Must match deploy/demo/models/demo_linear/{1,2}/model.py.
X = [1.0, 2.0, 3.0, 4.0]
LINEAR_Y = {"1": [4.0, 8.0, 12.0], "2": [17.0, 22.0, 39.0]}


@pytest.fixture(scope="module")
def server() -> Iterator[TritonServer]:
    with TritonServer(MODELS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.address)
    yield c
    c.close()


def _input(name: str, data: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def test_server_ready(server: TritonServer, client: grpcclient.InferenceServerClient) -> None:
    assert server.address == f"127.0.0.1:{server.grpc_port}"
    assert server.running and server.pid
    assert client.is_server_ready()
    for model in ("demo_linear", "demo_identity", "demo_sleep", "demo_fail"):
        assert client.is_model_ready(model)


@pytest.mark.parametrize("version", ["1", "2"])
def test_linear_versions(client: grpcclient.InferenceServerClient, version: str) -> None:
    x = np.array([X, [0.0] * 4], dtype=np.float32)
    result = client.infer("demo_linear", [_input("INPUT0", x, "FP32")], model_version=version)
    y = result.as_numpy("OUTPUT0")
    assert y.dtype == np.float32
    assert y[0].tolist() == LINEAR_Y[version]
    assert result.get_response().model_version == version


def test_linear_default_version_is_latest(client: grpcclient.InferenceServerClient) -> None:
    x = np.array([X], dtype=np.float32)
    result = client.infer("demo_linear", [_input("INPUT0", x, "FP32")])
    assert result.as_numpy("OUTPUT0")[0].tolist() == LINEAR_Y["2"]


def test_identity_round_trip(client: grpcclient.InferenceServerClient) -> None:
    ints = np.array([1, -2, 2**31 - 1], dtype=np.int32)
    strs = np.array([b"hello", b"", b"\x00\xff"], dtype=np.object_)
    result = client.infer(
        "demo_identity", [_input("INPUT0", ints, "INT32"), _input("INPUT1", strs, "BYTES")]
    )
    assert result.as_numpy("OUTPUT0").tolist() == ints.tolist()
    assert result.as_numpy("OUTPUT1").tolist() == strs.tolist()


def test_identity_optional_input_absent(client: grpcclient.InferenceServerClient) -> None:
    ints = np.array([7], dtype=np.int32)
    result = client.infer("demo_identity", [_input("INPUT0", ints, "INT32")])
    assert result.as_numpy("OUTPUT0").tolist() == [7]
    assert result.as_numpy("OUTPUT1").shape == (0,)


def test_fail_raises(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="INPUT0 must be >= 0"):
        client.infer("demo_fail", [_input("INPUT0", np.array([-1.0], np.float32), "FP32")])
    ok = client.infer("demo_fail", [_input("INPUT0", np.array([2.5], np.float32), "FP32")])
    assert ok.as_numpy("OUTPUT0").tolist() == [2.5]


def test_sleep_takes_its_time(client: grpcclient.InferenceServerClient) -> None:
    start = time.monotonic()
    result = client.infer("demo_sleep", [_input("INPUT0", np.array([0.3], np.float32), "FP32")])
    assert time.monotonic() - start >= 0.3
    assert result.as_numpy("OUTPUT0").tolist() == pytest.approx([0.3])


def test_kill_and_restart_same_port(
    server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    # Runs last in this module: it replaces the shared server process.
    port, old_pid = server.grpc_port, server.pid
    server.kill()
    assert not server.running
    with pytest.raises(InferenceServerException):
        client.is_server_ready()
    server.restart()
    assert server.grpc_port == port and server.pid != old_pid
    # gRPC shares subchannels per address process-wide and backs off reconnecting after the
    # refused connects above, so the client may need a few seconds to see the new server.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.is_server_ready()
            break
        except InferenceServerException:
            assert time.monotonic() < deadline, "restarted server not reachable in 10 s"
            time.sleep(0.2)
