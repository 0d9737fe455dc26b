"""Smoke examples (docs/smoke.md): declared in the config and refused whole when bad;
`tensorgate smoke` against a real gateway in front of a real Triton (pass 0, fail 1 naming the
output and the difference, unreachable 2; wrong backend models caught; each variant reached by
the pins callers have); rollouts that run the canary's examples before each weight step and roll
back a failing canary before traffic moves (rollout status and the audit log show the example);
the Kubernetes Job component, rendered, strictly validated and run against the ConfigMap's
routes; the demo config's examples against the demo models."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess

import grpc
import numpy as np
import pytest
import yaml
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs.oip import add_output
from gateway.controlplane.config import ConfigError, from_dict, load_file
from gateway.controlplane.smoke import reach
from gateway.controlplane.smoke_examples import judge
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.backends.process import tool
from tests.backends.triton import REPO_ROOT, free_port
from tests.builders import variant
from tests.gateway_process import ADMIN_TOKEN, TENSORGATE, GatewayProcess, triton_backend
from tests.loadgen import Results, run_load
from tests.oip import linear_request

K8S = REPO_ROOT / "deploy" / "kubernetes"
COMPONENT = K8S / "components" / "smoke"
DEMO = REPO_ROOT / "deploy" / "demo" / "gateway.yaml"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
X = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}


def expect(name: str, y: list[float], **fields) -> dict:
    """An example of demo_linear: x = [1, 2, 3, 4] must give `y`."""
    out = {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3], "data": y}
    return {"name": name, "inputs": [X], "outputs": [out], **fields}


V1 = [4, 8, 12]  # demo_linear version 1 for X (deploy/demo/models/README.md)
V2 = [17, 22, 39]


def smoke(config_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TENSORGATE, "smoke", "-c", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def config_with(triton, *routes: dict) -> dict:
    return {
        "backends": [triton_backend(triton.address)],
        "routes": list(routes),
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }


# --- declared in the config, refused whole --------------------------------------------------

BASE = {"backends": [triton_backend("127.0.0.1:1")]}


def problems(route_fields: dict, variant_smoke=None) -> list[str]:
    route = {"model": "m", "variants": [variant("a", smoke=variant_smoke or [])], **route_fields}
    with pytest.raises(ConfigError) as err:
        from_dict({**BASE, "routes": [route]})
    return [str(p) for p in err.value.problems]


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ({**expect("e", V1), "inputs": [{**X, "data": [1, 2]}]},
         "routes[0].smoke[0].inputs[0].data: 2 values for shape [1, 4], which holds 4"),
        ({**expect("e", V1), "inputs": [{**X, "datatype": "FLOAT"}]},
         "routes[0].smoke[0].inputs[0].datatype: 'FLOAT' is not an OIP datatype"),
        ({**expect("e", V1), "inputs": [{**X, "shape": [1, -1]}]},
         "routes[0].smoke[0].inputs[0].shape: dimensions are sizes >= 0"),
        ({**expect("e", V1), "inputs": [{**X, "datatype": "INT32", "data": [1, 2, 3.5, 4]}]},
         "routes[0].smoke[0].inputs[0].data: element 2: 3.5 is not a whole number"),
        ({**expect("e", V1), "inputs": [{**X, "datatype": "INT8", "data": [1, 2, 3, 400]}]},
         "routes[0].smoke[0].inputs[0].data: element 3: 400 is out of range for INT8"),
        ({**expect("e", V1), "inputs": [{**X, "datatype": "BOOL"}]},
         "routes[0].smoke[0].inputs[0].data: element 0: BOOL values are true or false"),
        ({**expect("e", V1), "inputs": []}, "routes[0].smoke[0].inputs: at least one input"),
        ({"name": "e", "inputs": [X]},
         "routes[0].smoke[0]: checks nothing: give expected outputs, checks or a latency_budget"),
        ({"name": "e", "inputs": [X], "checks": [{"output": "OUTPUT0"}]},
         "routes[0].smoke[0].checks[0]: checks nothing: set datatype, shape, min, max or argmax"),
        ({"name": "e", "inputs": [X], "checks": [{"output": "OUTPUT0", "min": 2, "max": 1}]},
         "routes[0].smoke[0].checks[0].min: 2 is above max 1"),
        ({"name": "e", "inputs": [X], "checks": [{"datatype": "FP32"}]},
         "routes[0].smoke[0].checks[0].output: required"),
        ({**expect("e", V1), "tolerance": {"rel": -0.1}},
         "routes[0].smoke[0].tolerance.rel: must be a finite number >= 0"),
        ({"name": "e", "inputs": [X], "latency_budget": "0s"},
         "routes[0].smoke[0].latency_budget: must be positive"),
        ({**expect("has space", V1)}, "routes[0].smoke[0].name: 'has space' must match"),
        ({**expect("e", V1), "inputs": [{**X, "data": 5}]}, "routes[0].smoke[0].inputs[0].data"),
        ({**expect("e", V1), "inputs": [{**X, "shape": [1, 20000], "data": [0.5] * 20000}]},
         "routes[0].smoke[0]: 220087 bytes: at most 65536 (examples travel with every"),
    ],
)  # fmt: skip
def test_a_bad_example_is_refused_with_its_field_path(example, expected):
    found = problems({"smoke": [example]})
    assert any(p.startswith(expected) for p in found), found


def test_example_names_are_unique_among_what_a_variant_runs():
    found = problems({"smoke": [expect("same", V1)]}, [expect("same", V1)])
    assert "routes[0].variants[0].smoke[0].name: duplicate example 'same' (in the route's smoke)" in found  # fmt: skip


def test_check_config_refuses_a_bad_example_naming_the_field(tmp_path):
    config = yaml.safe_load(DEMO.read_text())
    config["routes"][0]["variants"][1]["smoke"][0]["outputs"][0]["data"] = [17, 22]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run = subprocess.run([TENSORGATE, "check-config", path], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout
    assert (
        "routes[0].variants[1].smoke[0].outputs[0].data: 2 values for shape [1, 3], which holds 3"
        in run.stderr
    ), run.stderr
    assert "Traceback" not in run.stderr


def test_every_demo_and_kubernetes_example_is_valid():
    for path in (DEMO, K8S / "gateway.yaml"):
        config = load_file(path)
        assert sum(len(r.smoke) + sum(len(v.smoke) for v in r.variants) for r in config.routes)
    demo = load_file(DEMO)
    assert all(r.smoke or any(v.smoke for v in r.variants) for r in demo.routes)


# --- judging an answer, reaching a variant (no servers) -------------------------------------


def answer(**outputs: np.ndarray) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse()
    for name, array in outputs.items():
        add_output(response, name, array)
    return response


def example(**fields) -> object:
    route = {"model": "m", "smoke": [{"name": "e", "inputs": [X], **fields}]}
    return from_dict({**BASE, "routes": [{**route, "variants": [variant("a")]}]}).routes[0].smoke[0]


def test_judge_compares_values_within_the_tolerance_and_names_the_difference():
    got = answer(OUTPUT0=np.array([[4, 8, 12.5]], dtype=np.float32))
    wrong = judge(example(outputs=[expect("e", V1)["outputs"][0]]), got)
    assert wrong == [
        "OUTPUT0[0, 2] = 12.5, expected 12 (1 of 3 values differ; tolerance: abs 0, rel 1e-06)"
    ]
    close = example(outputs=[expect("e", V1)["outputs"][0]], tolerance={"abs": 0.5})
    assert judge(close, got) == []


def test_judge_checks_datatype_shape_range_and_argmax():
    probs = answer(P=np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], dtype=np.float32))
    good = {"output": "P", "datatype": "FP32", "shape": [-1, 3], "min": 0, "max": 1}
    assert judge(example(checks=[{**good, "argmax": [1, 0]}]), probs) == []
    found = judge(example(checks=[{**good, "shape": [2, 4], "max": 0.6, "argmax": [1, 1]}]), probs)
    assert found == [
        "P: shape [2, 3], expected [2, 4] (-1: any size)",
        "P: largest value 0.699999988, expected <= 0.6",
        "P: argmax [1, 0], expected [1, 1]",
    ]
    assert judge(example(checks=[{"output": "Q", "datatype": "FP32"}]), probs) == [
        "Q: not in the answer (it has: P)"
    ]
    ints = answer(P=np.array([1, 2], dtype=np.int32))
    assert judge(example(checks=[{"output": "P", "datatype": "FP32"}]), ints) == [
        "P: datatype INT32, expected FP32"
    ]


def test_reach_uses_the_pins_callers_have():
    config = from_dict(
        {
            **BASE,
            "routes": [
                {
                    "model": "m",
                    "variants": [
                        variant("big", weight=97),
                        variant("small", weight=3),
                        variant("pinned", version="7", weight=0),
                        variant("fallback-only", weight=0),
                    ],
                }
            ],
        }
    )
    route, defaults = config.routes[0], config.defaults.route_policy
    from gateway.dataplane.routing import RouteTable

    plan = RouteTable([route], defaults).plan("m")
    for name in ("big", "small"):
        way = reach(route, name, defaults)
        assert way.version == "" and way.key is not None
        assert plan.resolve("", way.key).variant == name  # the gateway's own choice
    assert reach(route, "pinned", defaults).version == "7"
    assert reach(route, "pinned", defaults).key is None
    reason = reach(route, "fallback-only", defaults)
    assert isinstance(reason, str) and reason.startswith("cannot be reached alone: weight 0")


# --- tensorgate smoke against a real gateway and Triton -------------------------------------


@pytest.fixture(scope="module")
def served(triton, tmp_path_factory):
    """One gateway: `linear` (a version-pinned variant, one reached by route key, one that
    cannot be singled out), `wrong` (variants whose backend model or version is not the one
    their examples describe), `slow` (demo_sleep over its latency budget)."""
    routes = [
        {
            "model": "linear",
            "smoke": [
                {
                    "name": "one-row",
                    "inputs": [X],
                    "latency_budget": "2s",
                    "checks": [{"output": "OUTPUT0", "datatype": "FP32", "shape": [1, 3]}],
                },
            ],
            "variants": [
                variant("stable", version="1", weight=60, smoke=[expect("v1", V1)]),
                # No version: reached by a route key the gateway's hashing sends to it.
                variant("keyed", backend_version="2", weight=40, smoke=[expect("v2", V2)]),
                variant("fallback-only", weight=0, smoke=[expect("v1", V1)]),
            ],
        },
        {
            "model": "wrong",
            "variants": [
                variant("right", version="1", smoke=[expect("v1", V1)]),
                # Deployed with version 2 where version 1 was meant.
                variant(
                    "version-2",
                    backend_version="2",
                    version="2",
                    weight=0,
                    smoke=[expect("v1", V1)],
                ),
                # A version the backend does not have.
                variant(
                    "missing", backend_version="9", version="9", weight=0, smoke=[expect("v1", V1)]
                ),
            ],
        },
        {
            "model": "slow",
            "variants": [variant("only", backend_model="demo_sleep", backend_version=None)],
            "smoke": [
                {
                    "name": "sleeps",
                    "latency_budget": "0.1s",
                    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [0.4]}],
                },
            ],
        },
    ]
    with GatewayProcess(config_with(triton, *routes)) as gw:
        path = tmp_path_factory.mktemp("smoke") / "gateway.yaml"
        path.write_text(gw.config_path.read_text())
        yield gw, path


def test_passing_examples_exit_0_with_a_report(served):
    gw, path = served
    run = smoke(path, "--route", "linear", "--target", gw.address)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [" ".join(line.split()) for line in run.stdout.splitlines()]
    assert any(line.startswith("PASS linear/stable v1 ") and "version 1" in line for line in lines)
    keyed = [line for line in lines if line.startswith("PASS linear/keyed v2 ")]
    assert keyed and "route key smoke-keyed-" in keyed[0], run.stdout
    assert any(line.startswith("SKIP linear/fallback-only v1 ") for line in lines), run.stdout
    assert "cannot be reached alone: weight 0" in run.stdout
    assert lines[-1] == "4 passed, 0 failed, 2 skipped", run.stdout
    as_json = json.loads(smoke(path, "--route", "linear", "--target", gw.address, "--json").stdout)
    assert (as_json["passed"], as_json["failed"], as_json["exit_code"]) == (4, 0, 0)
    passed = [r for r in as_json["results"] if r["status"] == "pass"]
    assert all(r["latency_ms"] > 0 and not r["problems"] for r in passed)
    assert {r["budget_ms"] for r in passed if r["example"] == "one-row"} == {2000.0}


def test_a_variant_that_cannot_be_singled_out_fails_when_asked_for(served):
    gw, path = served
    run = smoke(path, "--route", "linear", "--variant", "fallback-only", "--target", gw.address)
    assert run.returncode == 1 and "FAIL" in run.stdout and "reached alone" in run.stdout


def test_a_wrong_expectation_exits_1_naming_the_output_and_the_difference(served, tmp_path):
    gw, path = served
    config = yaml.safe_load(path.read_text())
    config["routes"][0]["variants"][0]["smoke"] = [expect("v1", [4, 8, 13])]
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(config))
    run = smoke(wrong, "--route", "linear", "--variant", "stable", "--target", gw.address)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL" in run.stdout and "linear/stable" in run.stdout
    assert (
        "OUTPUT0[0, 2] = 12, expected 13 (1 of 3 values differ; tolerance: abs 0, rel 1e-06)"
        in run.stdout
    ), run.stdout
    body = json.loads(
        smoke(
            wrong, "--route", "linear", "--variant", "stable", "--target", gw.address, "--json"
        ).stdout
    )
    (failed,) = [r for r in body["results"] if r["status"] == "fail"]
    assert failed["example"] == "v1" and "OUTPUT0[0, 2] = 12, expected 13" in failed["problems"][0]


def test_variants_whose_backend_model_is_wrong_are_caught(served):
    gw, path = served
    run = smoke(path, "--route", "wrong", "--target", gw.address, "--json")
    assert run.returncode == 1, run.stdout + run.stderr
    results = {r["variant"]: r for r in json.loads(run.stdout)["results"]}
    assert results["right"]["status"] == "pass"
    assert results["version-2"]["status"] == "fail"
    assert results["version-2"]["problems"] == [
        "OUTPUT0[0, 0] = 17, expected 4; OUTPUT0[0, 1] = 22, expected 8; OUTPUT0[0, 2] = 39, "
        "expected 12 (3 of 3 values differ; tolerance: abs 0, rel 1e-06)"
    ]
    (problem,) = results["missing"]["problems"]
    assert problem.startswith("UNAVAILABLE: ") and "cannot answer" in problem, problem


def test_a_route_key_that_lands_elsewhere_is_replaced_by_one_that_reaches_the_variant(
    served, tmp_path
):
    """The file's weights differ from the live ones (as after `admin set-weights`, or with
    Envoy's own key hashing): the key computed from the file lands on another variant, so other
    keys are tried until one reaches it, and the report says so."""
    from gateway.dataplane.routing import RouteTable

    gw, path = served
    config = yaml.safe_load(path.read_text())
    config["routes"][0]["variants"][0]["weight"] = 1  # live: stable 60, keyed 40
    config["routes"][0]["variants"][1]["weight"] = 99
    stale = tmp_path / "stale.yaml"
    stale.write_text(yaml.safe_dump(config))
    file_config, live_config = load_file(stale), load_file(path)
    key = reach(file_config.routes[0], "keyed", file_config.defaults.route_policy).key
    live = RouteTable(live_config.routes, live_config.defaults.route_policy).plan("linear")
    assert live.resolve("", key).variant == "stable"  # so the path under test is taken
    run = smoke(stale, "--route", "linear", "--variant", "keyed", "--target", gw.address)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "route key smoke-keyed-probe-" in run.stdout and "found by trying" in run.stdout


def test_every_variant_is_reached_through_envoy_mode(triton):
    """Envoy serves the route (weighted clusters, its own hashing of route keys, version pins
    read from the body): the same examples pass through Envoy's listener."""
    from tests.test_envoy_dataplane import envoy_in_front

    xds, listen = free_port(), free_port()
    route = {
        "model": "linear",
        "variants": [
            variant("a", weight=70, smoke=[expect("v1", V1)]),
            variant("b", backend_version="2", weight=30, smoke=[expect("v2", V2)]),
            variant("pinned", backend_version="2", version="5", weight=0, smoke=[expect("v2", V2)]),
        ],
    }
    config = {
        **config_with(triton, route),
        "listeners": {"xds": f"127.0.0.1:{xds}"},
        "envoy": {"listen": f"127.0.0.1:{listen}"},
    }
    gateway = GatewayProcess(config)
    with envoy_in_front(gateway, "envoy-smoke", 71):
        check = subprocess.run(
            [TENSORGATE, "check-config", str(gateway.config_path)], capture_output=True, text=True
        )
        assert "envoy   linear" in check.stdout, check.stdout  # Envoy answers, not the gateway
        run = smoke(gateway.config_path, "--target", f"127.0.0.1:{listen}", "--json")
    body = json.loads(run.stdout)
    assert run.returncode == 0, body
    assert {r["variant"]: r["status"] for r in body["results"]} == {
        "a": "pass", "b": "pass", "pinned": "pass"
    }  # fmt: skip


