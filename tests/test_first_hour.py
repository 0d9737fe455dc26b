"""The first hour with tensorgate (issue 25), as a new user lives it: the demo's banner commands
run as printed (admin included), config-file edits that the store would shadow are loud and can be
applied, check-config reports every problem in its own words and probes the backends, and a
variant routed to a model its backend does not have falls back without leaking the name."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.backends.triton import REPO_ROOT, free_port
from tests.gateway_process import ADMIN_TOKEN, TENSORGATE, GatewayProcess, triton_backend

STARTUP_TIMEOUT = 240.0


def tensorgate(*args, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TENSORGATE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


def admin(gw: GatewayProcess, *args, token: str = ADMIN_TOKEN) -> subprocess.CompletedProcess:
    return tensorgate(
        "admin", "--address", gw.admin_address, *args, env={"TENSORGATE_ADMIN_TOKEN": token}
    )


def records(log: str, level: str, logger: str) -> list[str]:
    """The messages of the gateway's JSON log lines at `level` from a logger ending in `logger`."""
    found = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") == level and record.get("logger", "").endswith(logger):
            found.append(record["message"])
    return found


def linear_request(model: str = "linear", version: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.array([[1, 2, 3, 4]], dtype=np.float32).tobytes())
    return request


# -- the demo ---------------------------------------------------------------------------------


def banner_block(text: str, heading: str) -> list[str]:
    """The indented command lines after `heading` in the demo's banner, up to a blank line."""
    lines = text[text.index(heading) :].splitlines()[1:]
    block = []
    for line in lines:
        if not line.startswith("    "):
            if block:
                break
            continue
        block.append(line.strip())
    return block


