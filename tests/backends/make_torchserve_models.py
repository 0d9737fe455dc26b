"""Builds the TorchServe test models: TorchScript modules packed as .mar archives.

Run with the TorchServe venv's python (it needs torch and torch-model-archiver):

    $(scripts/backend-venv torchserve)/bin/python tests/backends/make_torchserve_models.py OUT

Writes OUT/<name>-<version>.mar and OUT/models.json listing them. torch-model-archiver always
names its output <name>.mar, so each version is exported to its own directory first and then
moved: TorchServe only finds archives at the TOP level of its model store (a register url like
"linear/1/linear.mar" is 404, and a file:// url is copied into the store as <name>.mar).

- linear "1", "2": y = x @ W + b, input "x" FP32 [-1, 4], output "y" FP32 [-1, 3]; the same
  weights as the Triton demo model deploy/demo/models/demo_linear (cross-backend conformance):
  x = [1, 2, 3, 4] -> version 1: [4, 8, 12], version 2: [17, 22, 39]. Float32 weights hold small
  integers exactly, so integer-valued inputs give exact results.
- echo "1": y = x (identity) for any datatype and shape: datatype round trips.
- linear_instances "1": linear v1 behind deploy/torchserve/instances_handler.py, which speaks
  {"instances": [[...]]} -> [[...]] (the gateway's BODY_CONTRACT_INSTANCES_JSON).

Every archive uses deploy/torchserve/oip_handler.py (Open Inference Protocol JSON) and carries a
signature.json naming the model's inputs (forward argument order) and outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLER = REPO_ROOT / "deploy" / "torchserve" / "oip_handler.py"
INSTANCES_HANDLER = REPO_ROOT / "deploy" / "torchserve" / "instances_handler.py"

LINEAR_WEIGHTS = {
    "1": ([[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]], [1, 0, -1]),
    "2": ([[0, 1, 1], [1, 0, 2], [-1, 3, 0], [2, -2, 1]], [10, 20, 30]),
}


class Linear(torch.nn.Module):
    def __init__(self, w: list[list[int]], b: list[int]) -> None:
        super().__init__()
        self.register_buffer("w", torch.tensor(w, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(b, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class Echo(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _models() -> list[tuple[str, str, torch.nn.Module, dict[str, Any]]]:
    linear_sig = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    echo_sig = {
        "inputs": [{"name": "x", "datatype": "ANY", "shape": None}],
        "outputs": [{"name": "y", "datatype": "ANY", "shape": None}],
    }
    models: list[tuple[str, str, torch.nn.Module, dict[str, Any]]] = [
        ("linear", version, Linear(w, b), linear_sig) for version, (w, b) in LINEAR_WEIGHTS.items()
    ]
    models.append(("echo", "1", Echo(), echo_sig))
    # linear v1 behind the "instances" body contract (deploy/torchserve/instances_handler.py)
    models.append(("linear_instances", "1", Linear(*LINEAR_WEIGHTS["1"]), linear_sig))
    return models


def _archiver() -> str:
    exe = Path(sys.executable).parent / "torch-model-archiver"
    found = str(exe) if exe.exists() else shutil.which("torch-model-archiver")
    if not found:
        sys.exit("torch-model-archiver not found: run this with the TorchServe venv's python")
    return found


def build(out: Path, handler: Path = HANDLER) -> list[dict[str, str]]:
    """Builds every model into ``out``; returns the models.json entries."""
    out.mkdir(parents=True, exist_ok=True)
    archiver = _archiver()
    entries = []
    for name, version, module, signature in _models():
        scripted = torch.jit.script(module.eval())
        mar = out / f"{name}-{version}.mar"
        with tempfile.TemporaryDirectory(prefix=f"ts-{name}-{version}-") as tmp:
            pt = Path(tmp) / "model.pt"
            scripted.save(str(pt))
            sig = Path(tmp) / "signature.json"
            sig.write_text(json.dumps(signature, indent=2) + "\n")
            subprocess.run(
                [
                    archiver,
                    f"--model-name={name}",
                    f"--version={version}",
                    f"--serialized-file={pt}",
                    f"--handler={INSTANCES_HANDLER if name.endswith('_instances') else handler}",
                    f"--extra-files={sig}",
                    f"--export-path={tmp}",
                    "--force",
                ],
                check=True,
            )
            written = Path(tmp) / f"{name}.mar"
            if not written.is_file():
                raise RuntimeError(f"torch-model-archiver did not write {written}")
            shutil.move(written, mar)
        entries.append({"name": name, "version": version, "url": mar.name})
    (out / "models.json").write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path, help="output directory (the TorchServe model store)")
    parser.add_argument("--handler", type=Path, default=HANDLER, help="handler .py to pack")
    args = parser.parse_args(argv)
    for entry in build(args.out, args.handler):
        print(f"{entry['name']} {entry['version']}: {args.out / entry['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
