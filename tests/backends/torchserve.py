"""Runs a REAL TorchServe 0.12 (Java frontend + Python workers) serving the test models.

The server runs from its own venv (built by ``scripts/backend-venv torchserve``: torch 2.13 CPU,
torchserve, torch-model-archiver); this module itself only needs httpx. The models
(tests/backends/make_torchserve_models.py, handler deploy/torchserve/oip_handler.py, Open
Inference Protocol JSON) are built once into ~/.cache/tensorgate/ts-models-<hash>.
See docs/backends-torchserve-notes.md and deploy/torchserve/README.md.

    with TorchServe() as ts:
        r = httpx.post(f"{ts.inference_url}/predictions/linear/1", json={"inputs": [...]})

Registered: linear "1" (the default version) and "2", echo "1"; one worker each.

Command line (foreground until Ctrl-C / SIGTERM):
    python -m tests.backends.torchserve [--batch-size N --max-batch-delay MS]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.backends.process import (
    REPO_ROOT,
    BackendProcess,
    backend_venv,
    free_port,
    run_in_foreground,
    tail,
    venv_env,
)

HANDLER = REPO_ROOT / "deploy" / "torchserve" / "oip_handler.py"
MODEL_SCRIPT = Path(__file__).resolve().parent / "make_torchserve_models.py"
REQUIREMENTS = Path(__file__).resolve().parent / "requirements" / "torchserve.txt"
CACHE_ROOT = Path(os.environ.get("TENSORGATE_CACHE", Path.home() / ".cache" / "tensorgate"))
DEFAULT_JAVA_HOME = Path("/usr/lib/jvm/java-17-openjdk-amd64")

# (name, version) registered by start(); the first version of a name is made its default.
DEFAULT_MODELS: tuple[tuple[str, str], ...] = (
    ("linear", "1"),
    ("linear", "2"),
    ("echo", "1"),
    ("linear_instances", "1"),
)

# Quiet log4j2 config: frontend log and worker (Python) output in LOG_LOCATION, no access log, no
# metrics logs, nothing on stdout below WARN.
_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
    <File name="ts_log" fileName="${env:LOG_LOCATION}/ts_log.log" append="true">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
    <File name="model_log" fileName="${env:LOG_LOCATION}/model_log.log" append="true">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="info" additivity="false">
      <AppenderRef ref="model_log"/>
    </Logger>
    <Logger name="org.pytorch.serve" level="info" additivity="false">
      <AppenderRef ref="ts_log"/>
    </Logger>
    <Root level="warn">
      <AppenderRef ref="STDOUT"/>
      <AppenderRef ref="ts_log"/>
    </Root>
  </Loggers>
</Configuration>
"""


def torchserve_venv() -> Path:
    """Path of the TorchServe venv; builds it on first use (~2 min, torch dominates)."""
    return backend_venv("torchserve")


def _models_hash() -> str:
    digest = hashlib.sha256()
    for path in (MODEL_SCRIPT, HANDLER, HANDLER.with_name("instances_handler.py"), REQUIREMENTS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def model_store() -> Path:
    """Directory of the built .mar files (+ models.json); built once per script/handler hash."""
    store = CACHE_ROOT / f"ts-models-{_models_hash()}"
    if (store / ".complete").is_file():
        return store
    venv = torchserve_venv()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".ts-models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes: one builds, others wait
        if (store / ".complete").is_file():
            return store
        build = Path(tempfile.mkdtemp(prefix=f"{store.name}.build-", dir=CACHE_ROOT))
        try:
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    str(MODEL_SCRIPT),
                    str(build),
                    f"--handler={HANDLER}",
                ],
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


