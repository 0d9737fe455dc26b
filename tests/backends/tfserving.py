"""Runs the TensorFlow Serving STAND-IN (tests/backends/tfserving_standin.py) for the test suite.

There is no real tensorflow_model_server binary on these machines; the stand-in speaks the same
gRPC API (official tensorflow-serving-api stubs, real SavedModels executed by TensorFlow, TF
Serving's status codes and messages). See docs/backends-tfserving-standin.md.

The server runs from its own venv (built by ``scripts/backend-venv tfserving``: TensorFlow, ~1.5 GB,
~90 s once); the test process only needs grpcio. Models come from tests/backends/make_tf_models.py,
built once into ~/.cache/tensorgate/tf-models-<hash of that script>/.

    with TFServingStandIn() as tfs:            # linear (v1, v2; labels stable=1, canary=2), echo
        channel = grpc.insecure_channel(tfs.address)

Checks with the official stubs run INSIDE the stand-in venv (the gateway venv has no TensorFlow):

    out = tfs.run_check("resp = prediction.Predict(...); print(...)")   # see CHECK_PRELUDE

Command line (foreground until Ctrl-C / SIGTERM):
    python -m tests.backends.tfserving [--port N] [--model-base DIR] [--version-labels m:l=v,...]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from tests.backends.process import BackendProcess, backend_venv, free_port, run_in_foreground

STANDIN_SCRIPT = Path(__file__).resolve().with_name("tfserving_standin.py")
MODELS_SCRIPT = Path(__file__).resolve().with_name("make_tf_models.py")
CACHE_ROOT = Path.home() / ".cache" / "tensorgate"
# Labels the default model set is served with (TF Serving: model_config version_labels).
DEFAULT_VERSION_LABELS: dict[str, dict[str, int]] = {"linear": {"stable": 1, "canary": 2}}
_GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
_STATE_AVAILABLE = 30  # tensorflow.serving.ModelVersionStatus.State.AVAILABLE

# Prepended to run_check() code. Imports the OFFICIAL tensorflow-serving-api stubs WITHOUT running
# tensorflow/__init__.py (0.2 s instead of ~7 s): the generated *_pb2 modules only need the package
# directory. Do not `import tensorflow` in check code (it would find this empty shell).
CHECK_PRELUDE = '''
import importlib.util as _ilu, json, os, sys, types as _types
_spec = _ilu.find_spec("tensorflow")
_shell = _types.ModuleType("tensorflow")
_shell.__path__ = list(_spec.submodule_search_locations)
_shell.__spec__ = _spec
sys.modules.setdefault("tensorflow", _shell)
import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
    prediction_service_pb2_grpc,
)
ADDRESS = os.environ["TFSERVING_ADDRESS"]
channel = grpc.insecure_channel(ADDRESS)
prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
model_service = model_service_pb2_grpc.ModelServiceStub(channel)

def tensor(array, dtype):
    """TensorProto from a numpy array, as tensor_content bytes (DT_STRING: string_val)."""
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(array.reshape(-1).tolist())
    else:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto

def rpc_error(call):
    """Runs call(); returns [code name, details] of the RpcError it raises, or None."""
    try:
        call()
    except grpc.RpcError as e:
        return [e.code().name, e.details()]
    return None

def emit(value):
    print(json.dumps(value), flush=True)
'''


def tfserving_venv() -> Path:
    """Path of the stand-in's venv; builds it on first use (~90 s, 1.5 GB)."""
    return backend_venv("tfserving")


def standin_python() -> Path:
    return tfserving_venv() / "bin" / "python"


def _clean_env(extra: Mapping[str, str] = ()) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(var, None)  # nothing from the gateway's venv may leak into the TF venv
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@functools.cache
def tf_models_dir() -> Path:
    """The default model set (linear v1/v2, echo v1), built once per version of make_tf_models.py."""
    digest = hashlib.sha256(MODELS_SCRIPT.read_bytes()).hexdigest()[:12]
    target = CACHE_ROOT / f"tf-models-{digest}"
    if (target / ".complete").is_file():
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tf-models-{digest}-", dir=CACHE_ROOT))
    try:
        subprocess.run(
            [str(standin_python()), str(MODELS_SCRIPT), str(staging)],
            check=True,
            stdout=subprocess.DEVNULL,
            env=_clean_env(),
        )
        (staging / ".complete").touch()
        if (target / ".complete").is_file():  # another process finished first: use its copy
            return target
        shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover (never in use)
        try:
            staging.rename(target)
        except OSError:
            if not (target / ".complete").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _get_model_status_request(model: str) -> bytes:
    """GetModelStatusRequest{model_spec{name: model}} encoded by hand (no TF Serving protos in
    the gateway venv): field 1 (ModelSpec, length-delimited) holding field 1 (name, string)."""
    name = model.encode()
    spec = b"\x0a" + _varint(len(name)) + name
    return b"\x0a" + _varint(len(spec)) + spec


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < len(buf):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            out.append((number, varint()))
        elif wire_type == 2:
            length = varint()
            out.append((number, buf[pos : pos + length]))
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
    return out


