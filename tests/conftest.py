from __future__ import annotations

import warnings

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


@pytest.fixture(autouse=True)
def _session_triton_outlives_each_test(request):
    """Triton 2.51 can abort on its own under decoupled streaming (heap corruption in the python
    backend, triton-inference-server/server#7517; seen once in CI: `malloc_consolidate():
    unaligned fastbin chunk detected`, after which it hung without answering). Without this, one
    such abort failed every later test that shares the session's Triton, far from its cause.
    After each test that used it, the session's Triton must still answer; if not, it is restarted
    on the same ports and the test it died in is named in a warning with its log. Tests whose
    point is that Triton survives a caller's traffic assert that themselves, on a Triton of
    their own (tests/test_stream_hostile.py)."""
    yield
    if "triton" not in request.fixturenames:
        return
    server = request.getfixturevalue("triton")
    if server.answers():
        return
    log = server.log_tail(15)
    server.restart()
    warnings.warn(
        f"the session's Triton stopped answering during {request.node.nodeid}; restarted on the "
        f"same ports. Its log ended:\n{log}",
        stacklevel=1,
    )


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
