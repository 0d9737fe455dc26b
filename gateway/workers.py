"""`tensorgate serve --workers N`: N gateway processes serving one data-plane port.

**Process model.** The parent (the supervisor) serves no call. It starts each worker as a fresh
interpreter (`python -m gateway.workers`, never a fork: grpc's core threads and locks do not
survive one) and writes it the validated config on stdin, so every worker builds the Runtime a
single process would build, from the same bytes. A worker runs the single process's own path
(gateway.app.serve: a whole Gateway, its own event loop, the same drain) on its own listeners:
listeners.data_plane bound with SO_REUSEPORT (`grpc.so_reuseport` 1, where a single process
binds with 0), and the kernel spreads *connections* over the workers' sockets by a hash of the
client's address and port. A gRPC channel keeps one HTTP/2 connection, so one channel stays
with one worker: balancing is per connection (README, "Several processes on one port"). Every
worker answers grpc.health and reflection on that port and follows the revision store
(TENSORGATE_WORKER in its environment: they share the file store); only worker 0 serves
listeners.admin and listeners.xds.

**Start order, ports.** Worker 0 starts alone, on listeners.data_plane as written, and reports
the port it bound; the others then start on that port (so an ephemeral port 0 would be shared
too, though config validation accepts none). Before that the port is checked free without
SO_REUSEPORT, so a second gateway still cannot silently share a busy port (why a single process
binds with so_reuseport 0).

**Metrics: the parent aggregates.** Each worker serves its own registry on an ephemeral loopback
port; the parent serves listeners.metrics, and each scrape of it fetches every worker's metrics
(OpenMetrics, so counters, histograms and info keep their types) and returns their union with
each sample labelled `worker="<index>"`. Counters and histograms stay exact per worker:
`sum without (worker)` gives the gateway's totals, `histogram_quantile` over `sum by (le)` its
latency; gauges (tensorgate_ready, in-flight counts, breaker states) stay per worker, where a sum
or a max would say little; a restarted worker is a counter reset of its own series only, which
rate() handles. Not prometheus_client's multiprocess mode: it does not support Info
(tensorgate_info), custom collectors, or gauges without a per-gauge multiprocess_mode, which the
gateway's metrics (on their own registry, gateway/observability/metrics.py and the layers) do not
declare. The parent adds tensorgate_worker_up{worker} (the worker answered this scrape) and
tensorgate_worker_restarts_total{worker}.

**Signals.** SIGTERM or SIGINT to the parent is sent on to every worker as SIGTERM; each drains
as a single gateway does (Gateway.shutdown: NOT_SERVING, drain_delay, in-flight calls finish).
The parent exits 0 when every worker exited 0; a worker still running drain_delay +
shutdown_grace + 10 s after the signal is killed, and the exit is 1.

**A worker that dies unasked is restarted** (same index and port; worker 0 brings the admin
API back) and counted. Restarting keeps the other workers' connections and the capacity, where
stopping everything would drop every caller for one worker's fault. More than 5 deaths within 60
s is a crash loop: the parent stops the others and exits 1, for the service manager to see.

**Orphans.** Every worker holds the read end of a pipe whose only write end is the parent's: if
the parent dies, even by SIGKILL, the pipe reads end-of-file and the workers drain and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import gateway
from gateway.controlplane.config import ConfigError
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2

log = logging.getLogger("gateway.workers")  # also when run as __main__ (a worker)

MAX_WORKERS = 64
CRASH_LOOP_DEATHS = 5  # more than this many unasked worker exits ...
CRASH_LOOP_WINDOW_S = 60.0  # ... within this window: stop everything, exit 1
STARTUP_TIMEOUT_S = 60.0
STOP_MARGIN_S = 10.0  # beyond drain_delay + shutdown_grace, before SIGKILL
SCRAPE_TIMEOUT_S = 5.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def worker_count(text: str) -> int:
    """The argparse type of `serve --workers`."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_WORKERS}")
    return count


