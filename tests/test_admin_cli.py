"""`tensorgate admin` as a user runs it: a subprocess against a real gateway (admin API on) in front
of a real Triton. --json on every command, --timeout on every RPC, the exit status of
`rollout --watch` (promoted / rolled back / aborted) and Ctrl-C while watching."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest
from google.protobuf import json_format

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway_process import (
    ADMIN_TOKEN,
    READ_TOKEN,
    TENSORGATE,
    GatewayProcess,
    triton_backend,
)
from tests.loadgen import Results, run_load
from tests.oip import linear_request

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

# The exit statuses docs/admin.md ("CLI") promises.
EXIT_FAILED, EXIT_ROLLED_BACK, EXIT_ABORTED, EXIT_INTERRUPTED = 1, 3, 4, 130


def route(model: str, canary_model: str = "demo_linear") -> dict:
    variant = {"backend": "triton-a", "backend_version": "1"}
    return {
        "model": model,
        "variants": [
            {"name": "stable", "backend_model": "demo_linear", "weight": 100, **variant},
            {"name": "canary", "backend_model": canary_model, "weight": 0, **variant},
        ],
    }


@pytest.fixture(scope="module")
def gateway(triton):
    """One gateway; each test uses its own model, so rollouts do not meet."""
    config = {
        "backends": [triton_backend(triton.address)],
        "routes": [
            route("linear"),  # --json
            route("healthy"),  # a rollout that is promoted
            route("flaky", canary_model="demo_flaky"),  # one that is rolled back (20% errors)
            route("aborted"),  # one that is aborted while watched
            route("interrupted"),  # Ctrl-C while watching it
        ],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "2s"},
    }
    with GatewayProcess(config, admin=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def admin(gateway):
    with grpc.insecure_channel(gateway.admin_address) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def cli_command(address: str, *args: str) -> list[str]:
    return [str(TENSORGATE), "admin", "--address", address, *args]


def cli_env(token: str) -> dict[str, str]:
    return {"TENSORGATE_ADMIN_TOKEN": token, "PATH": "/usr/bin:/bin"}


def cli(address: str, *args: str, token: str = ADMIN_TOKEN, timeout: float = 30):
    return subprocess.run(
        cli_command(address, *args),
        capture_output=True,
        text=True,
        env=cli_env(token),
        timeout=timeout,
    )


def json_reply(run: subprocess.CompletedProcess, message_type) -> tuple[dict, object]:
    """The command's stdout, as JSON and as the RPC reply (every key a field of it)."""
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    return document, json_format.ParseDict(document, message_type())


def start_rollout(admin, model: str, **fields) -> admin_pb2.Rollout:
    request = admin_pb2.StartRolloutRequest(
        model=model, canary="canary", baseline="stable", steps=[20, 50, 100], **fields
    )
    return admin.StartRollout(request, metadata=ADMIN).rollout


# -- --json -----------------------------------------------------------------------------------


def test_read_commands_print_the_reply_as_json_with_proto_field_names(gateway, admin):
    address = gateway.admin_address
    # --json before the command (an `admin` option) and after it (the command's) alike.
    for args in (("--json", "routes"), ("routes", "--json")):
        document, reply = json_reply(
            cli(address, *args, token=READ_TOKEN), admin_pb2.GetRouteTableResponse
        )
        assert reply == admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN)
        linear = next(r for r in document["routes"] if r["model"] == "linear")
        # Proto field names, and fields at their default (weight 0) are printed too.
        assert {v["name"]: v["weight"] for v in linear["variants"]} == {"stable": 100, "canary": 0}
        assert linear["variants"][0]["backend_model"] == "demo_linear"

    document, reply = json_reply(
        cli(address, "revisions", "--limit", "2", "--json", token=READ_TOKEN),
        admin_pb2.ListRevisionsResponse,
    )
    assert reply == admin.ListRevisions(admin_pb2.ListRevisionsRequest(limit=2), metadata=ADMIN)
    assert "created_at" in document["revisions"][0] and "createdAt" not in document["revisions"][0]

    document, reply = json_reply(
        cli(address, "--json", "backends", token=READ_TOKEN), admin_pb2.GetBackendStatusResponse
    )
    (backend,) = document["backends"]
    assert backend["name"] == "triton-a" and backend["breaker_state"] == "closed"
    assert backend["drained"] is False and "recent_error_ratio" in backend
    assert {(v["model"], v["variant"]) for v in document["variants"]} >= {("linear", "canary")}

    start_rollout(admin, "linear", min_step_duration={"seconds": 3600})
    try:
        document, reply = json_reply(
            cli(address, "rollout", "status", "linear", "--json", token=READ_TOKEN),
            admin_pb2.GetRolloutResponse,
        )
        assert document["rollout"]["state"] == "STATE_RUNNING"
        assert document["rollout"]["steps"] == [20, 50, 100]
        assert document["rollout"]["analyses"] == []  # empty repeated fields too
        assert "started_at" in document["rollout"]
    finally:
        admin.AbortRollout(admin_pb2.AbortRolloutRequest(model="linear"), metadata=ADMIN)


