"""Runs the gateway as users do: `tensorgate serve --config FILE` in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.backends.triton import REPO_ROOT, free_port
from tests.builders import triton_backend as triton_backend  # re-exported: tests import it here

TENSORGATE = Path(sys.executable).parent / "tensorgate"


# The supervisor's log line once every worker of `serve --workers N` serves (gateway/workers.py).
WORKERS_UP = "workers up:"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"


def _another_port(*taken: int) -> int:
    """A free port that is none of `taken` (free_port() may hand out the same one twice)."""
    port = free_port()
    while port in taken:
        port = free_port()
    return port


class GatewayProcess:
    def __init__(
        self,
        config: dict,
        *,
        startup_timeout: float = 30.0,
        admin: bool = False,
        env: dict | None = None,
        directory: str | None = None,
        workers: int = 1,
        rest: bool = False,
    ) -> None:
        """`admin`: also serve the admin API with two tokens (ADMIN_TOKEN, READ_TOKEN) from a
        tokens file. `directory`: reuse a config/state directory (to restart a gateway).
        `workers`: `serve --workers N` (start() then also waits until all N are up). `rest`:
        also serve the KServe v2 REST listener (`rest_address`, `rest_url`)."""
        self.config = dict(config)
        self.workers = workers
        self.port = free_port()
        self.metrics_port = _another_port(self.port)
        listeners = dict(self.config.get("listeners", {}))
        listeners.setdefault("data_plane", f"127.0.0.1:{self.port}")
        listeners.setdefault("metrics", f"127.0.0.1:{self.metrics_port}")
        self.rest_port = _another_port(self.port, self.metrics_port) if rest else 0
        if rest:
            listeners.setdefault("rest", f"127.0.0.1:{self.rest_port}")
        self._dir = directory or tempfile.mkdtemp(prefix="tensorgate-test-")
        if admin:
            admin_port = _another_port(self.port, self.metrics_port, self.rest_port)
            listeners.setdefault("admin", f"127.0.0.1:{admin_port}")
            tokens = Path(self._dir) / "tokens.yaml"
            tokens.write_text(
                yaml.safe_dump(
                    [
                        {"name": "ops", "role": "admin", "token": ADMIN_TOKEN},
                        {"name": "viewer", "role": "read", "token": READ_TOKEN},
                    ]
                )
            )
            self.config.setdefault("admin", {"tokens_file": str(tokens)})
        self.config["listeners"] = listeners
        self.address = listeners["data_plane"]
        self.admin_address = listeners.get("admin")
        self.rest_address = listeners.get("rest")
        self.rest_url = f"http://{self.rest_address}" if self.rest_address else None
        self.metrics_url = f"http://{listeners['metrics']}/metrics"
        self.directory = self._dir
        self._env = env
        self.config_path = Path(self._dir) / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = Path(self._dir) / "gateway.log"
        self._startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait: str = "ready") -> GatewayProcess:
        """wait: "ready" (ServerReady true), "live" (ServerLive answers: for configs whose
        backends are down or cannot be probed), or "none" (e.g. a TLS listener)."""
        self._log = open(self.log_path, "wb")
        command = [str(TENSORGATE), "serve", "--config", str(self.config_path)]
        if self.workers != 1:
            command += ["--workers", str(self.workers)]
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
            env={**os.environ, **(self._env or {})},
        )
        try:
            if wait == "ready":
                self.wait_ready()
            elif wait == "live":
                self._wait_for(
                    "live",
                    lambda stub: stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=1).live,
                )
            if self.workers != 1 and wait != "none":
                self._wait_for("up (all workers)", lambda stub: WORKERS_UP in self.log())
        except BaseException:
            self.stop()  # a gateway that never came up must not outlive the test
            raise
        return self

    def wait_ready(self) -> None:
        self._wait_for(
            "ready",
            lambda stub: stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1).ready,
        )

    def _wait_for(self, what: str, check) -> None:
        deadline = time.monotonic() + self._startup_timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if check(stub):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"gateway not {what} in {self._startup_timeout}s:\n{self.log()}")

    def pids(self) -> list[int]:
        """Live processes of this gateway: its session (the supervisor and its workers)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
            if int(session) == self.proc.pid and state != "Z":
                pids.append(int(entry.name))
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self if self.proc is not None else self.start()  # start(wait=...) may have run

    def __exit__(self, *exc) -> None:
        self.stop()
