"""A Triton model repository of BATCHING python-backend models, for tests/test_batching.py.

    write_repository(DIR) -> the datatypes that got an echo model

- echo_<datatype> (one per OIP datatype Triton's python backend serves): max_batch_size 32,
  INPUT0 dims [-1] -> OUTPUT0 = INPUT0. No `dynamic_batching` on purpose: Triton executes each
  request it receives as it is, so ModelStatistics' inference_count / execution_count is the
  batch size the GATEWAY formed.
- fail_fp32: as echo_fp32, but answers an error for the whole (merged) request when any element
  is negative (a failed batch).
- sleep_fp32: as echo_fp32, after sleeping INPUT0[0][0] seconds (a batch still in flight).
- demo_identity (copied from deploy/demo/models): max_batch_size 0, no batch dimension.

BF16: Triton 2.51's python backend has no numpy type for it (`as_numpy` cannot read it), but
carries it through DLPack (`to_dlpack` / `Tensor.from_dlpack`), which echo_bf16 uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.backends.triton import REPO_ROOT

MAX_BATCH_SIZE = 32

# OIP datatype -> Triton config data_type
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}

_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0", data_type: {dtype}, dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0", data_type: {dtype}, dims: [ -1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""

_ECHO = '''"""OUTPUT0 = INPUT0, whatever the batch size."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            if {dlpack}:
                out = pb_utils.Tensor.from_dlpack("OUTPUT0", tensor.to_dlpack())
            else:
                out = pb_utils.Tensor("OUTPUT0", tensor.as_numpy())
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
'''

_FAIL = '''"""OUTPUT0 = INPUT0, or an error for the whole request when any element is negative."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if (x < 0).any():
                error = pb_utils.TritonError(f"negative input in a batch of {x.shape[0]}")
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return responses
'''

_SLEEP = '''"""Sleeps INPUT0[0][0] seconds, then OUTPUT0 = INPUT0."""

import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            time.sleep(float(x.flat[0]))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return responses
'''


def _model(repo: Path, name: str, dtype: str, source: str, max_batch_size: int) -> None:
    directory = repo / name
    (directory / "1").mkdir(parents=True)
    (directory / "config.pbtxt").write_text(
        _CONFIG.format(name=name, dtype=dtype, max_batch_size=max_batch_size)
    )
    (directory / "1" / "model.py").write_text(source)


def write_repository(repo: Path, datatypes=tuple(TRITON_TYPES)) -> list[str]:
    """Writes the models into `repo` (which must exist); returns the echo datatypes written."""
    for datatype in datatypes:
        source = _ECHO.format(dlpack=datatype == "BF16")
        _model(repo, f"echo_{datatype.lower()}", TRITON_TYPES[datatype], source, MAX_BATCH_SIZE)
    _model(repo, "fail_fp32", "TYPE_FP32", _FAIL, MAX_BATCH_SIZE)
    _model(repo, "sleep_fp32", "TYPE_FP32", _SLEEP, MAX_BATCH_SIZE)
    shutil.copytree(
        REPO_ROOT / "deploy" / "demo" / "models" / "demo_identity", repo / "demo_identity"
    )
    return list(datatypes)