@pytest.mark.slow  # a real Triton and the whole demo: about a minute
def test_the_demos_admin_commands_work_as_printed(tmp_path):
    ports = {name: free_port() for name in ("PORT", "METRICS_PORT", "TRITON_PORT", "ADMIN_PORT")}
    env = {**os.environ, **{f"TENSORGATE_DEMO_{k}": str(v) for k, v in ports.items()}}
    env.pop("TENSORGATE_ADMIN_TOKEN", None)
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(
            [str(REPO_ROOT / "scripts" / "demo")], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    traffic = None
    try:
        serving = f"serving Open Inference Protocol on 127.0.0.1:{ports['PORT']}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while serving not in log_path.read_text(errors="replace"):
            assert demo.poll() is None, f"demo exited {demo.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"demo not serving:\n{log_path.read_text()}"
            time.sleep(0.2)
        text = log_path.read_text(errors="replace")
        assert f"admin API on 127.0.0.1:{ports['ADMIN_PORT']}" in text
        commands = banner_block(text, "Operate it through the admin API")
        export = commands.pop(0)
        assert export.startswith("export TENSORGATE_ADMIN_TOKEN=")
        shell_env = {k: v for k, v in os.environ.items() if k != "TENSORGATE_ADMIN_TOKEN"}
        for assignment in shlex.split(export)[1:]:
            name, _, value = assignment.partition("=")
            shell_env[name] = value
        assert len(commands) == 6, commands
        runs = {}
        for command in commands:
            if command.endswith("&"):
                traffic = subprocess.Popen(
                    command.rstrip("&"), shell=True, cwd=REPO_ROOT, env=shell_env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
                time.sleep(2)
                continue
            runs[command] = subprocess.run(
                command, shell=True, cwd=REPO_ROOT, env=shell_env, capture_output=True,
                text=True, timeout=180,
            )  # fmt: skip
        routes, weights, rollout, drain, undrain = runs.values()
        assert routes.returncode == 0 and "flaky" in routes.stdout, routes
        assert re.search(r"flaky\s+triton-a\s+demo_flaky:1\s+3\s+0\s+0%", routes.stdout), routes
        assert weights.returncode == 0 and "stable 50 (50%), canary 50 (50%)" in weights.stdout
        assert rollout.returncode == 3, rollout  # rolled back
        assert "rolled_back" in rollout.stdout and "canary calls" in rollout.stdout, rollout
        assert drain.returncode == 0 and "drained: triton-a" in drain.stdout, drain
        assert "warning: route 'linear' has no variant on an undrained backend" in drain.stderr
        assert undrain.returncode == 0 and "drained: none" in undrain.stdout, undrain
        assert "Traceback" not in log_path.read_text(errors="replace")
    finally:
        if traffic is not None and traffic.poll() is None:
            os.killpg(traffic.pid, signal.SIGTERM)
            traffic.wait(10)
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            try:
                demo.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()


# -- the config file stays the truth ----------------------------------------------------------


def linear_route(*variants: str) -> dict:
    known = {
        "stable": {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear",
                   "backend_version": "1", "version": "1", "weight": 80},
        "canary": {"name": "canary", "backend": "triton-a", "backend_model": "demo_linear",
                   "backend_version": "2", "version": "2", "weight": 20},
        "flaky": {"name": "flaky", "backend": "triton-a", "backend_model": "demo_flaky",
                  "backend_version": "1", "version": "3", "weight": 0},
    }  # fmt: skip
    return {"model": "linear", "variants": [known[v] for v in variants]}


def test_file_edits_warn_at_start_and_apply_adds_and_removes_with_history(triton, tmp_path):
    base = {
        "backends": [triton_backend(triton.address)],
        "routes": [linear_route("stable", "canary")],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }
    directory = str(tmp_path)
    with GatewayProcess(base, admin=True, directory=directory) as gw:
        assert "config drift" not in gw.log()
    edited = dict(base, routes=[linear_route("stable", "canary", "flaky"),
                                {"model": "identity", "variants": [
                                    {"name": "only", "backend": "triton-a",
                                     "backend_model": "demo_identity", "weight": 1}]}])  # fmt: skip
    with GatewayProcess(edited, admin=True, directory=directory) as gw:
        (log,) = records(gw.log(), "WARNING", "admin.declared")
        assert log.startswith("config drift: the routes in "), log
        assert "+route identity" in log and "linear: +variant flaky" in log, log
        assert '+    "name": "flaky"' in log  # the diff, stored -> file
        assert "the file's routes are NOT served" in log
        assert f"tensorgate admin apply -f {gw.config_path}" in log
        routes = admin(gw, "routes")
        assert "flaky" not in routes.stdout and "identity" not in routes.stdout

        dry = admin(gw, "apply", "-f", gw.config_path, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert (
            "dry run: would make revision 2: +route identity, linear: +variant flaky" in dry.stdout
        )
        assert "flaky" not in admin(gw, "routes").stdout

        stale = admin(gw, "apply", "-f", gw.config_path, "--expect", "7")
        assert stale.returncode == 1 and "FAILED_PRECONDITION" in stale.stderr

        applied = admin(gw, "apply", "-f", gw.config_path, "--expect", "1")
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.startswith("revision 2: apply ")
        routes = admin(gw, "routes").stdout
        assert "flaky" in routes and "identity" in routes
        again = admin(gw, "apply", "-f", gw.config_path)
        assert again.returncode == 0 and again.stdout.startswith("no change"), again

        # Remove the variant and the route again: revision 3, with the history kept.
        gw.config_path.write_text(
            yaml.safe_dump(dict(gw.config, routes=[linear_route("stable", "canary")]))
        )
        removed = admin(gw, "apply", "-f", gw.config_path)
        assert removed.returncode == 0, removed.stderr
        assert "-route identity" in removed.stdout and "linear: -variant flaky" in removed.stdout
        history = admin(gw, "revisions").stdout
        assert [line.split()[0] for line in history.splitlines()[1:]] == ["3", "2", "1"]
        assert "ops" in history  # the author, from the token's name

        readonly = tensorgate("admin", "--address", gw.admin_address, "apply", "-f",
                              gw.config_path, env={"TENSORGATE_ADMIN_TOKEN": "viewer:read:"
                                                   "read-token-0123456789abcdef"})  # fmt: skip
        assert readonly.returncode == 1 and "PERMISSION_DENIED" in readonly.stderr

        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(dict(base, routes=[{"model": "x", "variants": [
            {"name": "v", "backend": "triton-b", "weight": 1}]}])))  # fmt: skip
        refused = admin(gw, "apply", "-f", bad)
        assert refused.returncode == 1 and "unknown backend 'triton-b'" in refused.stderr


def test_a_serve_that_fails_to_start_writes_nothing(triton, tmp_path):
    config = {
        "listeners": {"data_plane": f"127.0.0.1:{free_port()}", "metrics": "off",
                      "admin": f"127.0.0.1:{free_port()}"},
        "admin": {"tokens_env": "TG_TEST_TOKENS"},
        "backends": [triton_backend(triton.address)],
        "routes": [linear_route("stable")],
    }  # fmt: skip
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    short = tensorgate("serve", "-c", path, env={"TG_TEST_TOKENS": "ops:admin:short"})
    assert short.returncode == 1
    assert "admin tokens: token 'ops' has 5 characters: tokens need at least 16" in short.stderr
    unset = tensorgate("check-config", "-c", path)
    assert unset.returncode == 1
    assert "admin.tokens_env: environment variable TG_TEST_TOKENS is empty or unset" in unset.stderr
    assert "export TG_TEST_TOKENS=ops:admin:" in unset.stderr
    assert not (tmp_path / ".tensorgate-state").exists()
    # A busy data-plane port: the store is opened, but revision 1 is not written.
    config["admin"]["state_dir"] = "state"  # relative to the file, not the working directory
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config["listeners"]["data_plane"] = f"127.0.0.1:{busy.getsockname()[1]}"
        path.write_text(yaml.safe_dump(config))
        env = {"TG_TEST_TOKENS": f"ops:admin:{ADMIN_TOKEN}"}
        failed = tensorgate("serve", "-c", path, env=env)
    assert failed.returncode == 1 and "listeners.data_plane" in failed.stderr, failed.stderr
    assert not (tmp_path / "state" / "routes.json").exists()


# -- check-config finds everything ------------------------------------------------------------

MANY_PROBLEMS = """
backends:
  - {name: triton-a, kind: TRITON, address: "127.0.0.1:8101", per_try_timeout: 2 seconds}
routes:
  - model: linear
    variants:
      - {name: stable, backend: triton-a, backend_modle: demo_linear, weight: one}
      - {name: canary, backend: triton-b, backend_version: 2, weight: 1}
lifecycle: {readiness: ALL_ROUTES}
"""


def test_check_config_lists_every_problem_in_its_own_words(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text(MANY_PROBLEMS)
    run = tensorgate("check-config", "-c", path)
    assert run.returncode == 1 and run.stdout == ""
    found = run.stderr
    for expected in (
        f"{path}: invalid gateway config (7 problem(s))",
        "backends[0].kind: 'TRITON' is not a BackendKind (did you mean 'BACKEND_KIND_TRITON'?); "
        "use one of: BACKEND_KIND_TRITON, BACKEND_KIND_TFSERVING, BACKEND_KIND_TORCHSERVE, "
        "BACKEND_KIND_OIP",
        "backends[0].per_try_timeout: '2 seconds' is not a duration",
        "routes[0].variants[0].backend_modle: unknown field (did you mean 'backend_model'?)",
        "routes[0].variants[0].weight: 'one' is not a whole number",
        'routes[0].variants[1].backend_version: must be text, not a number (quote it: "2")',
        "routes[0].variants[1].backend: unknown backend 'triton-b' (known: triton-a)",
        "lifecycle.readiness: 'ALL_ROUTES' is not a Readiness (did you mean 'READINESS_ALL_ROUTES'?)",
    ):
        assert expected in found, found
    for leaked in ("Invalid enum value", "invalid literal", "Couldn't parse", "Traceback",
                   "tensorgate.config.v1", "Failed to parse"):  # fmt: skip
        assert leaked not in found, found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "backends: none declared"),
        ("", "routes: none declared"),
        ("backends: [{name: a, kind: BACKEND_KIND_TRITON, address: '127.0.0.1:1'}]\n",
         "routes: none declared"),
    ],
)  # fmt: skip
def test_check_config_refuses_empty_and_routeless_configs(tmp_path, text, expected):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    run = tensorgate("check-config", path)
    assert run.returncode == 1 and expected in run.stderr, run.stderr