def test_an_answer_over_its_latency_budget_fails(served):
    gw, path = served
    run = smoke(path, "--route", "slow", "--target", gw.address)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "over its budget of 100 ms" in run.stdout, run.stdout


def test_an_unreachable_target_exits_2(served):
    _, path = served
    run = smoke(path, "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "nothing answered at 127.0.0.1:" in run.stderr and "Traceback" not in run.stderr


def test_selection_and_headers_are_checked_before_anything_is_sent(served):
    gw, path = served
    run = smoke(path, "--route", "nope", "--target", gw.address)
    assert run.returncode == 1 and "no route 'nope'" in run.stderr, run.stderr
    run = smoke(path, "--header", "no-colon", "--target", gw.address)
    assert run.returncode == 1 and "'name: value'" in run.stderr, run.stderr


def test_a_data_plane_that_wants_a_token_gets_it_from_the_environment_or_a_header(triton, tmp_path):
    from tests.callers import Signer, callers_config

    signer = Signer(tmp_path)
    route = {
        "model": "linear",
        "variants": [variant("stable", version="1", smoke=[expect("v1", V1)])],
        "authorization": {
            "rules": [{"name": "smoke", "callers": ["smoke-job"], "versions": ["1"]}]
        },
    }
    config = {**config_with(triton, route), "callers": callers_config(signer)}
    token = signer.token("smoke-job")
    with GatewayProcess(config) as gw:
        anonymous = smoke(gw.config_path, "--target", gw.address)
        from_env = smoke(
            gw.config_path, "--target", gw.address, env={"TENSORGATE_SMOKE_TOKEN": token}
        )
        header = smoke(
            gw.config_path, "--target", gw.address, "-H", f"authorization: Bearer {token}"
        )
        other = smoke(gw.config_path, "--target", gw.address, "--token-env", "MY_TOKEN",
                      env={"MY_TOKEN": signer.token("someone-else")})  # fmt: skip
    assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stdout, anonymous.stdout
    assert from_env.returncode == 0, from_env.stdout + from_env.stderr
    assert header.returncode == 0, header.stdout + header.stderr
    assert other.returncode == 1 and "PERMISSION_DENIED" in other.stdout, other.stdout
    for run in (anonymous, from_env, header, other):
        assert token not in run.stdout + run.stderr


def test_the_demo_config_examples_pass_against_the_demo_models(triton):
    config = yaml.safe_load(DEMO.read_text())
    config["listeners"] = {}
    for backend in config["backends"]:
        backend["address"] = triton.address
    with GatewayProcess(config) as gw:
        run = smoke(gw.config_path, "--target", gw.address, "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    body = json.loads(run.stdout)
    assert all(r["status"] == "pass" for r in body["results"]), body
    assert {(r["route"], r["variant"], r["example"]) for r in body["results"]} == {
        ("linear", "stable", "v1-answer"), ("linear", "canary", "v2-answer"),
        ("linear", "canary", "a-batch-of-two"), ("identity", "only", "echoes"),
        ("sleep", "only", "no-sleep"),
    }  # fmt: skip


# --- rollouts: smoke before each weight step -------------------------------------------------


def rollout_config(triton, canary: dict) -> dict:
    stable = variant("stable", weight=100, smoke=[expect("v1", V1)])
    return config_with(triton, {"model": "linear", "variants": [stable, canary]})


async def watch(gw, admin, *, load: bool, timeout: float = 60.0) -> admin_pb2.Rollout:
    results, stop = Results(), asyncio.Event()
    traffic = asyncio.ensure_future(
        run_load(gw.address, linear_request, concurrency=3, until=stop, timeout=10, results=results)
        if load
        else asyncio.sleep(0)
    )
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            await asyncio.sleep(0.2)
            reply = await asyncio.to_thread(
                admin.GetRollout, admin_pb2.GetRolloutRequest(model="linear"), metadata=ADMIN
            )
            if reply.rollout.state != admin_pb2.Rollout.STATE_RUNNING:
                return reply.rollout
            assert asyncio.get_running_loop().time() < deadline, reply.rollout
    finally:
        stop.set()
        await traffic


def start(admin, canary: str, steps=(20, 50, 100)) -> None:
    request = admin_pb2.StartRolloutRequest(
        model="linear", canary=canary, baseline="stable", steps=list(steps),
        min_step_duration={"seconds": 1}, min_requests=20, max_p99_factor=20,
    )  # fmt: skip
    admin.StartRollout(request, metadata=ADMIN)


async def test_a_rollout_to_a_canary_failing_its_smoke_test_is_rolled_back_before_its_first_step(
    triton,
):
    # Version 2 deployed where version 1 was meant: fast, no errors, wrong. At weight 0 and with
    # no version of its own, no caller could single it out: the rollout tests it in the gateway.
    canary = variant("wrong", backend_version="2", weight=0, smoke=[expect("v1", V1)])
    with (
        GatewayProcess(rollout_config(triton, canary), admin=True) as gw,
        grpc.insecure_channel(gw.admin_address) as channel,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        start(admin, "wrong")
        rollout = await watch(gw, admin, load=False)
        assert rollout.state == admin_pb2.Rollout.STATE_ROLLED_BACK, rollout
        assert not rollout.analyses  # no weight step was taken
        run = rollout.smoke
        assert (run.percent, run.examples, len(run.failures)) == (20, 1, 1), run
        assert run.failures[0].example == "v1"
        assert run.failures[0].problem.startswith("OUTPUT0[0, 0] = 17, expected 4;"), run
        assert rollout.reason.startswith("smoke example 'v1' failed before step 20%: OUTPUT0[0, 0]")
        table = admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN)
        assert {v.name: v.weight for v in table.routes[0].variants} == {"stable": 100, "wrong": 0}
        revisions = admin.ListRevisions(admin_pb2.ListRevisionsRequest(), metadata=ADMIN)
        assert not any("wrong 20%" in r.summary for r in revisions.revisions)  # never moved
        audit = [
            json.loads(line)
            for line in (pathlib.Path(gw.directory) / ".tensorgate-state" / "audit.jsonl")
            .read_text()
            .splitlines()
        ]
        assert audit[-1]["who"] == "rollout:ops"
        assert (
            "smoke example 'v1' failed before step 20%: OUTPUT0[0, 0] = 17, expected 4"
            in (audit[-1]["summary"])
        ), audit[-1]
        status = await asyncio.to_thread(
            subprocess.run,
            [TENSORGATE, "admin", "--address", gw.admin_address, "rollout", "status", "linear"],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "TENSORGATE_ADMIN_TOKEN": ADMIN_TOKEN},
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "smoke examples before 20%: 1 of 1 FAILED" in status.stdout, status.stdout
        assert "v1: OUTPUT0[0, 0] = 17, expected 4" in status.stdout


async def test_a_canary_passing_its_smoke_tests_is_promoted_with_each_step_checked(triton):
    canary = variant("canary", weight=0, smoke=[expect("v1", V1, latency_budget="2s")])
    with (
        GatewayProcess(rollout_config(triton, canary), admin=True) as gw,
        grpc.insecure_channel(gw.admin_address) as channel,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        start(admin, "canary", steps=(50, 100))
        rollout = await watch(gw, admin, load=True)
        assert rollout.state == admin_pb2.Rollout.STATE_PROMOTED, rollout
        assert [a.percent for a in rollout.analyses] == [50, 100]
        # The last run came before the last step, and passed.
        assert (rollout.smoke.percent, rollout.smoke.examples) == (100, 1)
        assert not rollout.smoke.failures


def test_a_bad_example_is_refused_by_the_admin_api_too(triton, tmp_path):
    config = rollout_config(triton, variant("canary", weight=0))
    with GatewayProcess(config, admin=True) as gw:
        bad = yaml.safe_load(gw.config_path.read_text())
        bad["routes"][0]["variants"][1]["smoke"] = [{"name": "e", "inputs": [{**X, "data": [1]}]}]
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        run = subprocess.run(
            [TENSORGATE, "admin", "--address", gw.admin_address, "apply", "-f", str(path)],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "TENSORGATE_ADMIN_TOKEN": ADMIN_TOKEN},
        )  # fmt: skip
        assert run.returncode == 1
        assert "routes[0].variants[1].smoke[0].inputs[0].data: 1 values for shape" in run.stderr


# --- the Kubernetes Job (a kustomize Component of deploy/kubernetes) -------------------------


def render(tmp_path, base: pathlib.Path) -> list[dict]:
    overlay = tmp_path / f"overlay-{base.name}"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(base, overlay)],
                "components": [os.path.relpath(COMPONENT, overlay)],
            }
        )
    )
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / f"{base.name}.yaml"
    rendered.write_text(result.stdout)
    valid = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(rendered)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = valid.stdout + valid.stderr
    assert valid.returncode == 0 and "WARN" not in output and "ERROR" not in output, output
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert output.count(" passed for resource ") == len(objects), output
    return objects


