"""Realistic models for bench/realistic.py and tests/test_bench_realistic.py, built from code with
a fixed seed at start-up (nothing is downloaded):

- `mlp` (Triton, python backend): FP32 512 -> 2048 -> ReLU -> 2048 -> ReLU -> 10, numpy,
  `max_batch_size` 64 (a batch dimension), one instance, NO `dynamic_batching`: Triton executes
  each request it receives as it is, so its inferences per execution are the rows of the requests
  (and of the batches the gateway builds). Weights (He-initialised, seed MLP_SEED) are written
  beside model.py as weights.npz; `mlp_reference` computes the same function here for checks.
  `RealisticTriton` runs it with one OpenBLAS thread (`OPENBLAS_NUM_THREADS=1`): one instance is
  one core of compute, the other core is left to the gateway and the load generator (with the
  default 2 threads OpenBLAS would spin on both cores of this 2-core machine).
- `cnn` (TorchServe, TorchScript): x FP32 [-1, 1, 28, 28] of pixel values 0..255 -> /255 ->
  conv 3x3 32 -> ReLU -> maxpool 2 -> conv 3x3 64 -> ReLU -> maxpool 2 -> linear 3136 -> 128 ->
  ReLU -> linear 128 -> 10 (y FP32 [-1, 10]). Built by tests/backends/make_realistic_models.py
  in the TorchServe venv into ~/.cache/tensorgate/ts-realistic-<hash>/ (cnn-1.mar, with
  deploy/torchserve/oip_handler.py) together with probe.json: three probe images and torch's own
  answer for them. `RealisticTorchServe` serves it with one worker, server-side batching off.

`compute_times()` times each model's forward pass in its server's own venv (same numpy / torch,
one thread), by batch size: the per-call compute cost on this machine.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tests.backends.process import free_port
from tests.backends.torchserve import (
    CACHE_ROOT,
    HANDLER,
    TorchServe,
    _clean_env,
    torchserve_venv,
)
from tests.backends.triton import TritonServer, triton_venv

MLP_MODEL = "mlp"
MLP_SEED = 20261207
MLP_LAYERS = (512, 2048, 2048, 10)
MLP_MAX_BATCH = 64
MLP_INPUT, MLP_OUTPUT = "INPUT0", "OUTPUT0"

CNN_MODEL = "cnn"
CNN_SHAPE = (1, 28, 28)  # per row: channels, height, width; pixel values 0..255
CNN_CLASSES = 10
CNN_MAX_BATCH = 32  # the gateway's route schema (TorchServe itself has no limit)
CNN_INPUT, CNN_OUTPUT = "x", "y"
CNN_SCHEMA = {
    "inputs": [{"name": CNN_INPUT, "datatype": "FP32", "shape": [-1, *CNN_SHAPE]}],
    "outputs": [{"name": CNN_OUTPUT, "datatype": "FP32", "shape": [-1, CNN_CLASSES]}],
}

BUILDER = Path(__file__).resolve().parent / "make_realistic_models.py"

# The forward pass, once: pasted into the Triton model and into the timing script.
MLP_FORWARD = """
def forward(w, x):
    h = x @ w["w1"] + w["b1"]
    np.maximum(h, 0, out=h)
    h = h @ w["w2"] + w["b2"]
    np.maximum(h, 0, out=h)
    return (h @ w["w3"] + w["b3"]).astype(np.float32, copy=False)
