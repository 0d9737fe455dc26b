"""Runs a REAL single-node etcd 3.4 (Debian's etcd-server package; scripts/system-tools installs
it) on 127.0.0.1, for the etcd-backed revision store and its outage tests.

Client and peer ports are free ports picked once, the data directory a temp directory: both stay
the same across stop()/kill()/start()/restart(), so a restarted etcd has the same endpoint and
everything that was committed before the crash.

    with EtcdServer() as etcd:                  # ready in ~0.2 s (~0.4 s on restart)
        client = aetcd.Client(etcd.host, etcd.port, timeout=2)
        ...
        etcd.kill()      # SIGKILL: connections drop at once, calls fail with UNAVAILABLE
        etcd.start()     # same data dir, same ports
        etcd.pause()     # SIGSTOP: the port still accepts connections, nothing answers
        etcd.resume()

The harness itself speaks only HTTP (/health) and runs etcdctl: it imports no etcd client library,
so a test process can use whichever one it likes (only one per process: their generated modules
collide in protobuf's descriptor pool).

Command line (foreground until Ctrl-C / SIGTERM):
    python -m tests.backends.etcd [--port N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from types import TracebackType

from tests.backends.process import BackendProcess, free_port, run_in_foreground

MISSING = "not found on PATH: run scripts/system-tools (scripts/test does) to install etcd 3.4"


def etcd_tool(name: str) -> str:
    """Path of ``etcd`` or ``etcdctl`` (Debian packages); FileNotFoundError naming the fix."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} {MISSING}")
    return path


class EtcdServer(BackendProcess):
    """One etcd member (a cluster of one) listening on 127.0.0.1 only, data in a temp directory.

    Fast-startup settings: 50 ms heartbeat / 250 ms election timeout (a cluster of one elects
    itself), warn-level JSON logs. No auto-compaction: tests compact explicitly.
    """

    name = "etcd"

    def __init__(
        self,
        client_port: int | None = None,
        peer_port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.client_port = client_port if client_port is not None else free_port()
        peer = peer_port if peer_port is not None else free_port()
        while peer == self.client_port:  # free_port() may hand out the same port twice
            peer = free_port()
        self.peer_port = peer
        self.extra_args = list(extra_args)
        super().__init__("etcd-", "etcd.log", startup_timeout)
        self.data_dir = self._workdir / "data"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.client_port

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the client (gRPC) listener."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        client = self.url
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            etcd_tool("etcd"),
            "--name=tensorgate-test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=tensorgate-test={peer}",
            # Ignored when data_dir already holds a member (restart): it keeps its cluster.
            "--initial-cluster-state=new",
            "--initial-cluster-token=tensorgate-test",
            "--heartbeat-interval=50",
            "--election-timeout=250",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
            *self.extra_args,
        ]
        # etcd reads ETCD_* variables as flags (and refuses a flag given both ways).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        return cmd, env

    def health(self, timeout: float = 1.0) -> bool:
        """etcd's own /health: true once the member has a leader and serves reads."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as reply:
                return json.loads(reply.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        self._poll(self.health, deadline, "etcd not healthy")

    def _terminate(self) -> None:
        self._signal_group(signal.SIGTERM)
        self._signal_group(signal.SIGCONT)  # a paused etcd would not act on SIGTERM

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, etcd answers nothing (a hung server)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def etcdctl(self, *args: str, timeout: float = 30.0) -> str:
        """Runs ``etcdctl --endpoints=<this etcd> ARGS`` (API v3); its stdout, raises on failure."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        env["ETCDCTL_API"] = "3"
        out = subprocess.run(
            [etcd_tool("etcdctl"), f"--endpoints={self.url}", *args],
            capture_output=True,
            text=True,
            errors="replace",  # values are bytes: a lock's value is a binary uuid
            timeout=timeout,
            env=env,
        )
        if out.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: exit {out.returncode}\n{out.stderr}")
        return out.stdout

    def wipe(self) -> None:
        """Stops etcd and deletes its data (the WAL alone preallocates 64 MB); the log stays."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()


class EtcdMember(EtcdServer):
    """One member of a multi-member cluster on 127.0.0.1. Set ``cluster`` (the
    ``--initial-cluster`` value naming every member's peer URL) before start(); ``cluster_of``
    does it. Defaults to a long election timeout (5 s): a leader whose followers die stays
    leader long enough to accept a write it cannot commit (tests/test_store_faults.py)."""

    def __init__(self, name: str, election_timeout_ms: int = 5000) -> None:
        super().__init__()
        self.member = name
        self.election_timeout_ms = election_timeout_ms
        self.cluster = ""  # set once every member has its ports

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super()._command()
        replaced = ("--name=", "--initial-cluster=", "--heartbeat-interval=", "--election-timeout=")
        cmd = [a for a in cmd if not a.startswith(replaced)]
        cmd += [
            f"--name={self.member}",
            f"--initial-cluster={self.cluster}",
            "--heartbeat-interval=100",
            f"--election-timeout={self.election_timeout_ms}",
        ]
        return cmd, env


def cluster_of(count: int = 3, election_timeout_ms: int = 5000) -> list[EtcdMember]:
    """``count`` members (m0, m1, ...) that know each other, not started (start_all)."""
    members = [EtcdMember(f"m{i}", election_timeout_ms) for i in range(count)]
    spec = ",".join(f"{m.member}=http://127.0.0.1:{m.peer_port}" for m in members)
    for m in members:
        m.cluster = spec
    return members


def start_all(members: Sequence[EtcdServer]) -> None:
    """Members start concurrently (each waits until the cluster has a leader)."""
    with concurrent.futures.ThreadPoolExecutor(len(members)) as pool:
        for future in [pool.submit(m.start) for m in members]:
            future.result()


def leader_of(members: Sequence[EtcdServer], ask: EtcdServer | None = None) -> EtcdServer:
    """The member that is the leader, asked of ``ask`` (default: the first member)."""
    status = json.loads(
        (ask or members[0]).etcdctl("endpoint", "status", "--cluster", "-w", "json")
    )
    leader = status[0]["Status"]["leader"]
    (member,) = [m for m in members for s in status
                 if s["Status"]["header"]["member_id"] == leader and s["Endpoint"] == m.url]  # fmt: skip
    return member


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a real single-node etcd in the foreground.")
    parser.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    args = parser.parse_args(argv)

    server = EtcdServer(client_port=args.port)

    def ready(startup_seconds: float) -> None:
        print(f"etcd ready on {server.endpoint} ({startup_seconds:.2f} s)", flush=True)
        print(f"data: {server.data_dir}  log: {server.log_path}", file=sys.stderr, flush=True)

    try:
        return run_in_foreground(server, ready)
    finally:
        server.wipe()


if __name__ == "__main__":
    sys.exit(main())