def job_of(objects: list[dict]) -> dict:
    (job,) = [o for o in objects if o["kind"] == "Job"]
    return job


@pytest.mark.parametrize("base", [K8S, REPO_ROOT / "deploy" / "kubernetes-envoy"], ids=["base", "envoy"])  # fmt: skip
def test_the_smoke_job_renders_validates_and_uses_the_gateways_config(tmp_path, base):
    objects = render(tmp_path, base)
    job = job_of(objects)
    assert job["metadata"]["namespace"] == "tensorgate"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    gateway = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")  # fmt: skip
    assert container["image"] == gateway["image"]  # the base's image, rewritten alike
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]  # hashed
    assert container["command"] == ["tensorgate"] and container["args"][0] == "smoke"
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "tensorgate")  # fmt: skip
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    target = container["args"][container["args"].index("--target") + 1]
    assert target == f"tensorgate.tensorgate.svc.cluster.local:{grpc_port}"
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [1]


def test_the_smoke_job_passes_against_the_configmap_routes(triton, tmp_path):
    """The Job's own command line and the ConfigMap it mounts, with only the config's path and
    the target made local, against a gateway serving the ConfigMap's routes (its store, admin
    API and Envoy left out: the routes are what the Job reads) in front of a real Triton."""
    objects = render(tmp_path, K8S)
    args = job_of(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    mounted = tmp_path / "gateway.yaml"
    mounted.write_text(configmap["data"]["gateway.yaml"])
    config = yaml.safe_load(mounted.read_text())
    served = {key: config[key] for key in ("backends", "routes", "defaults")}
    for backend in served["backends"]:
        backend["address"] = triton.address
    with GatewayProcess(served) as gw:
        local = {"/etc/tensorgate/config/gateway.yaml": str(mounted),
                 "tensorgate.tensorgate.svc.cluster.local:8001": gw.address}  # fmt: skip
        run = subprocess.run(
            [TENSORGATE, *(local.get(a, a) for a in args)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [" ".join(line.split()) for line in run.stdout.splitlines()]
    assert lines[-1] == "4 passed, 0 failed, 1 skipped", run.stdout
    assert any(line.startswith("SKIP linear/backup one-row") for line in lines), run.stdout