def probe_config(triton, backend_model: str, **route) -> dict:
    return {
        "backends": [triton_backend(triton.address)],
        "routes": [{"model": "identity", "variants": [
            {"name": "only", "backend": "triton-a", "backend_model": backend_model, "weight": 1}],
            **route}],
    }  # fmt: skip


def test_check_config_probe_finds_a_model_the_backend_does_not_have(triton, tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(probe_config(triton, "demo_identiy")))
    plain = tensorgate("check-config", "-c", path)
    assert plain.returncode == 0, plain.stderr  # the file alone cannot know
    probed = tensorgate("check-config", "-c", path, "--probe")
    assert probed.returncode == 1
    assert "routes[0].variants[0].backend_model: backend triton-a has no ready model " \
        "'demo_identiy'" in probed.stderr  # fmt: skip

    schema = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}]}
    path.write_text(yaml.safe_dump(probe_config(triton, "demo_identity", schema=schema)))
    wrong_schema = tensorgate("check-config", "-c", path, "--probe")
    assert wrong_schema.returncode == 1
    assert "routes[0].schema.inputs[0].datatype: declared FP32, but 'demo_identity' on " \
        "triton-a takes INT32" in wrong_schema.stderr  # fmt: skip

    path.write_text(yaml.safe_dump(probe_config(triton, "demo_identity")))
    good = tensorgate("check-config", "-c", path, "--probe")
    assert good.returncode == 0, good.stderr
    assert "probe OK" in good.stdout and "triton-a has 'demo_identity'" in good.stdout

    config = probe_config(triton, "demo_identity")
    config["backends"][0]["address"] = f"127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump(config))
    down = tensorgate("check-config", "-c", path, "--probe", "--probe-timeout", "1")
    assert down.returncode == 1 and "backends[0].address: backend triton-a at" in down.stderr