def test_write_commands_print_the_reply_as_json(gateway, admin):
    address = gateway.admin_address
    document, _ = json_reply(
        cli(address, "shadow", "linear", "canary", "0.5", "--json"), admin_pb2.SetShadowResponse
    )
    assert document["route"]["policy"]["shadow"]["variant"] == "canary"
    json_reply(cli(address, "shadow", "linear", "--off", "--json"), admin_pb2.SetShadowResponse)

    document, reply = json_reply(
        cli(address, "--json", "set-weights", "linear", "stable=70", "canary=30"),
        admin_pb2.SetVariantWeightsResponse,
    )
    assert document["revision"]["author"] == "ops"
    assert {v.name: v.weight for v in reply.route.variants} == {"stable": 70, "canary": 30}
    first = document["revision"]["number"]  # uint64: a string in proto JSON

    document, _ = json_reply(
        cli(address, "--json", "rollback", str(int(first) - 1)), admin_pb2.RollbackResponse
    )
    assert document["revision"]["summary"] == f"rollback to revision {int(first) - 1}"

    document, _ = json_reply(
        cli(address, "drain", "triton-a", "--json"), admin_pb2.DrainBackendResponse
    )
    assert document == {"drained": ["triton-a"]}
    document, _ = json_reply(
        cli(address, "undrain", "triton-a", "--json"), admin_pb2.UndrainBackendResponse
    )
    assert document == {"drained": []}

    document, _ = json_reply(
        cli(
            address,
            "--json",
            "rollout",
            "start",
            "linear",
            "canary",
            "stable",
            "--min-step",
            "3600",
        ),
        admin_pb2.StartRolloutResponse,
    )
    assert document["rollout"]["state"] == "STATE_RUNNING"
    document, _ = json_reply(
        cli(address, "rollout", "abort", "linear", "--reason", "test", "--json"),
        admin_pb2.AbortRolloutResponse,
    )
    assert document["rollout"]["state"] == "STATE_ABORTED"


def test_text_output_is_unchanged_without_json(gateway):
    routes = cli(gateway.admin_address, "routes", token=READ_TOKEN)
    assert routes.returncode == 0, routes.stderr
    assert routes.stdout.startswith("revision ") and "MODEL" in routes.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(routes.stdout)


# -- --timeout --------------------------------------------------------------------------------


