"""scripts/demo stops everything it started on Ctrl-C (SIGINT to its process group, as a terminal
sends it; also pressed twice) and on SIGTERM: the gateway, the Triton harness and tritonserver
with its python backend stubs (tritonserver runs in a session of its own, so it is looked for
among the demo's descendants, not only in its process group)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.backends.triton import REPO_ROOT, free_port

STARTUP_TIMEOUT = 240.0  # a first run builds the Triton venv (about a minute)
STOP_TIMEOUT = 15.0


def processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, session id, state, command line) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0], cmdline.strip())
    return table


def descendants(root: int) -> dict[int, str]:
    """Live processes under ``root`` (whatever their session), with their command lines."""
    table = processes()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _sid, state, cmdline) in table.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = cmdline
                frontier.append(pid)
    return found


def alive(pids: dict[int, str], session: int, triton_port: int) -> dict[int, str]:
    """Which of ``pids``, or any process of ``session``, or a tritonserver on the demo's port, is
    still running (zombies do not run; pid reuse is told apart by the command line)."""
    left = {}
    for pid, (_ppid, sid, state, cmdline) in processes().items():
        if state == "Z":
            continue
        if (
            sid == session
            or pids.get(pid) == cmdline
            or ("tritonserver" in cmdline and f"--grpc-port={triton_port}" in cmdline)
        ):
            left[pid] = cmdline
    return left


@pytest.mark.slow  # about 20 s each: a real Triton starts and stops
@pytest.mark.parametrize(
    "signals",
    [("SIGINT",), ("SIGINT", "SIGINT"), ("SIGTERM",)],
    ids=["ctrl-c", "ctrl-c-twice", "sigterm"],
)
def test_demo_stops_everything(signals, tmp_path):
    port, metrics_port, triton_port, rest_port = free_port(), free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "TENSORGATE_DEMO_PORT": str(port),
        "TENSORGATE_DEMO_REST_PORT": str(rest_port),
        "TENSORGATE_DEMO_METRICS_PORT": str(metrics_port),
        "TENSORGATE_DEMO_TRITON_PORT": str(triton_port),
    }
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(
            [str(REPO_ROOT / "scripts" / "demo")],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own session and process group, as a terminal job
        )
    started: dict[int, str] = {}
    try:
        serving = f"serving Open Inference Protocol on 127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while serving not in log_path.read_text(errors="replace"):
            assert demo.poll() is None, f"demo exited {demo.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"demo not serving:\n{log_path.read_text()}"
            time.sleep(0.2)
        text = log_path.read_text(errors="replace")
        assert f'InferenceServerClient("127.0.0.1:{port}")' in text  # the ports it was given
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5).ready
        # The banner's REST call, on the REST port it was given
        assert f"127.0.0.1:{rest_port}/v2/models/linear/versions/1/infer" in text
        reply = httpx.post(
            f"http://127.0.0.1:{rest_port}/v2/models/linear/versions/1/infer",
            json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4],
                              "data": [1, 2, 3, 4]}]},
            timeout=10,
        )  # fmt: skip
        assert reply.json()["outputs"][0]["data"] == [4.0, 8.0, 12.0], reply.text

        started = descendants(demo.pid)
        kinds = " | ".join(started.values())
        assert "tests.backends.triton" in kinds and "tensorgate serve" in kinds, started
        assert any(
            "tritonserver" in c and f"--grpc-port={triton_port}" in c for c in started.values()
        ), started

        # What an interrupted harness leaves behind (tritonserver then dies by PDEATHSIG's SIGKILL):
        # its copy of the backends, removed once its stop() has run to the end. (Not the stubs'
        # shared memory: tritonserver itself leaves some behind when a model does not unload
        # within --exit-timeout-secs.)
        backends = [
            Path(arg.removeprefix("--backend-directory="))
            for c in started.values()
            for arg in c.split()
            if arg.startswith("--backend-directory=")
        ]
        assert backends and all(p.is_dir() for p in backends), started

        signalled = time.monotonic()
        for name in signals:
            os.killpg(demo.pid, getattr(signal, name))
            time.sleep(0.3)  # the second Ctrl-C lands in the middle of the shutdown
        demo.wait(STOP_TIMEOUT)
        left = alive(started, demo.pid, triton_port)
        while left and time.monotonic() < signalled + STOP_TIMEOUT:
            time.sleep(0.2)
            left = alive(started, demo.pid, triton_port)
        assert left == {}, f"still running {STOP_TIMEOUT:.0f} s after {signals}: {left}"
        assert [p for p in backends if p.exists()] == []  # the harness's stop() completed
        assert demo.returncode == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text(errors="replace")
    finally:
        # Whatever happened above, leave nothing behind.
        for pid in alive(started, demo.pid, triton_port):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if demo.poll() is None:
            demo.kill()
            demo.wait()