# -- a misrouted model is loud and contained --------------------------------------------------


def test_a_misrouted_variant_falls_back_and_never_leaks_its_name(triton):
    static = {"static_response": {"outputs": [
        {"name": "OUTPUT0", "datatype": "INT32", "shape": [1], "int_values": [-1]}]}}  # fmt: skip
    config = probe_config(triton, "demo_identiy", policy={"fallback": [static]})
    config["routes"].append(
        {"model": "broken", "variants": [
            {"name": "only", "backend": "triton-a", "backend_model": "demo_identiy", "weight": 1}]}
    )  # fmt: skip
    config["routes"].append(linear_route("stable"))
    config["lifecycle"] = {"health_check_interval": "1s", "shutdown_grace": "1s"}
    with GatewayProcess(config) as gw:
        log = gw.log()
        warnings = records(log, "WARNING", "health")
        assert (
            "route 'identity' variant 'only' is unable to answer: backend triton-a has no ready "
            "model 'demo_identiy' (not there, or not loaded); its calls go to a sibling variant "
            "or the route's fallback" in warnings
        ), log
        assert "('triton-a'" not in log  # no Python tuples
        with grpc.insecure_channel(gw.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="identity")
            request.inputs.add(
                name="INPUT0", datatype="INT32", shape=[1]
            ).contents.int_contents.append(7)
            response, call = stub.ModelInfer.with_call(request, timeout=10)
            trailers = dict(call.trailing_metadata())
            assert trailers.get("x-tensorgate-degraded") == "static", trailers
            assert response.model_name == "identity"

            request.model_name = "broken"
            with pytest.raises(grpc.RpcError) as failed:
                stub.ModelInfer(request, timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "demo_identiy" not in failed.value.details()
            assert "route table names a model its backend does not have" in failed.value.details()

            ready = stub.ModelReady(service_pb2.ModelReadyRequest(name="broken"), timeout=5)
            assert not ready.ready
            ready = stub.ModelReady(service_pb2.ModelReadyRequest(name="linear"), timeout=5)
            assert ready.ready  # the healthy route is untouched
            assert stub.ModelInfer(linear_request(), timeout=10).model_name == "linear"
        deadline = time.monotonic() + 5
        while "is misrouted" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        misrouted = records(gw.log(), "WARNING", "dispatch")
        assert any(
            m.startswith("route 'broken' variant 'only' is misrouted: backend triton-a has no "
                         "model 'demo_identiy'") for m in misrouted
        ), gw.log()  # fmt: skip


# -- admin API: named variables, loud when off; metrics only at /metrics ----------------------


def test_admin_errors_name_the_variable_and_say_when_admin_is_off(triton, tmp_path):
    config = {"backends": [triton_backend(triton.address)], "routes": [linear_route("stable")]}
    with GatewayProcess(config, admin=True) as gw:
        no_token = tensorgate("admin", "--address", gw.admin_address, "routes",
                              env={"TENSORGATE_ADMIN_TOKEN": ""})  # fmt: skip
        assert no_token.returncode == 1
        assert "UNAUTHENTICATED" in no_token.stderr
        assert "$TENSORGATE_ADMIN_TOKEN: unset or empty" in no_token.stderr
        server_form = admin(gw, "routes", token=f"ops:admin:{ADMIN_TOKEN}")
        assert server_form.returncode == 0, server_form.stderr  # one variable for both ends
        base = gw.metrics_url.removesuffix("/metrics")
        assert b"tensorgate_requests_total" in urllib.request.urlopen(gw.metrics_url).read()
        for path in ("/", "/metricsx", "/status"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(base + path)
            assert missing.value.code == 404
    off = tensorgate("admin", "--address", f"127.0.0.1:{free_port()}", "--timeout", "2", "routes")
    assert off.returncode == 1
    assert "listeners.admin" in off.stderr and "UNAVAILABLE" in off.stderr


def test_the_readme_shows_what_the_demo_prints():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "[[17. 22. 39.]]" in readme and "[[17 22 39]]" not in readme
    assert Path(REPO_ROOT / "scripts" / "demo-traffic").stat().st_mode & 0o111
