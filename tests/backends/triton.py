"""Runs a REAL NVIDIA Triton server (the tritonserver binary bundled in the nvidia-pytriton wheel).

The server runs from its own venv (built by ``scripts/backend-venv triton``, numpy<2); only the
test process's gRPC client code runs in the gateway's venv. See docs/backends-triton-notes.md.

    with TritonServer("deploy/demo/models") as server:
        client = tritonclient.grpc.InferenceServerClient(server.address)

Command line (foreground until Ctrl-C / SIGTERM):
    python -m tests.backends.triton --models deploy/demo/models [--port N]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.backends.process import (
    REPO_ROOT,
    BackendProcess,
    backend_venv,
    free_port,
    run_in_foreground,
    venv_env,
)

# Tests, bench/ and tests/gateway_process.py import REPO_ROOT and free_port from here.
__all__ = ["REPO_ROOT", "TritonServer", "free_port", "main", "triton_venv"]


def triton_venv() -> Path:
    """Path of the Triton venv; builds it on first use (takes ~1 min)."""
    return backend_venv("triton")


@functools.cache
def _venv_layout(venv: Path) -> tuple[Path, str, str]:
    """(site-packages, "major.minor", libpython directory) of the venv's interpreter."""
    code = (
        "import sys, sysconfig; print(sysconfig.get_paths()['purelib']); "
        "print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
        "print(sysconfig.get_config_var('LIBDIR'))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], check=True, stdout=subprocess.PIPE, text=True
    )
    site, version, libdir = out.stdout.split("\n")[:3]
    return Path(site), version, libdir


_SHM = Path("/dev/shm")
_SHM_PATTERN = "triton_python_backend_shm_region_*"


class TritonServer(BackendProcess):
    """A tritonserver process serving ``model_repository`` over gRPC on 127.0.0.1 only.

    Models are loaded at start (``--load-model=*``) in explicit model-control mode, so tests can
    also load/unload them at run time through the repository API.
    """

    name = "tritonserver"

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        grpc_port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 90.0,
        http: bool | int = False,
    ) -> None:
        """`http`: also serve Triton's KServe v2 HTTP/REST endpoint (on `http_port`; a port
        number to choose it)."""
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.grpc_port = grpc_port if grpc_port is not None else free_port()
        self.extra_args = list(extra_args)
        self.http_port = (free_port() if http is True else http) if http else None
        super().__init__("tritonserver-", "tritonserver.log", startup_timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        if self.http_port is None:
            raise RuntimeError("this TritonServer was started without http=True")
        return f"127.0.0.1:{self.http_port}"

    def start(self):
        # The python backend's shared-memory regions outlive a tritonserver that exits on its
        # exit timeout (a model slow to unload): remove the ones this server made, after it.
        self._shm_before = set(_SHM.glob(_SHM_PATTERN))
        return super().start()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        venv = triton_venv()
        site, py_version, libdir = _venv_layout(venv)
        dist = site / "pytriton" / "tritonserver"
        backends = self._backend_directory(dist, py_version)
        cmd = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--grpc-address=127.0.0.1",  # binds 0.0.0.0 by default
            f"--grpc-port={self.grpc_port}",
            *(
                ("--allow-http=false",)
                if self.http_port is None
                else ("--http-address=127.0.0.1", f"--http-port={self.http_port}")
            ),
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--exit-timeout-secs=5",  # SIGTERM grace for in-flight requests; stop() waits longer
            "--model-control-mode=explicit",
            "--load-model=*",
            *self.extra_args,
        ]
        # The stub's embedded interpreter finds its prefix (and so numpy<2) via `python3` on PATH.
        env = venv_env(venv)
        # Without libpython's directory the python backend stub picks up a mismatched libpython
        # and every model fails with "'_thread.RLock' object has no attribute '_recursion_count'".
        ld_path = [libdir, str(site / "nvidia_pytriton.libs")]
        if env.get("LD_LIBRARY_PATH"):
            ld_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(ld_path)
        return cmd, env

    def _backend_directory(self, dist: Path, py_version: str) -> Path:
        """Lays out B/python/ the way --backend-directory expects; the wheel scatters the files."""
        target = self._workdir / "backends" / "python"
        if not target.is_dir():
            target.mkdir(parents=True)
            src = dist / "backends" / "python"
            for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
                shutil.copy2(src / name, target / name)
            stub = dist / "python_backend_stubs" / py_version / "triton_python_backend_stub"
            shutil.copy2(stub, target / stub.name)
        return target.parent

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            def ready() -> bool:
                try:
                    return stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1.0).ready
                except grpc.RpcError:
                    return False  # the port only opens once every model has loaded

            self._poll(ready, deadline, "tritonserver not ready")

    def answers(self, tries: int = 2) -> bool:
        """Whether tritonserver answers ServerLive (within 3 s, `tries` times): its process can
        stay up after an abort without answering anything (tests/conftest.py)."""
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(tries):
                try:
                    return stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=3).live
                except grpc.RpcError:
                    continue
        return False

    def _cleanup(self) -> None:
        # Only the log is worth keeping; the backend copy (~3 MB) is rebuilt by the next start().
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        for region in set(_SHM.glob(_SHM_PATTERN)) - getattr(self, "_shm_before", set()):
            region.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a real tritonserver in the foreground.")
    parser.add_argument("--models", required=True, help="model repository directory")
    parser.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    parser.add_argument("--http-port", type=int, default=None, help="also serve HTTP/REST here")
    args = parser.parse_args(argv)

    server = TritonServer(args.models, grpc_port=args.port, http=args.http_port or False)

    def ready(startup_seconds: float) -> None:
        http = f", HTTP/REST on {server.http_address}" if server.http_port else ""
        print(f"triton ready on {server.address}{http}", flush=True)
        print(f"log: {server.log_path}", file=sys.stderr, flush=True)

    return run_in_foreground(server, ready)


if __name__ == "__main__":
    sys.exit(main())