class SilentServer:
    """A TCP listener that accepts connections and never says a word: no gRPC answer, ever."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self.connected = threading.Event()  # a client is connected (and waiting)
        self._accepted: list[socket.socket] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._done.is_set():
            try:
                self._accepted.append(self._server.accept()[0])
            except OSError:
                continue
            self.connected.set()

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        for conn in self._accepted:
            conn.close()
        self._server.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.mark.parametrize(
    "args",
    [
        ("--timeout", "1", "routes"),
        ("--timeout", "1", "backends", "--json"),
        ("revisions", "--timeout", "1"),
        ("--timeout", "1", "set-weights", "linear", "stable=1"),
        ("--timeout", "1", "rollout", "status", "linear", "--watch"),
    ],
    ids=["routes", "backends-json", "revisions", "set-weights", "rollout-watch"],
)
def test_timeout_is_a_one_line_error_and_exit_1(silent, args):
    started = time.monotonic()
    run = cli(silent.address, *args, timeout=20)  # without a deadline: hangs until killed here
    elapsed = time.monotonic() - started
    assert run.returncode == EXIT_FAILED, (run.stdout, run.stderr)
    assert elapsed < 8, elapsed
    assert run.stdout == ""
    assert run.stderr == (
        f"error: DEADLINE_EXCEEDED: no reply from the admin API at {silent.address} "
        "within 1 s (--timeout)\n"
    )


def test_timeout_must_be_positive():
    run = cli("127.0.0.1:1", "--timeout", "0", "routes")
    assert run.returncode == 2 and "--timeout: '0' is not a number of seconds > 0" in run.stderr


def test_default_timeout_is_ten_seconds(silent):
    started = time.monotonic()
    run = cli(silent.address, "routes", timeout=30)
    assert run.returncode == EXIT_FAILED and "within 10 s (--timeout)" in run.stderr
    assert 9 < time.monotonic() - started < 20


# -- rollout --watch: the exit status says how it ended ----------------------------------------


async def watch_under_load(gateway, model: str, *args: str, timeout: float = 90):
    """Runs `tensorgate admin ARGS` while calls to MODEL keep the rollout's analysis fed."""
    stop = asyncio.Event()
    load = asyncio.ensure_future(
        run_load(
            gateway.address,
            lambda: linear_request(model),
            concurrency=4,
            until=stop,
            timeout=10,
            results=Results(),
        )
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *cli_command(gateway.admin_address, *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(ADMIN_TOKEN),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return proc.returncode, out.decode(), err.decode()
    finally:
        stop.set()
        await load


async def test_watch_exits_0_when_the_rollout_is_promoted(gateway, admin):
    code, out, err = await watch_under_load(
        gateway,
        "healthy",
        *("rollout", "start", "healthy", "canary", "stable", "--steps", "20,50,100"),
        *("--min-step", "1", "--min-requests", "40", "--max-p99-factor", "10", "--watch"),
    )
    assert code == 0, (out, err)
    assert "healthy: canary vs stable: promoted" in out
    rollout = admin.GetRollout(admin_pb2.GetRolloutRequest(model="healthy"), metadata=ADMIN)
    assert rollout.rollout.state == admin_pb2.Rollout.STATE_PROMOTED


async def test_watch_exits_3_when_the_rollout_is_rolled_back(gateway, admin):
    code, out, err = await watch_under_load(
        gateway,
        "flaky",
        *("--json", "rollout", "start", "flaky", "canary", "stable", "--steps", "20,50,100"),
        *("--min-step", "1", "--min-requests", "40", "--max-p99-factor", "10", "--watch"),
    )
    assert code == EXIT_ROLLED_BACK, (out, err)
    # --json --watch: one reply per line, the last one the rollout as it ended.
    replies = [json.loads(line) for line in out.splitlines()]
    assert replies[0]["rollout"]["state"] == "STATE_RUNNING"
    last = replies[-1]["rollout"]
    assert last["state"] == "STATE_ROLLED_BACK" and "error ratio" in last["reason"]
    assert err == ""


def _ctrl_c_as_in_a_terminal() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and an
    # ignored SIGINT stays ignored across exec (Python then installs no KeyboardInterrupt
    # handler): a suite started that way (`scripts/test &`) would see the CLI ignore Ctrl-C
    # as its caller asked. These tests are about a Ctrl-C typed at a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def watching(gateway, model: str) -> subprocess.Popen:
    """`tensorgate admin rollout status MODEL --watch` running, its output readable as text."""
    return subprocess.Popen(
        cli_command(gateway.admin_address, "rollout", "status", model, "--watch"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(READ_TOKEN),
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )


def test_watch_exits_4_when_the_rollout_is_aborted(gateway, admin):
    start_rollout(admin, "aborted", min_step_duration={"seconds": 3600})
    watch = watching(gateway, "aborted")
    try:
        assert "aborted: canary vs stable: running" in watch.stdout.readline()
        admin.AbortRollout(
            admin_pb2.AbortRolloutRequest(model="aborted", reason="paging"), metadata=ADMIN
        )
        out, err = watch.communicate(timeout=15)
    finally:
        watch.kill()
    assert watch.returncode == EXIT_ABORTED, (out, err)
    assert "aborted: canary vs stable: aborted" in out and "paging" in out
    # Once ended, `status --watch` says the outcome at once.
    again = cli(gateway.admin_address, "rollout", "status", "aborted", "--watch")
    assert again.returncode == EXIT_ABORTED and "aborted" in again.stdout


def test_ctrl_c_while_watching_exits_130_without_a_traceback(gateway, admin):
    start_rollout(admin, "interrupted", min_step_duration={"seconds": 3600})
    try:
        watch = watching(gateway, "interrupted")
        try:
            assert "running" in watch.stdout.readline()
            time.sleep(0.5)  # into the watch loop (sleeping or polling)
            watch.send_signal(signal.SIGINT)
            out, err = watch.communicate(timeout=10)
        finally:
            watch.kill()
        assert watch.returncode == EXIT_INTERRUPTED, (out, err)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        assert err.strip() == (
            "interrupted: stopped watching; the rollout of interrupted goes on "
            "(stop it with: tensorgate admin rollout abort interrupted)"
        )
        # Only the watching stopped.
        rollout = admin.GetRollout(admin_pb2.GetRolloutRequest(model="interrupted"), metadata=ADMIN)
        assert rollout.rollout.state == admin_pb2.Rollout.STATE_RUNNING
    finally:
        admin.AbortRollout(admin_pb2.AbortRolloutRequest(model="interrupted"), metadata=ADMIN)


def test_ctrl_c_during_any_call_exits_130_without_a_traceback(silent):
    call = subprocess.Popen(
        cli_command(silent.address, "--timeout", "30", "routes"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(READ_TOKEN),
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    try:
        assert silent.connected.wait(15)  # the call waits for a reply that never comes
        time.sleep(0.2)
        os.kill(call.pid, signal.SIGINT)
        out, err = call.communicate(timeout=10)
    finally:
        call.kill()
    assert call.returncode == EXIT_INTERRUPTED, (out, err)
    assert err.strip() == "interrupted" and out == ""