"""

_MLP_CONFIG = f"""name: "{MLP_MODEL}"
backend: "python"
max_batch_size: {MLP_MAX_BATCH}
input [ {{ name: "{MLP_INPUT}", data_type: TYPE_FP32, dims: [ {MLP_LAYERS[0]} ] }} ]
output [ {{ name: "{MLP_OUTPUT}", data_type: TYPE_FP32, dims: [ {MLP_LAYERS[-1]} ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""

_MLP_MODEL_PY = f'''"""mlp: FP32 {" -> ".join(map(str, MLP_LAYERS))} with ReLU, weights from weights.npz
(tests/backends/realistic_models.py, seed {MLP_SEED}). Every request runs as it came: its own
rows, no dynamic batching."""

import os

import numpy as np
import triton_python_backend_utils as pb_utils
{MLP_FORWARD}

class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "weights.npz")
        with np.load(path) as data:
            self.w = {{k: np.ascontiguousarray(data[k]) for k in data.files}}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "{MLP_INPUT}").as_numpy()
            y = forward(self.w, x)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("{MLP_OUTPUT}", y)]))
        return responses
'''


# ----------------------------------------------------------------------------- MLP (Triton)


@functools.cache
def mlp_weights() -> dict[str, np.ndarray]:
    """He-initialised FP32 weights and small biases, from MLP_SEED."""
    rng = np.random.default_rng(MLP_SEED)
    weights = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(MLP_LAYERS), 1):
        scale = np.float32(np.sqrt(2.0 / fan_in))
        weights[f"w{i}"] = rng.standard_normal((fan_in, fan_out), dtype=np.float32) * scale
        weights[f"b{i}"] = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)
    return weights


def mlp_reference(x: np.ndarray) -> np.ndarray:
    """What `mlp` answers for x [b, 512] (float32; BLAS rounding aside)."""
    namespace: dict = {"np": np}
    exec(MLP_FORWARD, namespace)
    return namespace["forward"](mlp_weights(), np.asarray(x, dtype=np.float32))


def write_mlp_repository(repo: Path) -> Path:
    """Writes repo/mlp/{config.pbtxt, 1/model.py, 1/weights.npz}; returns repo."""
    version = repo / MLP_MODEL / "1"
    version.mkdir(parents=True, exist_ok=True)
    (repo / MLP_MODEL / "config.pbtxt").write_text(_MLP_CONFIG)
    (version / "model.py").write_text(_MLP_MODEL_PY)
    np.savez(version / "weights.npz", **mlp_weights())
    return repo


class RealisticTriton(TritonServer):
    """Triton on a repository holding `mlp`, one OpenBLAS thread, Prometheus metrics on a
    loopback port of its own (`metrics_url`: nv_inference_count / nv_inference_exec_count)."""

    def __init__(self, model_repository: str | os.PathLike[str], **kwargs) -> None:
        self.metrics_port = free_port()
        extra = [
            "--allow-metrics=true",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
        ]
        super().__init__(model_repository, extra_args=extra, **kwargs)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super()._command()
        # The harness's defaults come first; a later flag of the same name wins.
        cmd = [c for c in cmd if c != "--allow-metrics=false"]
        env["OPENBLAS_NUM_THREADS"] = "1"
        return cmd, env


# ----------------------------------------------------------------------------- CNN (TorchServe)


def _store_hash() -> str:
    digest = hashlib.sha256()
    for path in (BUILDER, HANDLER, Path(__file__).parent / "make_torchserve_models.py"):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def cnn_model_store() -> Path:
    """Directory holding cnn-1.mar and probe.json; built once per builder/handler hash."""
    store = CACHE_ROOT / f"ts-realistic-{_store_hash()}"
    if (store / ".complete").is_file():
        return store
    venv = torchserve_venv()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".ts-realistic.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (store / ".complete").is_file():
            return store
        build = Path(tempfile.mkdtemp(prefix=f"{store.name}.build-", dir=CACHE_ROOT))
        try:
            subprocess.run(
                [str(venv / "bin" / "python"), str(BUILDER), "build", str(build)],
                check=True,
                stdout=subprocess.DEVNULL,
                env=_clean_env(venv),
            )
            (build / ".complete").touch()
            shutil.rmtree(store, ignore_errors=True)
            build.rename(store)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return store


def cnn_probe() -> tuple[np.ndarray, np.ndarray]:
    """(images [3, 1, 28, 28] FP32 pixel values, torch's answer [3, 10]) from probe.json."""
    probe = json.loads((cnn_model_store() / "probe.json").read_text())
    return (
        np.asarray(probe["inputs"], dtype=np.float32).reshape(-1, *CNN_SHAPE),
        np.asarray(probe["outputs"], dtype=np.float32),
    )


class RealisticTorchServe(TorchServe):
    """TorchServe serving `cnn` v1 only, one worker, server-side batching off."""

    def __init__(self, **kwargs) -> None:
        super().__init__(models=[(CNN_MODEL, "1")], batch_size=1, workers=1, **kwargs)

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super()._command()
        store = cnn_model_store()
        self.model_store = store
        config = self._workdir / "config.properties"
        text = re.sub(r"(?m)^model_store=.*$", f"model_store={store}", config.read_text())
        config.write_text(text)
        cmd[cmd.index("-s") + 1] = str(store)
        return cmd, env


# ----------------------------------------------------------------------------- compute time


_MLP_TIMER = (
    "import json, sys, time\nimport numpy as np\n"
    + MLP_FORWARD
    + """
with np.load(sys.argv[1]) as data:
    w = {k: np.ascontiguousarray(data[k]) for k in data.files}
rng = np.random.default_rng(0)
out = {}
for b in map(int, sys.argv[2].split(",")):
    x = rng.standard_normal((b, 512), dtype=np.float32)
    for _ in range(5):
        forward(w, x)
    times = []
    for _ in range(int(sys.argv[3])):
        t = time.perf_counter(); forward(w, x); times.append(time.perf_counter() - t)
    times.sort()
    out[b] = {"median_ms": round(1e3 * times[len(times) // 2], 3), "min_ms": round(1e3 * times[0], 3)}
print(json.dumps(out))
"""
)


def compute_times(
    repo: Path, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), repeats: int = 40
) -> dict[str, dict]:
    """Forward-pass time per call by batch size, each model in its server's venv on one thread:
    {"mlp": {b: {median_ms, min_ms}}, "cnn": {...}}."""
    sizes = ",".join(map(str, batch_sizes))
    weights = repo / MLP_MODEL / "1" / "weights.npz"
    venv = triton_venv()
    env = {**_clean_env(venv), "OPENBLAS_NUM_THREADS": "1"}
    mlp = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _MLP_TIMER, str(weights), sizes, str(repeats)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    ts = torchserve_venv()
    cnn = subprocess.run(
        [
            str(ts / "bin" / "python"),
            str(BUILDER),
            "time",
            str(cnn_model_store()),
            sizes,
            str(repeats),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**_clean_env(ts), "OMP_NUM_THREADS": "1"},
    )
    return {"mlp": json.loads(mlp.stdout), "cnn": json.loads(cnn.stdout.strip().splitlines()[-1])}