def supervise(
    config: config_pb2.GatewayConfig, state_dir: str, *, workers: int, log_level: str
) -> int:
    """Run `workers` gateway processes until SIGTERM or SIGINT; the process exit code."""
    try:
        return asyncio.run(Supervisor(config, state_dir, workers, log_level).run())
    except OSError as err:
        print(f"tensorgate: {err}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- the parent


class StartFailed(Exception):
    pass


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process
    metrics_port: int = 0  # 0 until the worker reported it
    signalled: bool = False

    def signal(self, signum: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)


class Supervisor:
    def __init__(
        self, config: config_pb2.GatewayConfig, state_dir: str, count: int, log_level: str
    ) -> None:
        self.config = config
        self.count = count
        self.address = config.listeners.data_plane
        self.workers: dict[int, Worker] = {}
        self.restarts = [0] * count
        self._state_dir = state_dir
        self._log_level = log_level
        self._config_bytes = config.SerializeToString()
        self._deaths: deque[float] = deque()
        self._serving = False  # all workers came up once: from now on a death means a restart
        self._stopping = False
        self._failed = False
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lifeline_r, self._lifeline_w = os.pipe()

    async def run(self) -> int:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        listeners = self.config.listeners
        metrics = None
        try:
            check_free(self.address, "listeners.data_plane")
            if listeners.rest != "off":  # every worker binds it with SO_REUSEPORT too
                check_free(listeners.rest, "listeners.rest")
            if listeners.metrics != "off":
                metrics = serve_aggregate(listeners.metrics, self)
            try:
                first = await self._spawn(0)
                self.address = f"{self.address.rpartition(':')[0]}:{first['port']}"
                started = await asyncio.gather(
                    *(self._spawn(i) for i in range(1, self.count)), return_exceptions=True
                )
                for outcome in started:
                    if isinstance(outcome, BaseException):
                        raise outcome
                for worker in self.workers.values():
                    if worker.proc.returncode is not None:
                        raise StartFailed(
                            f"worker {worker.index} exited with code {worker.proc.returncode}"
                        )
            except StartFailed as err:
                log.error("%s: stopping", err)
                self._failed = True
                self._stop.set()
            else:
                self._serving = True
                self._announce(first, metrics)
            await self._stop.wait()
            return await self._stop_all()
        finally:
            if metrics is not None:
                metrics.shutdown()
            os.close(self._lifeline_w)
            os.close(self._lifeline_r)

    def _announce(self, first: dict, metrics) -> None:
        admin_host = self.config.listeners.admin.rpartition(":")[0]
        log.info(
            "tensorgate %s: %d workers up: Open Inference Protocol on %s (SO_REUSEPORT, balanced "
            "per connection), metrics on %s, admin %s; worker pids %s",
            gateway.__version__,
            self.count,
            self.address,
            f"{metrics.server_address[0]}:{metrics.server_port}" if metrics else "off",
            f"on {admin_host}:{first['admin_port']} (worker 0)" if first["admin_port"] else "off",
            ", ".join(str(w.proc.pid) for w in self.workers.values()),
        )

    async def _spawn(self, index: int) -> dict:
        """Start worker `index` on self.address; its report (its ports) once it serves. Raises
        StartFailed if it exits or stays silent first."""
        status_r, status_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.workers",
                "--index", str(index), "--data-plane", self.address,
                "--state-dir", self._state_dir, "--log-level", self._log_level,
                "--lifeline", str(self._lifeline_r), "--status", str(status_w),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(self._lifeline_r, status_w),
            )  # fmt: skip
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        worker = self.workers[index] = Worker(index, proc)
        if self._stopping:  # a restart that raced the stop signal
            worker.signal(signal.SIGTERM)
        task = asyncio.create_task(self._watch(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(status_r, "rb", 0)
        )
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(self._config_bytes)
                await proc.stdin.drain()
                proc.stdin.close()
            line = await asyncio.wait_for(reader.readline(), STARTUP_TIMEOUT_S)
        except TimeoutError:
            worker.signal(signal.SIGKILL)
            raise StartFailed(f"worker {index} not up after {STARTUP_TIMEOUT_S:.0f} s") from None
        finally:
            transport.close()
        if not line:
            code = await proc.wait()
            raise StartFailed(f"worker {index} exited with code {code} before serving")
        report = json.loads(line)
        worker.metrics_port = report["metrics_port"]
        log.info("worker %d (pid %d) serving", index, proc.pid)
        return report

    async def _watch(self, worker: Worker) -> None:
        """Wait for the worker's exit; restart it if nobody asked it to stop."""
        code = await worker.proc.wait()
        if self._stopping or not self._serving or self.workers.get(worker.index) is not worker:
            return
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - CRASH_LOOP_WINDOW_S:
            self._deaths.popleft()
        how = f"signal {-code}" if code < 0 else f"code {code}"
        if len(self._deaths) > CRASH_LOOP_DEATHS:
            log.error(
                "worker %d (pid %d) exited with %s: %d worker exits in %.0f s, stopping all",
                worker.index, worker.proc.pid, how, len(self._deaths), CRASH_LOOP_WINDOW_S,
            )  # fmt: skip
            self._failed = True
            self._stop.set()
            return
        log.error(
            "worker %d (pid %d) exited with %s unasked: restarting it",
            worker.index, worker.proc.pid, how,
        )  # fmt: skip
        self.restarts[worker.index] += 1
        with contextlib.suppress(StartFailed):  # its own _watch counts the new death
            await self._spawn(worker.index)

    async def _stop_all(self) -> int:
        """SIGTERM every worker, wait for their drains; 0 if all of them exited 0."""
        self._stopping = True
        life = self.config.lifecycle
        loop = asyncio.get_running_loop()
        give_up = (
            loop.time() + seconds(life.drain_delay) + seconds(life.shutdown_grace) + STOP_MARGIN_S
        )
        if self._serving:
            log.info("stopping: SIGTERM to %d workers, each drains", len(self.workers))
        while alive := [w for w in self.workers.values() if w.proc.returncode is None]:
            for worker in alive:
                if not worker.signalled:
                    worker.signalled = True
                    worker.signal(signal.SIGTERM)
            left = give_up - loop.time()
            if left <= 0:
                for worker in alive:
                    log.error(
                        "worker %d (pid %d) still running: SIGKILL", worker.index, worker.proc.pid
                    )
                    worker.signal(signal.SIGKILL)
                await asyncio.gather(*(w.proc.wait() for w in alive))
                break
            await asyncio.wait([asyncio.ensure_future(w.proc.wait()) for w in alive], timeout=left)
        codes = {w.index: w.proc.returncode for w in self.workers.values()}
        if any(codes.values()):
            log.error("worker exit codes: %s", codes)
        elif self._serving:
            log.info("all %d workers stopped", len(codes))
        return 1 if self._failed or any(codes.values()) else 0

    def metrics_ports(self) -> list[tuple[int, int]]:
        """(index, metrics port or 0) of every worker slot, for the aggregating scrape."""
        ports = []
        for index in range(self.count):
            worker = self.workers.get(index)
            running = worker is not None and worker.proc.returncode is None
            ports.append((index, worker.metrics_port if running else 0))
        return ports


def check_free(address: str, field: str) -> None:
    """Refuse a fixed port something already listens on. Workers bind with SO_REUSEPORT, which
    would join another gateway's socket group on the same port instead of failing; this probe
    binds without it (SO_REUSEADDR only, as grpc does, so TIME_WAIT does not count)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return  # worker 0's own bind reports it
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError:
                raise OSError(f"cannot listen on {address} ({field}): address in use?") from None


# ----------------------------------------------------------------------------- metrics


class WorkerMetrics:
    """A prometheus_client collector: every worker's metrics, each sample labelled with its
    worker index, plus tensorgate_worker_up and tensorgate_worker_restarts_total."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._pool = ThreadPoolExecutor(max_workers=min(supervisor.count, 8))

    def collect(self) -> Iterator:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            Metric,
        )
        from prometheus_client.openmetrics.parser import text_string_to_metric_families

        slots = self._supervisor.metrics_ports()
        texts = self._pool.map(_fetch, [port for _, port in slots])
        families: dict[str, Metric] = {}
        up = GaugeMetricFamily(
            "tensorgate_worker_up",
            "1 when the worker (serve --workers) answered this scrape.",
            labels=["worker"],
        )
        for (index, _), text in zip(slots, texts, strict=True):
            worker = str(index)
            try:
                parsed = list(text_string_to_metric_families(text)) if text is not None else None
            except ValueError:  # cut short: the worker is exiting
                parsed = None
            up.add_metric([worker], 0.0 if parsed is None else 1.0)
            for family in parsed or ():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for s in family.samples:
                    labels = {**s.labels, "worker": worker}
                    merged.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        yield from families.values()
        yield up
        restarts = CounterMetricFamily(
            "tensorgate_worker_restarts",
            "Workers restarted after exiting unasked (serve --workers).",
            labels=["worker"],
        )
        for index, count in enumerate(self._supervisor.restarts):
            restarts.add_metric([str(index)], count)
        yield restarts


