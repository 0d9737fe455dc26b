from __future__ import annotations

import pytest

from tests.backends.triton import REPO_ROOT, TritonServer

DEMO_MODELS = REPO_ROOT / "deploy" / "demo" / "models"


@pytest.fixture(scope="session")
def tfserving():
    """One TF Serving stand-in (official stubs, real SavedModels) for the session."""
    from tests.backends.tfserving import TFServingStandIn

    with TFServingStandIn() as server:
        yield server


@pytest.fixture(scope="session")
def torchserve():
    """One real TorchServe (linear v1/v2, echo; OIP JSON handler) for the session."""
    from tests.backends.torchserve import TorchServe

    with TorchServe() as server:
        yield server


@pytest.fixture(scope="session")
def triton():
    """One real Triton for the session (start and stop cost ~5 s each), gRPC and HTTP/REST."""
    with TritonServer(DEMO_MODELS, http=True) as server:
        yield server


@pytest.fixture
def etcd():
    """A real single-node etcd on 127.0.0.1 for ONE test (function scope: tests kill, pause and
    restart it; start ~0.2 s), data wiped afterwards. Fails, never skips, without etcd."""
    from tests.backends.etcd import EtcdServer, etcd_tool

    problem = None
    try:
        etcd_tool("etcd")
        etcd_tool("etcdctl")
    except FileNotFoundError as e:
        problem = str(e)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    with EtcdServer() as server:
        yield server
