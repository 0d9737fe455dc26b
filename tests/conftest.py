from __future__ import annotations

import pytest

from tests.backends.triton import REPO_ROOT, TritonServer

DEMO_MODELS = REPO_ROOT / "deploy" / "demo" / "models"


@pytest.fixture(scope="session")
def triton():
    """One real Triton for the session (start and stop cost ~5 s each)."""
    with TritonServer(DEMO_MODELS) as server:
        yield server