def available_versions(response: bytes) -> list[int]:
    """Versions in state AVAILABLE from a serialized GetModelStatusResponse."""
    versions = []
    for number, status in _fields(response):
        if number == 1 and isinstance(status, bytes):  # repeated ModelVersionStatus
            values = dict(f for f in _fields(status) if isinstance(f[1], int))
            if values.get(2) == _STATE_AVAILABLE:  # field 2: state; field 1: version
                versions.append(int(values.get(1, 0)))
    return versions


def _labels_arg(labels: Mapping[str, Mapping[str, int]]) -> str:
    return ",".join(
        f"{model}:{label}={version}"
        for model, by_label in labels.items()
        for label, version in by_label.items()
    )


class TFServingStandIn(BackendProcess):
    """The TF Serving stand-in serving ``model_base`` over gRPC on 127.0.0.1 only.

    ``model_base`` defaults to the models of make_tf_models.py (built once, cached); with the
    default models, ``version_labels`` defaults to DEFAULT_VERSION_LABELS. ``ready_model`` is the
    model whose GetModelStatus must answer AVAILABLE before start() returns.
    """

    name = "tfserving stand-in"

    def __init__(
        self,
        model_base: str | os.PathLike[str] | None = None,
        grpc_port: int | None = None,
        version_labels: Mapping[str, Mapping[str, int]] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        ready_model: str = "linear",
    ) -> None:
        self._model_base = Path(model_base).resolve() if model_base is not None else None
        if self._model_base is not None and not self._model_base.is_dir():
            raise FileNotFoundError(f"model base {self._model_base} does not exist")
        if version_labels is None:
            version_labels = DEFAULT_VERSION_LABELS if model_base is None else {}
        self.version_labels = {m: dict(labels) for m, labels in version_labels.items()}
        self.grpc_port = grpc_port if grpc_port is not None else free_port()
        self.extra_args = list(extra_args)
        self.ready_model = ready_model
        super().__init__("tfserving-standin-", "tfserving-standin.log", startup_timeout)

    @property
    def model_base(self) -> Path:
        """The served directory (building the default models on first access)."""
        if self._model_base is None:
            self._model_base = tf_models_dir()
        return self._model_base

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd = [
            str(standin_python()),
            str(STANDIN_SCRIPT),
            f"--port={self.grpc_port}",
            f"--model-base={self.model_base}",
            *(
                [f"--version-labels={_labels_arg(self.version_labels)}"]
                if self.version_labels
                else []
            ),
            *self.extra_args,
        ]
        return cmd, _clean_env()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        request = _get_model_status_request(self.ready_model)
        with grpc.insecure_channel(self.address) as channel:
            status = channel.unary_unary(_GET_MODEL_STATUS)  # raw bytes in, raw bytes out

            def ready() -> bool:
                try:
                    return bool(available_versions(status(request, timeout=1.0)))
                except grpc.RpcError:
                    return False  # the port opens only after every model has loaded (~5-10 s)

            self._poll(ready, deadline, "tfserving stand-in not ready")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``.

        Like tensorflow_model_server, the stand-in dies on SIGTERM at once (in-flight calls fail
        with UNAVAILABLE); pass ``extra_args=["--on-sigterm=drain"]`` for a graceful 5 s drain.
        """
        super().stop(timeout)

    def run_check(self, code: str, timeout: float = 60.0) -> str:
        """Runs ``CHECK_PRELUDE + code`` with the stand-in venv's python; returns its stdout.

        The prelude provides ``prediction`` / ``model_service`` stubs bound to this server, the
        official *_pb2 modules, numpy as ``np``, ``tensor(array, dtype)``, ``rpc_error(call)``
        and ``emit(value)`` (prints JSON). Raises CalledProcessError (with stderr) on failure.
        """
        result = subprocess.run(
            [str(standin_python()), "-c", CHECK_PRELUDE + "\n" + code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env({"TFSERVING_ADDRESS": self.address}),
            cwd=self._workdir,
        )
        if result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, "run_check", result.stdout, result.stderr
            )
        return result.stdout


def _parse_labels(text: str) -> dict[str, dict[str, int]]:
    labels: dict[str, dict[str, int]] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        model, rest = item.split(":", 1)
        label, version = rest.split("=", 1)
        labels.setdefault(model, {})[label] = int(version)
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the TF Serving stand-in in the foreground.")
    parser.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    parser.add_argument(
        "--model-base", default=None, help="DIR/<model>/<version>/ (default: built)"
    )
    parser.add_argument(
        "--version-labels",
        default=None,
        help="model:label=version,... (default with built models: "
        + _labels_arg(DEFAULT_VERSION_LABELS)
        + ")",
    )
    args = parser.parse_args(argv)

    labels = _parse_labels(args.version_labels) if args.version_labels is not None else None
    server = TFServingStandIn(args.model_base, grpc_port=args.port, version_labels=labels)

    def ready(startup_seconds: float) -> None:
        print(f"tfserving stand-in ready on {server.address}", flush=True)
        print(
            f"models: {server.model_base}\nlog: {server.log_path}\n"
            f"startup: {server.startup_seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    return run_in_foreground(server, ready)


if __name__ == "__main__":
    sys.exit(main())
