"""A short run of the realistic benchmark (bench/realistic.py, issue 24), and its load generator.

One `python -m bench.realistic --plan smoke` (~1 min): the realistic models start (the Triton MLP
and the TorchServe CNN, built from code with fixed seeds), every path answers correctly (the MLP
against numpy on the same weights, the CNN against torch's own answer; a cached route answers the
repeat from its cache), each path takes a short open-loop leg at a rate every path keeps up with,
and the generator's sent and answered rates are within 5% of the offered rate; the PNG curves,
report.md and results.json are written.

The open-loop generator alone (bench/openloop.py) against an in-process sender: exact arrival
counts, bursts, the Zipf draw, latency from the scheduled time (a stalled event loop counts), and
errors ranking as infinitely slow.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from bench.openloop import (
    OK,
    Popularity,
    arrival_times,
    model_name_field,
    open_loop,
    percentile_ms,
)
from tests.backends.triton import REPO_ROOT

SMOKE_RATE = 40.0
MLP_PATHS = {"direct", "envoy", "python", "python-cache", "python-batch", "python-both"}
CNN_PATHS = MLP_PATHS - {"envoy"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic")
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "bench.realistic", "--plan", "smoke",
         "--duration", "2", "--warmup", "0.5", "--smoke-rates", str(SMOKE_RATE),
         "--no-calibration", "--max-other", "1000", "--timeout", "5", "--output-dir", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    results = json.loads((out / "results.json").read_text())
    return out, results, run.stdout, time.monotonic() - started


def test_every_path_of_both_models_answers_correctly(smoke_run):
    _, results, stdout, _ = smoke_run
    answered = {(a["model"], a["path"]) for a in results["answers"] if a["ok"]}
    expected = {("mlp", p) for p in MLP_PATHS} | {("cnn", p) for p in CNN_PATHS}
    assert answered == expected
    for model, path in expected:
        assert f"answer OK from {model}/{path}" in stdout
    cached = [a["note"] for a in results["answers"] if a["path"] in ("python-cache", "python-both")]
    assert len(cached) == 4
    assert all("repeat answered from the cache" in note for note in cached)


def test_the_open_loop_hits_its_offered_rate_when_the_target_keeps_up(smoke_run):
    _, results, _, _ = smoke_run
    steps = results["steps"]
    assert {(s["model"], s["path"]) for s in steps} >= {("mlp", p) for p in MLP_PATHS} | {
        ("cnn", p) for p in CNN_PATHS
    }
    assert {s["pattern"] for s in steps} == {"poisson", "onoff"}
    for s in steps:
        where = f"{s['model']}/{s['path']} {s['pattern']}"
        assert s["errors"] == {}, where
        assert s["offered_rps"] == pytest.approx(SMOKE_RATE), where
        assert s["sent_rps"] == pytest.approx(s["offered_rps"], rel=0.05), where
        assert s["ok_rps"] == pytest.approx(s["offered_rps"], rel=0.05), where
        assert s["p50_ms"] <= s["p99_ms"] < math.inf, where
        # Every process's CPU was sampled for the step.
        assert {"loadgen", "gateway", "triton", "torchserve"} <= set(s["cpu_us_per_call"]), where
    batched = [s for s in steps if s["model"] == "mlp" and s["path"] == "python-batch"]
    assert batched[0]["gateway"]["batches"] > 0
    assert batched[0]["triton"]["executions"] > 0
    cached = [s for s in steps if s["model"] == "mlp" and s["path"] == "python-cache"]
    assert cached[0]["gateway"]["cache_hits"] > 0


def test_the_plots_and_report_are_written(smoke_run):
    out, results, _, seconds = smoke_run
    names = {p.name for p in out.glob("*.png")}
    expected = {"realistic-mlp-poisson-zipf.png", "realistic-cnn-poisson-zipf.png"}
    assert expected | {"realistic-mlp-onoff-uniform.png"} <= names
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
    assert sorted(results["plots"]) == sorted(str(out / n) for n in names)
    report = (out / "report.md").read_text()
    assert "#### `mlp`" in report and "#### `cnn`" in report
    print(f"smoke run took {seconds:.0f} s")


# ----------------------------------------------------------------------------- the generator


def test_arrivals_offer_exactly_the_rate_and_bursts_keep_the_mean():
    rng = np.random.default_rng(3)
    poisson = arrival_times("poisson", 250, 4.0, rng)
    assert len(poisson) == 1000 and np.all(np.diff(poisson) >= 0)
    assert 0 <= poisson[0] and poisson[-1] < 4.0
    bursts = arrival_times("onoff", 250, 4.0, rng)
    assert len(bursts) == 1000
    # All in the first half of every second, at twice the rate.
    assert np.all(bursts % 1.0 < 0.5)
    with pytest.raises(ValueError):
        arrival_times("steady", 1, 1, rng)


def test_zipf_concentrates_on_few_requests_and_uniform_does_not():
    rng = np.random.default_rng(4)
    zipf = Popularity("zipf", 10_000, s=1.1, seed=1)
    draws = zipf.draw(200_000, rng)
    counts = np.sort(np.bincount(draws, minlength=10_000))[::-1]
    assert counts[:1000].sum() / len(draws) == pytest.approx(zipf.top_share(1000), abs=0.01)
    assert 0.8 < zipf.top_share(1000) < 0.9
    uniform = Popularity("uniform", 10_000)
    assert uniform.top_share(1000) == pytest.approx(0.1)
    assert len(np.unique(uniform.draw(20_000, rng))) > 8000


def test_latency_runs_from_the_scheduled_time_and_errors_rank_last():
    async def run():
        calls = 0

        async def send(key: int) -> str:
            nonlocal calls
            calls += 1
            if calls == 10:
                time.sleep(0.2)  # noqa: ASYNC251 -- the generator's loop stalls: calls due meanwhile go late
            await asyncio.sleep(0.001)
            return "UNAVAILABLE" if key == 7 else OK

        times = np.arange(100) * 0.01  # 100 calls/s for 1 s
        keys = np.arange(100)
        return await open_loop(send, times, keys, duration=1.0)

    result = asyncio.run(run())
    assert result.scheduled == 100 and result.ok == 99 and result.errors == {"UNAVAILABLE": 1}
    # Calls scheduled during the 0.2 s stall were sent late, and their latency says so.
    assert max(result.latencies_s) > 0.15
    assert result.percentile_ms(50) < 20
    assert percentile_ms([0.001, 0.002], 99, total=3) == math.inf
    assert percentile_ms([0.001, 0.002], 50, total=3) == pytest.approx(2.0)


def test_the_model_name_prefix_makes_a_whole_request():
    from tritonclient.grpc import service_pb2 as oip

    body = oip.ModelInferRequest()
    tensor = body.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([1, 2])
    body.raw_input_contents.append(b"\0" * 8)
    whole = oip.ModelInferRequest.FromString(
        model_name_field("mlp-cache", "1") + body.SerializeToString()
    )
    assert (whole.model_name, whole.model_version) == ("mlp-cache", "1")
    assert whole.inputs[0].name == "INPUT0" and whole.raw_input_contents[0] == b"\0" * 8
