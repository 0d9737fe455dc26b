"""The read-only status page on the admin listener (`GET /status`): the same credentials as the
admin API, 404 elsewhere, the admin API's gRPC on the same port untouched, and what it shows
(routes, weights as shares, variant health, recent calls and latency, a rollout in progress),
screenshot-tested in a real headless Chromium (Debian's `chromium`, scripts/system-tools)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway_process import ADMIN_TOKEN, READ_TOKEN, GatewayProcess, triton_backend

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def variant(name: str, model: str, weight: int, version: str = "1") -> dict:
    return {"name": name, "backend": "triton-a", "backend_model": model,
            "backend_version": version, "weight": weight}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(triton):
    config = {
        "backends": [triton_backend(triton.address)],
        "routes": [
            {"model": "linear", "variants": [
                variant("stable", "demo_linear", 90), variant("canary", "demo_linear", 100, "2"),
                variant("flaky", "demo_flaky", 0)]},
            {"model": "broken", "variants": [variant("only", "demo_missing", 1)]},
        ],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config, admin=True) as gw:
        with grpc.insecure_channel(gw.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="linear")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.ones((1, 4), dtype=np.float32).tobytes())
            for _ in range(40):
                stub.ModelInfer(request, timeout=10)
        with grpc.insecure_channel(gw.admin_address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            admin.StartRollout(
                admin_pb2.StartRolloutRequest(
                    model="linear", canary="flaky", baseline="stable", steps=[10, 100],
                    min_step_duration={"seconds": 600}, min_requests=1000,
                ),
                metadata=ADMIN,
                timeout=10,
            )  # fmt: skip
            yield gw


def get(gw, path: str, authorization: str | None = None):
    request = urllib.request.Request(f"http://{gw.admin_address}{path}")
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def test_status_needs_the_admin_apis_credentials(gateway):
    status, headers, _ = get(gateway, "/status")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert get(gateway, "/status", "Bearer not-a-token-0123456789")[0] == 401
    assert get(gateway, "/status", f"Bearer {ADMIN_TOKEN}")[0] == 200
    assert get(gateway, "/status", f"Bearer {READ_TOKEN}")[0] == 200  # read-only is enough
    basic = base64.b64encode(f"anyone:{READ_TOKEN}".encode()).decode()
    assert get(gateway, "/status", f"Basic {basic}")[0] == 200
    for path in ("/", "/metrics", "/status/x"):
        assert get(gateway, path, f"Bearer {ADMIN_TOKEN}")[0] == 404


def test_status_shows_routes_shares_health_latency_and_rollouts(gateway):
    deadline = time.monotonic() + 15
    while True:  # until the rollout's first step set flaky to 10 (stable 90, canary keeps 100)
        status, headers, page = get(gateway, "/status", f"Bearer {ADMIN_TOKEN}")
        if "revision 2 " in page or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "revision 2 by rollout:ops" in page and "gateway <span class='ok'>ready</span>" in page
    # Weights are relative: 90, 100 and 10 are 45%, 50% and 5% of the route's calls.
    for weight, share in ((90, 45), (100, 50), (10, 5)):
        assert f"<td class='num'>{weight}</td><td><span class='bar' style='width:" in page
        assert f"px'></span> {share}%</td>" in page, page
    assert "rollout of flaky vs stable: [10%] -&gt; 100%" in page, page
    assert "broken" in page and "NOT ready" in page
    assert "unable to answer (model not ready)" in page
    assert " ms</td>" in page  # p50 / p99 of the calls made
    assert "<script" not in page  # read-only, nothing runs


def test_grpc_on_the_same_port_is_unchanged(gateway):
    with grpc.insecure_channel(gateway.admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        table = admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=5)
        assert [r.model for r in table.routes] == ["linear", "broken"]
        with pytest.raises(grpc.RpcError) as refused:
            admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run scripts/system-tools", pytrace=False)
    return path


def test_status_page_screenshot_in_headless_chromium(gateway, tmp_path):
    shot = tmp_path / "status.png"
    url = f"http://ops:{ADMIN_TOKEN}@{gateway.admin_address}/status"
    run = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,800", f"--screenshot={shot}", url],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert shot.exists(), run.stderr
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 800)
    colors = image.getcolors(maxcolors=1 << 20)
    counts = {rgb: n for n, rgb in colors}

    def near(target: tuple[int, int, int]) -> int:
        return sum(
            n
            for rgb, n in counts.items()
            if all(abs(a - b) <= 24 for a, b in zip(rgb, target, strict=True))
        )

    # The page rendered, authenticated: the share bars (#4a78d0), the green "ready" and the red
    # "NOT ready" / "unable to answer" (#1b7a34, #b3261e), and table headers (#f1f3f7).
    assert near((0x4A, 0x78, 0xD0)) > 200, "no share bars: not the status page?"
    assert near((0x1B, 0x7A, 0x34)) > 20 and near((0xB3, 0x26, 0x1E)) > 20
    assert near((0xF1, 0xF3, 0xF7)) > 2000
    # Not a blank or error page: mostly white, with text.
    assert counts.get((255, 255, 255), 0) > 0.5 * 1200 * 800
    assert len(colors) > 50
