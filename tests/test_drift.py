"""Drift detection through a running gateway (`tensorgate serve`) and a real Triton.

Route `linear` answers with demo_linear version 1 and mirrors every call to version 2 (a
shadow whose predictions differ). The drift policy watches input column 0 and the output: the
reference is the first 400 sampled calls, windows hold 400 values. What an operator relies on:
the same input distribution stays under the usual PSI alarm (0.2), a shifted one crosses it
(and the KS statistic with it), the shadow's predictions drift from the primary's, and a
reference written by `tensorgate drift baseline` is used instead of captured traffic.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from google.protobuf import json_format

from gateway.dataplane.layers.drift import monitor as drift
from tests.builders import oip_stub, triton_backend, variant
from tests.gateway_process import TENSORGATE, GatewayProcess
from tests.loadgen import metric, scrape
from tests.oip import linear_request

WINDOW = 400
THRESHOLD = 0.2  # PSI above 0.2: "significant shift", the usual rule of thumb


def _config(triton, **drift_policy) -> dict:
    policy = {
        "inputs": [{"tensor": "INPUT0", "columns": [0]}],
        "outputs": ["OUTPUT0"],
        "sample_ratio": 1.0,
        "window": WINDOW,
        "reference_size": WINDOW,
        **drift_policy,
    }
    return {
        "backends": [triton_backend(triton.address)],
        "routes": [
            {
                "model": "linear",
                "variants": [variant("stable"), variant("shadow", backend_version="2", weight=0)],
                "policy": {"shadow": {"variant": "shadow", "fraction": 1.0}, "drift": policy},
            }
        ],
    }


def _send(stub, rng, mean: float, calls: int) -> None:
    for _ in range(calls):
        stub.ModelInfer(linear_request(x=list(rng.normal(mean, 1.0, 4))), timeout=10)


def _gauge(gw, name: str, variant: str, feature: str) -> float:
    return metric(scrape(gw.metrics_url), name, model="linear", variant=variant, feature=feature)


def _until_window_full(gw, variant: str, feature: str) -> None:
    deadline = time.monotonic() + 10
    while _gauge(gw, "tensorgate_drift_window_samples", variant, feature) < WINDOW:
        assert time.monotonic() < deadline, "the window never filled"
        time.sleep(0.1)


def test_a_shifted_input_crosses_the_threshold_and_the_same_one_does_not(triton):
    rng = np.random.default_rng(7)
    with GatewayProcess(_config(triton)) as gw, oip_stub(gw.address) as stub:
        _send(stub, rng, 0.0, WINDOW)  # the reference
        _send(stub, rng, 0.0, WINDOW)  # the same distribution again
        _until_window_full(gw, "stable", "input:INPUT0[0]")
        same_psi = _gauge(gw, "tensorgate_drift_psi", "stable", "input:INPUT0[0]")
        same_ks = _gauge(gw, "tensorgate_drift_ks", "stable", "input:INPUT0[0]")
        # the shadow (version 2) answers the same inputs differently from version 1
        shadow_out = _gauge(gw, "tensorgate_drift_psi", "shadow", "output:OUTPUT0")
        primary_out = _gauge(gw, "tensorgate_drift_psi", "stable", "output:OUTPUT0")
        _send(stub, rng, 1.5, WINDOW)  # callers now send shifted inputs
        time.sleep(0.2)
        shifted_psi = _gauge(gw, "tensorgate_drift_psi", "stable", "input:INPUT0[0]")
        shifted_ks = _gauge(gw, "tensorgate_drift_ks", "stable", "input:INPUT0[0]")
    print(f"PSI same {same_psi:.3f} shifted {shifted_psi:.3f}; KS same {same_ks:.3f} "
          f"shifted {shifted_ks:.3f}; output PSI primary {primary_out:.3f} "
          f"shadow {shadow_out:.3f}")  # fmt: skip
    assert same_psi < THRESHOLD and same_ks < 0.2
    assert shifted_psi > THRESHOLD and shifted_ks > 0.4
    assert primary_out < THRESHOLD < shadow_out


def test_a_baseline_file_is_the_reference(triton, tmp_path):
    rng = np.random.default_rng(11)
    sample = tmp_path / "sample.jsonl"
    with sample.open("w") as f:
        for _ in range(300):
            request = linear_request(x=list(rng.normal(3.0, 1.0, 4)))
            f.write(json.dumps(json_format.MessageToDict(request)) + "\n")
    config_path = tmp_path / "gateway.yaml"
    reference = tmp_path / "reference.json"
    inputs_only = {"outputs": [], "inputs": [{"tensor": "INPUT0", "columns": [0]}]}
    import yaml

    config_path.write_text(yaml.safe_dump(_config(triton, **inputs_only)))
    done = subprocess.run(
        [str(TENSORGATE), "drift", "baseline", "-c", str(config_path), "--model", "linear",
         "--sample", str(sample), "-o", str(reference)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "300 requests" in done.stdout
    loaded = drift.load_reference(str(reference))
    assert len(loaded["input:INPUT0[0]"]) == 300
    assert 2.7 < float(np.mean(loaded["input:INPUT0[0]"])) < 3.3
    # the gateway compares with the file from the first call: traffic at mean 0 has drifted
    config = _config(triton, reference_file=str(reference), **inputs_only)
    with GatewayProcess(config) as gw, oip_stub(gw.address) as stub:
        _send(stub, rng, 0.0, WINDOW)
        _until_window_full(gw, "stable", "input:INPUT0[0]")
        assert _gauge(gw, "tensorgate_drift_psi", "stable", "input:INPUT0[0]") > THRESHOLD
        assert (
            metric(scrape(gw.metrics_url), "tensorgate_drift_reference_samples", model="linear",
                   feature="input:INPUT0[0]") == 300
        )  # fmt: skip


def test_bad_drift_policies_are_refused_whole(triton, tmp_path):
    from gateway.controlplane.config import ConfigError, from_dict

    with pytest.raises(ConfigError) as err:
        from_dict(_config(triton, sample_ratio=2.0, bins=1, reference_file=str(tmp_path / "no")))
    text = str(err.value)
    assert "drift.sample_ratio" in text and "drift.bins" in text and "cannot read" in text
    with pytest.raises(ConfigError, match="at most 32"):
        from_dict(_config(triton, inputs=[{"tensor": "INPUT0", "columns": list(range(40))}]))


def test_psi_and_ks_units():
    rng = np.random.default_rng(3)
    reference = np.sort(rng.normal(0, 1, 5000))
    assert drift.psi(reference, rng.normal(0, 1, 5000), 10) < 0.02
    assert drift.psi(reference, rng.normal(1, 1, 5000), 10) > 0.5
    assert drift.ks(reference, rng.normal(0, 1, 5000)) < 0.05
    assert 0.3 < drift.ks(reference, rng.normal(1, 1, 5000)) < 0.5  # Phi(0.5) - Phi(-0.5)
