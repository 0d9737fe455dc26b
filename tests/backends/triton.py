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
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


@functools.cache
def triton_venv() -> Path:
    """Path of the Triton venv; builds it on first use (takes ~1 min)."""
    out = subprocess.run(
        [str(REPO_ROOT / "scripts" / "backend-venv"), "triton"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


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


def free_port() -> int:
    """A currently free loopback TCP port (racy by nature, good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """preexec_fn that makes the child get SIGKILL when its parent dies (e.g. pytest killed).

    The kernel ties PDEATHSIG to the THREAD that forked, not the process: started from a worker
    thread (asyncio.to_thread, an executor) the server would be killed as soon as that thread
    exits. So only the main thread arms it; elsewhere the process group kill in stop() remains.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    # Resolved here, not in the child: between fork and exec only async-signal-safe work is safe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


class TritonServer:
    """A tritonserver process serving ``model_repository`` over gRPC on 127.0.0.1 only.

    Models are loaded at start (``--load-model=*``) in explicit model-control mode, so tests can
    also load/unload them at run time through the repository API.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        grpc_port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 90.0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.grpc_port = grpc_port if grpc_port is not None else free_port()
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        # Kept after stop() (and appended to across restarts) so failures can be read afterwards.
        self.log_path = self._workdir / "tritonserver.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> TritonServer:
        """Starts the server and blocks until ServerReady is true (all models loaded)."""
        if self.running:
            raise RuntimeError(f"tritonserver already running (pid {self.pid})")
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
            "--allow-http=false",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--exit-timeout-secs=5",
            "--model-control-mode=explicit",
            "--load-model=*",
            *self.extra_args,
        ]
        env = dict(os.environ)
        # Without libpython's directory the python backend stub picks up a mismatched libpython
        # and every model fails with "'_thread.RLock' object has no attribute '_recursion_count'".
        ld_path = [libdir, str(site / "nvidia_pytriton.libs")]
        if env.get("LD_LIBRARY_PATH"):
            ld_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(ld_path)
        # The stub's embedded interpreter finds its prefix (and so numpy<2) via `python3` on PATH;
        # anything inherited from the gateway's venv (numpy 2) must not leak in.
        env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        for var in ("PYTHONPATH", "PYTHONHOME"):
            env.pop(var, None)

        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {' '.join(cmd)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self._workdir,
            start_new_session=True,  # own process group: stop() also reaches the stub processes
            preexec_fn=_pdeathsig_preexec(),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

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
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        # The port only opens once every model has loaded: refused connections are expected.
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"tritonserver exited with code {self._proc.returncode} during startup\n"
                        + self.log_tail()
                    )
                try:
                    if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1.0).ready:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"tritonserver not ready after {self.startup_timeout:.0f} s\n"
                        + self.log_tail()
                    )
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful: in-flight requests get up to 5 s), then SIGKILL after ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole process group right away (crash simulation for fault tests)."""
        if self._proc is None:
            return
        # Also when the server already exited: orphaned stub processes may remain in the group.
        self._signal_group(signal.SIGKILL)
        self._proc.wait()
        # Only the log is worth keeping; the backend copy (~3 MB) is rebuilt by the next start().
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> TritonServer:
        """Stops (if running) and starts again on the SAME port."""
        self.stop()
        return self.start()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)  # pgid == pid thanks to start_new_session
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = deque(f, maxlen=lines)
        except FileNotFoundError:
            return ""
        return b"".join(tail).decode(errors="replace")

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a real tritonserver in the foreground.")
    parser.add_argument("--models", required=True, help="model repository directory")
    parser.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # same clean shutdown path as Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)
    server = TritonServer(args.models, grpc_port=args.port)
    try:
        server.start()
        print(f"triton ready on {server.address}", flush=True)
        print(f"log: {server.log_path}", file=sys.stderr, flush=True)
        while server.running:
            time.sleep(0.5)
        print(f"tritonserver exited unexpectedly\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
