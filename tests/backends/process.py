"""What the backend harnesses (triton.py, tfserving.py, torchserve.py) share: a server process in
its own session, logging to a file, started from its own venv, gone when the tests are.

A harness subclasses BackendProcess and supplies ``_command()`` (what to run) and
``_wait_ready()`` (when it is up); start/stop/kill/restart/log_tail and ``with`` come from here.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

REPO_ROOT = Path(__file__).resolve().parents[2]


# Below Linux's ephemeral range (32768-60999): an outgoing connection never takes one of these
# as its source port, so a server killed and restarted on the same port (etcd, Triton, Redis in
# the fault tests) finds it free again. A port the kernel hands out (bind to 0) could be taken
# meanwhile by any client's connection: the chaos run's Triton once failed to restart that way.
_PORTS = range(20000, 32768)


def free_port() -> int:
    """A currently free loopback TCP port outside the ephemeral range (racy by nature between
    two tests that pick the same one before either binds: rare among 12,768, good enough)."""
    for _ in range(200):
        port = random.choice(_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def backend_venv(name: str) -> Path:
    """Path of the venv ``scripts/backend-venv NAME`` builds (on first use) for a backend."""
    out = subprocess.run(
        [str(REPO_ROOT / "scripts" / "backend-venv"), name],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def venv_env(venv: Path) -> dict[str, str]:
    """This process's environment with ``venv``'s bin/ first on PATH.

    The backends pin other versions (numpy<2, torch) than the gateway's venv, so none of the
    gateway's packages may leak in through PYTHONPATH / PYTHONHOME.
    """
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    for var in ("PYTHONPATH", "PYTHONHOME"):
        env.pop(var, None)
    return env


def with_pdeathsig(cmd: list[str]) -> list[str]:
    """`cmd` run so that it gets SIGKILL when its parent dies (e.g. pytest killed), through
    util-linux's setpriv rather than a preexec_fn: Python code between fork and exec can crash
    the child (threading's after-fork reinit while gRPC's threads hold locks: a segfault seen in
    CI). The kernel ties PDEATHSIG to the THREAD that forked, not the process: started from a
    worker thread (asyncio.to_thread, an executor) the server would be killed as soon as that
    thread exits, so only the main thread arms it; elsewhere the process group kill in stop()
    remains."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return list(cmd)
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd]


def tail(path: Path, lines: int = 40) -> str | None:
    """The last ``lines`` lines of ``path``, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            last = deque(f, maxlen=lines)
    except FileNotFoundError:
        return None
    return b"".join(last).decode(errors="replace")


class BackendProcess:
    """A server process (and whatever it forks) in its own session, output in ``log_path``.

    Subclasses set ``name`` (for messages) and implement ``_command()`` and ``_wait_ready()``.
    """

    name = "backend"

    def __init__(self, workdir_prefix: str, log_name: str, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
        # Kept after stop() (and appended to across restarts) so failures can be read afterwards.
        self.log_path = self._workdir / log_name
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.startup_seconds: float | None = None  # of the last start(), process spawn to ready

    @property
    def pid(self) -> int | None:
        """pid of the server process (also its process group id)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) of the server; called by every start()."""
        raise NotImplementedError

    def _wait_ready(self) -> None:
        """Blocks until the server serves; raises (TimeoutError...) if it does not in time."""
        raise NotImplementedError

    def start(self) -> Self:
        """Starts the server and blocks until ``_wait_ready()`` returns."""
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        cmd, env = self._command()
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {' '.join(cmd)}\n".encode())
        self._log.flush()
        spawned = time.monotonic()
        self._proc = subprocess.Popen(
            with_pdeathsig(cmd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self._workdir,
            start_new_session=True,  # own process group: kill() also reaches what it forks
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - spawned
        return self

    def _check_alive(self, what: str = "during startup") -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self._proc.returncode} {what}\n" + self.log_tail()
            )

    def _poll(self, ready: Callable[[], bool], deadline: float, not_ready: str) -> None:
        """Calls ``ready()`` every 0.1 s until it holds; TimeoutError(not_ready...) at deadline."""
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{not_ready} after {self.startup_timeout:.0f} s\n" + self.log_tail()
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """``_terminate()`` (SIGTERM to the group), then SIGKILL after ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _terminate(self) -> None:
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole process group right away (crash simulation for fault tests)."""
        if self._proc is None:
            return
        # Also when the server already exited: processes it forked may remain in the group.
        self._signal_group(signal.SIGKILL)
        self._proc.wait()
        self._cleanup()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup(self) -> None:
        """Runs after every kill(), the process group gone; the log must stay."""

    def restart(self) -> Self:
        """Stops (if running) and starts again on the SAME port(s)."""
        self.stop()
        return self.start()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)  # pgid == pid thanks to start_new_session
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines) or ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_in_foreground(server: BackendProcess, on_ready: Callable[[float], None]) -> int:
    """The harness CLIs: starts ``server``, calls ``on_ready(seconds start() took)``, then runs
    until Ctrl-C / SIGINT / SIGTERM (exit code 0) or until the server dies on its own (1).

    Only the first signal counts. Later ones (Ctrl-C pressed twice; SIGTERM to a process group
    followed by the SIGTERM of a script's cleanup) are ignored, or they would interrupt
    ``server.stop()``: the harness would exit 130 at once and leave the server to PDEATHSIG's
    SIGKILL, its shared memory segments and work directory behind. SIGINT is handled even when
    inherited ignored: a script starts this in the background (scripts/demo), and bash starts
    background commands with SIGINT ignored, so Ctrl-C reached everything but this harness."""

    def on_signal(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt  # one clean shutdown path for Ctrl-C and SIGTERM

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        started = time.monotonic()
        server.start()
        on_ready(time.monotonic() - started)
        while server.running:
            time.sleep(0.5)
        print(f"{server.name} exited unexpectedly\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def tool(name: str) -> str:
    """Path of a command from the tools venv (tests/backends/requirements/tools.txt)."""
    path = backend_venv("tools") / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: see tests/backends/requirements/tools.txt")
    return str(path)