def _fetch(port: int) -> str | None:
    if not port:
        return None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS}
    )
    try:
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as reply:
            return reply.read().decode()
    except (OSError, http.client.HTTPException):  # exiting or restarting: worker_up says so
        return None


def serve_aggregate(address: str, supervisor: Supervisor):
    """The parent's /metrics on listeners.metrics; returns the server (has .shutdown())."""
    import prometheus_client as prom

    from gateway.observability.metrics import serve_metrics

    registry = prom.CollectorRegistry()
    registry.register(WorkerMetrics(supervisor))
    try:
        server = serve_metrics(address, registry)  # /metrics only, 404 elsewhere
    except OSError as err:
        raise OSError(f"cannot listen on {address} (listeners.metrics): {err.strerror}") from None
    return server


# ----------------------------------------------------------------------------- a worker


async def _serve_worker(args: argparse.Namespace, config: config_pb2.GatewayConfig) -> None:
    """app.serve (the single process's own path: logging, tracing, signals, drain) on this
    worker's listeners; reports its ports to the supervisor once it serves."""
    from gateway.app import WORKER_ENV, serve

    os.environ[WORKER_ENV] = str(args.index)  # workers share the file store (gateway/store)
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:  # the lifeline is never written: readable means end-of-file
        loop.remove_reader(args.lifeline)
        log.warning("the supervisor is gone: draining")
        os.kill(os.getpid(), signal.SIGTERM)  # serve() drains on it

    def report(gw) -> None:
        line = {"port": gw.port, "metrics_port": gw.metrics_port, "admin_port": gw.admin_port}
        os.write(args.status, (json.dumps(line) + "\n").encode())
        os.close(args.status)

    loop.add_reader(args.lifeline, parent_gone)
    listeners = config_pb2.Listeners()
    listeners.CopyFrom(config.listeners)
    listeners.data_plane = args.data_plane
    if listeners.metrics != "off":
        listeners.metrics = "127.0.0.1:0"  # the supervisor scrapes it (WorkerMetrics)
    if args.index > 0:
        listeners.admin = "off"
        listeners.xds = "off"
    await serve(config, args.state_dir, listeners=listeners, reuse_port=True, started=report)


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.workers",
        description="One worker of `tensorgate serve --workers N`; started by the supervisor, "
        "which writes the config (a serialized GatewayConfig) to its stdin.",
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--data-plane", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--lifeline", type=int, required=True)
    parser.add_argument("--status", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{args.index} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = config_pb2.GatewayConfig.FromString(sys.stdin.buffer.read())
    try:
        asyncio.run(_serve_worker(args, config))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"tensorgate worker {args.index}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
