"""Runs a REAL KServe Python model server (tests/backends/kserve_server.py) for the test suite: the
second Open Inference Protocol gRPC server after Triton, and not Triton (BACKEND_KIND_OIP).

The server runs from its own venv (built by ``scripts/backend-venv kserve``: the `kserve` SDK,
~80 s and ~450 MB once); the test process only needs grpcio and tritonclient's OIP stubs. It
listens on 127.0.0.1 only. See docs/backends-oip.md for what it answers.

    with KServeServer() as server:       # models: linear, multi, failing, not_ready
        client = tritonclient.grpc.InferenceServerClient(server.address)

Command line (foreground until Ctrl-C / SIGTERM):
    python -m tests.backends.kserve [--port N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.backends.process import (
    BackendProcess,
    backend_venv,
    free_port,
    run_in_foreground,
    venv_env,
)

SERVER_SCRIPT = Path(__file__).resolve().with_name("kserve_server.py")


def kserve_venv() -> Path:
    """Path of the kserve venv; builds it on first use (~80 s)."""
    return backend_venv("kserve")


class KServeServer(BackendProcess):
    """kserve's gRPC data plane serving the test models on 127.0.0.1:``grpc_port``.

    Ready when ModelReady("linear") answers true (the port opens after the models are built; kserve
    imports pandas and FastAPI first: ~2-4 s here).
    """

    name = "kserve model server"

    def __init__(self, grpc_port: int | None = None, startup_timeout: float = 60.0) -> None:
        self.grpc_port = grpc_port if grpc_port is not None else free_port()
        super().__init__("kserve-", "kserve.log", startup_timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        venv = kserve_venv()
        env = venv_env(venv)
        env["VIRTUAL_ENV"] = str(venv)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [str(venv / "bin" / "python"), str(SERVER_SCRIPT), f"--port={self.grpc_port}"]
        return cmd, env

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelReadyRequest(name="linear")

            def ready() -> bool:
                try:
                    return stub.ModelReady(request, timeout=1.0).ready
                except grpc.RpcError:
                    return False  # not listening yet

            self._poll(ready, deadline, "kserve model server not ready")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the KServe test server in the foreground.")
    parser.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    args = parser.parse_args(argv)
    server = KServeServer(args.port)

    def ready(startup_seconds: float) -> None:
        print(f"kserve model server ready on {server.address}", flush=True)
        print(f"log: {server.log_path}\nstartup: {startup_seconds:.1f} s", file=sys.stderr)

    return run_in_foreground(server, ready)


if __name__ == "__main__":
    sys.exit(main())