def java_home() -> Path:
    """$JAVA_HOME if it holds bin/java, else Debian's OpenJDK 17, else the `java` on PATH."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    candidates.append(DEFAULT_JAVA_HOME)
    java = shutil.which("java")
    if java:
        candidates.append(Path(os.path.realpath(java)).parents[1])
    for home in candidates:
        if (home / "bin" / "java").is_file():
            return home
    raise FileNotFoundError("no Java found: install openjdk-17-jre-headless or set JAVA_HOME")


def _clean_env(venv: Path) -> dict[str, str]:
    env = venv_env(venv)
    env["VIRTUAL_ENV"] = str(venv)
    return env


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """port -> (hex local address, socket inode) of every TCP socket in LISTEN state."""
    result: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                continue
            addr, port = fields[1].rsplit(":", 1)
            result[int(port, 16)] = (addr, int(fields[9]))
    return result


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


class TorchServe(BackendProcess):
    """A TorchServe process on 127.0.0.1 only, serving the test models (see module doc).

    ``batch_size`` / ``max_batch_delay_ms`` turn on TorchServe's server-side batching for every
    registered model; ``workers`` is the worker count per model version; ``max_message_bytes``
    is the request and response size limit (max_request_size / max_response_size).
    """

    name = "torchserve"

    def __init__(
        self,
        models: Sequence[tuple[str, str]] = DEFAULT_MODELS,
        batch_size: int = 1,
        max_batch_delay_ms: int = 100,
        workers: int = 1,
        startup_timeout: float = 120.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.models = list(models)
        self.batch_size = batch_size
        self.max_batch_delay_ms = max_batch_delay_ms
        self.workers = workers
        # TorchServe's default is 6,553,500 bytes for requests and responses alike (~400k FP32
        # values as JSON); larger requests get 413, larger responses a 500-class error.
        self.max_message_bytes = max_message_bytes
        (
            self.inference_port,
            self.management_port,
            self.metrics_port,
            self.grpc_inference_port,
            self.grpc_management_port,
        ) = _free_ports(5)
        super().__init__("torchserve-", "logs/torchserve.out", startup_timeout)  # JVM output
        self.log_dir = self.log_path.parent  # also the frontend's and the workers' logs
        self.model_store: Path | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def grpc_inference_address(self) -> str:
        return f"127.0.0.1:{self.grpc_inference_port}"

    @property
    def grpc_management_address(self) -> str:
        return f"127.0.0.1:{self.grpc_management_port}"

    @property
    def ports(self) -> dict[str, int]:
        return {
            "inference": self.inference_port,
            "management": self.management_port,
            "metrics": self.metrics_port,
            "grpc_inference": self.grpc_inference_port,
            "grpc_management": self.grpc_management_port,
        }

    # -- start ---------------------------------------------------------------------------------

    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The java command line `torchserve --start --foreground --ncs` would run.

        ts/model_server.py (the `torchserve` CLI) only Popen()s this command and waits; running
        java directly makes our pid the frontend's, so SIGTERM reaches it (a SIGTERM to the CLI's
        process group also hits the workers, which the frontend then restarts while it shuts
        down) and PR_SET_PDEATHSIG kills it with a killed pytest.
        """
        venv = torchserve_venv()
        self.model_store = model_store()
        busy = [name for name, port in self.ports.items() if not self._port_free(port)]
        if busy:
            raise RuntimeError(f"torchserve ports already in use: {busy} ({self.ports})")
        site = next((venv / "lib").glob("python3*/site-packages"))
        tmp = self._workdir / "tmp"  # pid file, worker unix sockets, extracted models
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        config = self._workdir / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address={self.inference_url}",
                    f"management_address={self.management_url}",
                    f"metrics_address={self.metrics_url}",
                    "grpc_inference_address=127.0.0.1",
                    f"grpc_inference_port={self.grpc_inference_port}",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_management_port={self.grpc_management_port}",
                    "disable_token_authorization=true",
                    "enable_model_api=true",
                    "disable_system_metrics=true",
                    "install_py_dep_per_model=false",
                    f"default_workers_per_model={self.workers}",
                    f"max_request_size={self.max_message_bytes}",
                    f"max_response_size={self.max_message_bytes}",
                    f"model_store={self.model_store}",
                    "",
                ]
            )
        )
        log_config = self._workdir / "log4j2.xml"
        log_config.write_text(_LOG4J2)
        home = java_home()
        cmd = [
            str(home / "bin" / "java"),
            f"-Dmodel_server_home={site}",
            f"-Dlog4j.configurationFile=file://{log_config}",
            f"-Djava.io.tmpdir={tmp}",
            "-cp",
            str(site / "ts" / "frontend" / "*"),
            "org.pytorch.serve.ModelServer",
            "--python",
            str(venv / "bin" / "python"),
            "-f",
            str(config),
            "-s",
            str(self.model_store),
            "-ncs",
        ]
        env = _clean_env(venv)
        env.update(
            JAVA_HOME=str(home),
            TMPDIR=str(tmp),
            TEMP=str(tmp),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
        )
        # Several workers on 2 cores: one intra-op thread each unless the caller chose otherwise.
        env.setdefault("OMP_NUM_THREADS", "1")
        return cmd, env

    @staticmethod
    def _port_free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def _wait_ready(self) -> None:
        """Registers the models, then blocks until every worker is READY."""
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=2.0)) as client:
            self._wait_frontend(client, deadline)
            self._check_ports(deadline)
            self._register_all(client)
            self._wait_workers_ready(client, deadline)

    def _wait_frontend(self, client: httpx.Client, deadline: float) -> None:
        def up() -> bool:
            try:
                return client.get(f"{self.management_url}/models").status_code == 200
            except httpx.TransportError:
                return False  # not listening yet

        self._poll(up, deadline, "torchserve frontend not up")

    def _check_ports(self, deadline: float) -> None:
        """Every port must be LISTENed on 127.0.0.1 by OUR java process.

        TorchServe only logs a bind failure (and the CLI exits 0), so a clash would otherwise
        send the tests to some other server.
        """
        assert self._proc is not None
        loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
        while True:
            mine = _socket_inodes(self._proc.pid)
            listening = _listening_sockets()
            wrong = {
                name: port
                for name, port in self.ports.items()
                if port not in listening
                or listening[port][1] not in mine
                or listening[port][0] not in loopback
            }
            if not wrong:
                return
            self._check_alive("during startup")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"torchserve is not listening on 127.0.0.1 for {wrong} (port clash?)\n"
                    + self.log_tail()
                )
            time.sleep(0.1)

    def _register_all(self, client: httpx.Client) -> None:
        # Each registration spawns a worker that imports torch (~2-4 s), so different model
        # names register concurrently. Versions of ONE name must go one after the other:
        # concurrent registrations of the same name race inside TorchServe's ModelManager (404
        # "Model version: 2 does not exist for model: linear" or "Model not found at ...").
        versions: dict[str, list[str]] = {}
        for name, version in self.models:
            versions.setdefault(name, []).append(version)

        def register_versions(name: str) -> None:
            for version in versions[name]:
                self.register(name, version, client)
            self.set_default(name, versions[name][0], client)

        with concurrent.futures.ThreadPoolExecutor(max(1, len(versions))) as pool:
            for future in [pool.submit(register_versions, name) for name in versions]:
                future.result()

    def _wait_workers_ready(self, client: httpx.Client, deadline: float) -> None:
        pending = list(self.models)
        while pending:
            self._check_alive("while loading models")
            pending = [(n, v) for n, v in pending if not self._workers_ready(client, n, v)]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"torchserve workers not READY: {pending}\n" + self.log_tail())
            if pending:
                time.sleep(0.1)

    def _workers_ready(self, client: httpx.Client, name: str, version: str) -> bool:
        try:
            info = self.describe(name, version, client)
        except httpx.HTTPError:
            return False
        workers = info.get("workers", [])
        return len(workers) >= self.workers and all(w["status"] == "READY" for w in workers)

    # -- management helpers --------------------------------------------------------------------

    def _mgmt(
        self, method: str, path: str, client: httpx.Client | None, **params: Any
    ) -> httpx.Response:
        url = f"{self.management_url}{path}"
        if client is not None:
            response = client.request(method, url, params=params)
        else:
            response = httpx.request(method, url, params=params, timeout=60.0)
        if response.is_error:
            raise httpx.HTTPStatusError(
                f"{method} {url} {params}: {response.status_code} {response.text.strip()}",
                request=response.request,
                response=response,
            )
        return response

    def register(self, name: str, version: str, client: httpx.Client | None = None) -> None:
        """Registers <name>-<version>.mar from the model store and waits for its workers."""
        assert self.model_store is not None
        url = f"{name}-{version}.mar"
        if not (self.model_store / url).is_file():
            raise FileNotFoundError(f"no {url} in {self.model_store}")
        params: dict[str, Any] = {
            "url": url,
            "initial_workers": self.workers,
            "synchronous": "true",
        }
        if self.batch_size > 1:
            params.update(batch_size=self.batch_size, max_batch_delay=self.max_batch_delay_ms)
        self._mgmt("POST", "/models", client, **params)

    def unregister(self, name: str, version: str, client: httpx.Client | None = None) -> None:
        """The default version cannot be unregistered (403) while others exist."""
        self._mgmt("DELETE", f"/models/{name}/{version}", client)

    def set_default(self, name: str, version: str, client: httpx.Client | None = None) -> None:
        self._mgmt("PUT", f"/models/{name}/{version}/set-default", client)

    def describe(
        self, name: str, version: str | None = None, client: httpx.Client | None = None
    ) -> dict[str, Any]:
        """The management API's description of one model version (workers, batch size...)."""
        path = f"/models/{name}" + (f"/{version}" if version else "")
        return self._mgmt("GET", path, client).json()[0]

    # -- stop ----------------------------------------------------------------------------------

    def _terminate(self) -> None:
        # The frontend alone: it stops its workers itself (~1-4 s); were they signalled too, it
        # would restart them while shutting down.
        assert self._proc is not None
        try:
            self._proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _cleanup(self) -> None:
        shutil.rmtree(self._workdir / "tmp", ignore_errors=True)  # extracted models, sockets

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.log_path, self.log_dir / "ts_log.log", self.log_dir / "model_log.log"):
            text = tail(path, lines)
            if text is not None:
                parts.append(f"--- {path}\n{text}")
        return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a real TorchServe in the foreground.")
    parser.add_argument("--batch-size", type=int, default=1, help="server-side batch size")
    parser.add_argument("--max-batch-delay", type=int, default=100, help="batch delay in ms")
    parser.add_argument("--workers", type=int, default=1, help="workers per model version")
    args = parser.parse_args(argv)

    server = TorchServe(
        batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay, workers=args.workers
    )

    def ready(startup_seconds: float) -> None:
        print(f"torchserve ready on {server.inference_url}", flush=True)
        info = {
            "startup_s": round(startup_seconds, 1),
            "management": server.management_url,
            "metrics": server.metrics_url,
            "grpc_inference": server.grpc_inference_address,
            "models": [f"{n}/{v}" for n, v in server.models],
            "log_dir": str(server.log_dir),
        }
        print(json.dumps(info), file=sys.stderr, flush=True)

    return run_in_foreground(server, ready)


if __name__ == "__main__":
    sys.exit(main())
