"""Writes the TensorFlow SavedModels served by the TF Serving stand-in (tests/backends/tfserving.py).

Run with the stand-in venv's python (``scripts/backend-venv tfserving``), NOT the gateway's venv:

    $(scripts/backend-venv tfserving)/bin/python tests/backends/make_tf_models.py OUT_DIR

Layout written (TF Serving's ``<model_base_path>/<version>/`` convention):

    OUT_DIR/linear/1/  y = x @ W1 + b1   serving_default: x float32 [-1,4] -> y float32 [-1,3]
    OUT_DIR/linear/2/  y = x @ W2 + b2   (same weights as deploy/demo/models/demo_linear)
    OUT_DIR/echo/1/    echo_<dtype>: x <dtype> (any shape) -> y = tf.identity(x), one per dtype

The harness keys its cache directory by a hash of THIS file: change it and models are rebuilt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

# Integer-valued on purpose: outputs are exact in float32, so tests compare with ==.
LINEAR_WEIGHTS: dict[int, tuple[list[list[float]], list[float]]] = {
    1: ([[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]], [1, 0, -1]),
    2: ([[0, 1, 1], [1, 0, 2], [-1, 3, 0], [2, -2, 1]], [10, 20, 30]),
}

# Signature name suffix -> TF dtype. Names follow TF's DataTypeString ("float", "half", ...).
ECHO_DTYPES: dict[str, tf.dtypes.DType] = {
    "bool": tf.bool,
    "uint8": tf.uint8,
    "uint16": tf.uint16,
    "uint32": tf.uint32,
    "uint64": tf.uint64,
    "int8": tf.int8,
    "int16": tf.int16,
    "int32": tf.int32,
    "int64": tf.int64,
    "half": tf.float16,
    "bfloat16": tf.bfloat16,
    "float": tf.float32,
    "double": tf.float64,
    "string": tf.string,
}


class Linear(tf.Module):
    def __init__(self, weights: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        self.w = tf.Variable(weights, dtype=tf.float32, name="w")
        self.b = tf.Variable(bias, dtype=tf.float32, name="b")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": tf.matmul(x, self.w) + self.b}


def _echo_function(dtype: tf.dtypes.DType) -> tf.types.experimental.ConcreteFunction:
    @tf.function(input_signature=[tf.TensorSpec(None, dtype, name="x")])  # unknown rank
    def echo(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": tf.identity(x)}

    return echo.get_concrete_function()


def _save(module: tf.Module, signatures: dict, target: Path) -> None:
    # Written next to the target and renamed: a crash never leaves a half-written version dir.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tf.saved_model.save(module, str(tmp / "m"), signatures=signatures)
        shutil.rmtree(target, ignore_errors=True)
        (tmp / "m").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(out: Path) -> list[str]:
    """Writes all models under ``out``; returns the echo dtypes that had to be skipped."""
    for version, (weights, bias) in LINEAR_WEIGHTS.items():
        model = Linear(weights, bias)
        _save(model, {"serving_default": model.serve}, out / "linear" / str(version))

    skipped: list[str] = []
    echo = tf.Module()
    signatures = {}
    for name, dtype in ECHO_DTYPES.items():
        try:
            fn = _echo_function(dtype)
            sample = tf.zeros([2], dtype) if dtype != tf.string else tf.constant(["a", "b"])
            fn(x=sample)  # proves the CPU kernel exists before the dtype is advertised
        except Exception as e:
            print(f"skipping echo_{name}: {e}", file=sys.stderr)
            skipped.append(name)
            continue
        signatures[f"echo_{name}"] = fn
    _save(echo, signatures, out / "echo" / "1")
    return skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write <model>/<version>/ into")
    args = parser.parse_args(argv)
    skipped = build(args.out.resolve())
    print(
        f"models written to {args.out}" + (f"; skipped echo dtypes: {skipped}" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
