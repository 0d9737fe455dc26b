"""Builds (and times) the realistic TorchServe model: a small CNN, TorchScript, in a .mar.

Run with the TorchServe venv's python (torch, torch-model-archiver); see realistic_models.py:

    python tests/backends/make_realistic_models.py build OUT
    python tests/backends/make_realistic_models.py time OUT 1,8,32 40

`build` writes OUT/cnn-1.mar (deploy/torchserve/oip_handler.py, signature x FP32 [-1, 1, 28, 28]
-> y FP32 [-1, 10]) and OUT/probe.json (three probe images and the scripted model's answer for
them). Weights come from torch.manual_seed(CNN_SEED). `time` prints, as JSON, the forward pass's
median and minimum milliseconds per call by batch size, on one thread (as the TorchServe worker
runs: OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

# This script's directory is on sys.path when it runs as a script.
from make_torchserve_models import HANDLER, _archiver

CNN_SEED = 20261207
SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
}


class SmallCNN(torch.nn.Module):
    """Pixel values 0..255 -> logits of 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 7 * 7, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def probe_images() -> torch.Tensor:
    """Three fixed 28x28 images with integer pixel values (exact in FP32 and in JSON)."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (3, 1, 28, 28), generator=g).to(torch.float32)


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(CNN_SEED)
    scripted = torch.jit.script(SmallCNN().eval())
    with tempfile.TemporaryDirectory(prefix="ts-cnn-") as tmp:
        pt = Path(tmp) / "model.pt"
        scripted.save(str(pt))
        sig = Path(tmp) / "signature.json"
        sig.write_text(json.dumps(SIGNATURE, indent=2) + "\n")
        subprocess.run(
            [
                _archiver(),
                "--model-name=cnn",
                "--version=1",
                f"--serialized-file={pt}",
                f"--handler={HANDLER}",
                f"--extra-files={sig}",
                f"--export-path={tmp}",
                "--force",
            ],
            check=True,
        )
        shutil.move(Path(tmp) / "cnn.mar", out / "cnn-1.mar")
        images = probe_images()
        with torch.no_grad():
            answer = torch.jit.load(str(pt))(images)
    probe = {"inputs": images.reshape(3, -1).tolist(), "outputs": answer.tolist()}
    (out / "probe.json").write_text(json.dumps(probe) + "\n")


def time_forward(store: Path, sizes: list[int], repeats: int) -> dict:
    torch.set_num_threads(1)
    with zipfile.ZipFile(store / "cnn-1.mar") as mar:
        model = torch.jit.load(io.BytesIO(mar.read("model.pt"))).eval()
    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in sizes:
            x = torch.randint(0, 256, (b, 1, 28, 28), generator=g).to(torch.float32)
            for _ in range(5):
                model(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
            times.sort()
            out[b] = {
                "median_ms": round(1e3 * times[len(times) // 2], 3),
                "min_ms": round(1e3 * times[0], 3),
            }
    return out


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "build":
        build(Path(argv[1]))
        return 0
    if len(argv) == 4 and argv[0] == "time":
        sizes = [int(s) for s in argv[2].split(",")]
        print(json.dumps(time_forward(Path(argv[1]), sizes, int(argv[3]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
