"""A seeded chaos run of a whole tensorgate fleet on 127.0.0.1, with its invariants checked.

The fleet: a 3-member etcd cluster, 3 gateway replicas on store.etcd (r0 with `--workers 2`), 2
real Envoys in Envoy mode (e1 fed by replica r1, e2 by r2), 2 real Tritons, each behind a
fault-injecting proxy (tests/faults/proxy.py) that every gateway and Envoy reaches it through.
While client load runs through every entry (3 replicas, 2 Envoys; routes with and without a
fallback), concurrent admin writers do read-modify-write with expected_revision on one route,
and progressive rollouts run one after the other on another, a seeded schedule injects faults:
kill -9 and restart of a Triton, an etcd member, the etcd leader, a replica, one worker of r0,
the rollout's driver, an Envoy; SIGSTOP/SIGCONT pauses of a Triton, an etcd member, a replica,
an Envoy; latency, resets and blackholes on a backend link; etcd quorum lost. The last fault is
always a quorum loss with writers still writing (so some writes have an unknown outcome); once
it heals, every replica worker and Envoy must reach the latest revision.

Invariants (tests/chaos_checks.py; each reported with its figure): history, calls, convergence,
rollouts, resources. A failing invariant prints the seed and the event log.

    python -m bench.chaos --seed 7 --duration 120 [--json report.json]

The fault sequence (kinds, targets, hold times, gaps) is a function of the seed; the moments at
which they land in the traffic are not (processes start and answer in their own time).
tests/test_chaos.py runs a 2-minute one; docs/reliability.md has a 30-minute one's report.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import yaml
from tritonclient.grpc import service_pb2_grpc

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tensorgate.store.v1 import store_pb2
from tests.backends.etcd import EtcdMember, cluster_of, leader_of, start_all
from tests.backends.process import free_port
from tests.backends.triton import REPO_ROOT, TritonServer
from tests.chaos_checks import (
    AuditRecord,
    Call,
    RolloutRun,
    Sample,
    Verdict,
    Window,
    Write,
    check_calls,
    check_convergence,
    check_history,
    check_resources,
    check_rollouts,
)
from tests.faults.proxy import FaultProxy
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess, triton_backend
from tests.oip import linear_request

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
PREFIX = "/tensorgate/chaos"
DEMO_MODELS = REPO_ROOT / "deploy" / "demo" / "models"
BACKENDS = ("triton-a", "triton-b")
# route -> its backends; GUARDED has a fallback to its other backend
ROUTES = {
    "guarded": ("triton-a", "triton-b"),
    "solo_a": ("triton-a",),
    "solo_b": ("triton-b",),
    "linear": ("triton-a", "triton-b"),  # the rollouts' route
    "knob": ("triton-a", "triton-b"),  # the admin writers' route
}
WITH_FALLBACK = ("guarded",)
UNKNOWN_TRAILER = "tensorgate-unknown-revision-bin"
# Envoy's stat prefixes of the clusters that carry the routes' calls (resources.py): backend
# clusters (shared by every route on a backend), fallback chains and shadows. Not the gateway's.
ENVOY_CLUSTERS = ("cluster.tgb|", "cluster.tga|", "cluster.tgs|")

MANDATORY = (
    "kill_driver",  # first, while the first rollout runs
    "kill_backend",
    "pause_backend",
    "latency_link",
    "reset_link",
    "blackhole_link",
    "kill_etcd_member",
    "kill_etcd_leader",
    "pause_etcd_member",
    "quorum_loss",
    "kill_replica",
    "kill_worker",
    "pause_replica",
    "kill_envoy",
    "pause_envoy",
)


@dataclasses.dataclass
class Settings:
    seed: int = 1
    duration: float = 120.0  # seconds of faults and load before the final quorum loss
    load_interval: float = 0.1  # pause of each load worker between calls
    call_timeout: float = 4.0
    writers: int = 3
    write_pause: tuple[float, float] = (0.4, 1.2)  # ~3.7 writes/s: 30 min stay in the audit log
    hold: tuple[float, float] = (1.5, 3.5)  # seconds a fault lasts
    gap: tuple[float, float] = (0.5, 1.5)  # seconds between faults
    # Seconds after a heal still counted as down: the gateway's designed recovery is its backend
    # channel's reconnect backoff cap (2 s, adapters/grpc_common.py; +20 % jitter) then the
    # breaker's open time (1 s) and its trial call: ~3.5 s. Clients reconnecting to a restarted
    # entry take up to ~2.2 s (their own backoff).
    slack: float = 4.0
    convergence_bound: float = 2.0
    rss_bound_mib: int = 600
    rss_growth: float = 1.6
    fd_slack: int = 40
    warmup: float = 20.0  # seconds of a process's life before its RSS and fds are its baseline
    steps: tuple[int, ...] = (20, 50, 100)
    min_step: float = 3.0
    min_requests: int = 15


def gateway_config(
    proxies: dict[str, FaultProxy], endpoints: list[str], replica: str,
    xds: int | None = None, listen: int | None = None,
) -> dict:  # fmt: skip
    def v(name: str, backend: str, weight: int) -> dict:
        return {"name": name, "backend": backend, "backend_model": "demo_linear",
                "backend_version": "1", "weight": weight}  # fmt: skip

    retry = {"max_attempts": 2, "retry_on": ["UNAVAILABLE", "DEADLINE_EXCEEDED"],
             "base_delay": "0.01s"}  # fmt: skip
    config = {
        "backends": [
            triton_backend(proxies[b].address, b, per_try_timeout="1s",
                           circuit_breaker={"consecutive_failures": 3, "open_duration": "1s"})
            for b in BACKENDS
        ],
        "routes": [
            {"model": "guarded", "variants": [v("p", "triton-a", 100), v("q", "triton-b", 0)],
             "policy": {"fallback": [{"variant": "q"}], "retry": retry}},
            {"model": "solo_a", "variants": [v("only", "triton-a", 1)]},
            {"model": "solo_b", "variants": [v("only", "triton-b", 1)]},
            {"model": "linear", "variants": [v("stable", "triton-a", 100),
                                             v("canary", "triton-b", 0)]},
            {"model": "knob", "variants": [v("x", "triton-a", 50), v("y", "triton-b", 50)]},
        ],
        "lifecycle": {"health_check_interval": "0.5s", "shutdown_grace": "2s"},
        "store": {"etcd": {"endpoints": endpoints, "prefix": PREFIX, "replica": replica,
                           "timeout": "2s", "lease_ttl": "2s"}},
    }  # fmt: skip
    if xds is not None:
        config["listeners"] = {"xds": f"127.0.0.1:{xds}"}
        config["envoy"] = {"listen": f"127.0.0.1:{listen}"}
    return config


class ChaosTriton(TritonServer):
    """A Triton that, once killed, removes only the python-backend shared-memory regions its own
    processes mapped. TritonServer's cleanup removes every region created since its start(),
    which with two Tritons started together includes the other one's: after a kill -9 of one,
    the other's restart failed ("Unable to initialize shared memory key", a double free in the
    stub, not ready in 90 s). Serves only demo_linear: a restart takes ~3 s, not ~12 s."""

    _mine: set[Path] = set()

    def _regions(self) -> set[Path]:
        out = set()
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit() or os.getpgid(int(entry.name)) != self.pid:
                    continue
                maps = (entry / "maps").read_text()
            except (OSError, ProcessLookupError):
                continue
            for line in maps.splitlines():
                if "triton_python_backend_shm_region_" in line:
                    path = line.split(None, 5)[-1].removesuffix(" (deleted)")
                    out.add(Path(path))
        return out

    def _wait_ready(self) -> None:
        super()._wait_ready()
        self._mine = self._regions()

    def kill(self) -> None:
        if self.running:
            self._mine = self._mine | self._regions()
        super().kill()

    def _cleanup(self) -> None:
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        for region in self._mine:
            region.unlink(missing_ok=True)
        self._mine = set()


def model_repository() -> Path:
    """A repository holding only deploy/demo/models/demo_linear."""
    path = Path(tempfile.mkdtemp(prefix="chaos-models-"))
    shutil.copytree(DEMO_MODELS / "demo_linear", path / "demo_linear")
    return path


class Fleet:
    """Starts and holds every process; the fault primitives act on them."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.members: list[EtcdMember] = []
        self.tritons: dict[str, TritonServer] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.replicas: dict[str, GatewayProcess] = {}
        self.envoys: dict = {}  # name -> (Envoy, feeding replica)
        self.envoy_addresses: dict[str, str] = {}
        self.models: Path | None = None

    def start(self) -> None:
        from tests.test_envoy_dataplane import Envoy, write_bootstrap

        self.members = cluster_of(3, election_timeout_ms=1000)
        with ThreadPoolExecutor(4) as pool:
            self.models = model_repository()
            tritons = {b: pool.submit(ChaosTriton(self.models).start) for b in BACKENDS}
            start_all(self.members)
            self.tritons = {b: f.result() for b, f in tritons.items()}
        for b, t in self.tritons.items():
            self.proxies[b] = FaultProxy(t.address).start()
        endpoints = [m.endpoint for m in self.members]
        feeds = {"r1": "e1", "r2": "e2"}
        for name in ("r0", "r1", "r2"):
            xds = listen = None
            if name in feeds:
                xds, listen = free_port(), free_port()
                self.envoy_addresses[feeds[name]] = f"127.0.0.1:{listen}"
            config = gateway_config(self.proxies, endpoints, name, xds, listen)
            gw = GatewayProcess(config, admin=True, workers=2 if name == "r0" else 1)
            gw.config["admin"]["history"] = 1000  # ListRevisions sees the whole run
            gw.config_path.write_text(yaml.safe_dump(gw.config, sort_keys=False))
            self.replicas[name] = gw
            gw.start()
        for i, (replica, envoy) in enumerate(feeds.items()):
            gw = self.replicas[replica]
            admin_port = free_port()
            e = Envoy(write_bootstrap(gw, admin_port, envoy), admin_port, 71 + i)
            e.start()
            self.envoys[envoy] = (e, replica)

    def stop(self) -> None:
        for e, _ in self.envoys.values():
            with contextlib.suppress(Exception):
                os.killpg(e.pid, signal.SIGCONT)
            e.stop()
        for gw in self.replicas.values():
            if gw.proc is not None and gw.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gw.proc.pid, signal.SIGCONT)
            gw.stop()
        for p in self.proxies.values():
            p.stop()
        for t in self.tritons.values():
            if t.running:
                t._signal_group(signal.SIGCONT)
            t.stop()
        for m in self.members:
            m.wipe()
        if self.models is not None:
            shutil.rmtree(self.models, ignore_errors=True)

    # --- primitives (blocking; run in threads) --------------------------------------------

    def live_member(self) -> EtcdMember:
        for m in self.members:
            if m.running and m.health(0.5):
                return m
        raise RuntimeError("no etcd member answers")

    def etcd_get(self, key: str, prefix: bool = False) -> list[tuple[str, bytes]]:
        args = ["get", PREFIX + key, "-w", "json"] + (["--prefix"] if prefix else [])
        for _ in range(40):
            try:
                out = json.loads(self.live_member().etcdctl(*args, timeout=10))
                return [(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv["value"]))
                        for kv in out.get("kvs", [])]  # fmt: skip
            except (RuntimeError, subprocess.TimeoutExpired, ValueError):
                time.sleep(0.5)
        raise RuntimeError(f"cannot read {key} from etcd")

    def head(self) -> int:
        found = self.etcd_get("/state/head")
        return int(found[0][1]) if found else 0

    def driver(self) -> str:
        found = self.etcd_get("/driver")
        return found[0][1].decode().rpartition(".")[0] if found else ""

    def audit(self) -> list[AuditRecord]:
        out = []
        for _, value in self.etcd_get("/audit/", prefix=True):
            e = store_pb2.AuditEntry.FromString(value)
            out.append(AuditRecord(e.revision, e.method, e.summary, e.who))
        return sorted(out, key=lambda a: a.revision)

    def leader(self) -> EtcdMember:
        return leader_of(self.members, self.live_member())

    def restart_replica(self, name: str) -> None:
        gw = self.replicas[name]
        if gw.proc is not None and gw.proc.poll() is None:
            return
        gw._log.close()
        # GatewayProcess.start() truncates its log: keep each life's
        lives = len(list(Path(gw.directory).glob("gateway.*.log")))
        gw.log_path.rename(Path(gw.directory) / f"gateway.{lives + 1}.log")
        deadline = time.monotonic() + 90
        while True:
            try:
                gw.start()
                return
            except RuntimeError:  # e.g. the store did not answer at start-up: try again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill_replica(self, name: str) -> None:
        gw = self.replicas[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait()

    def signal_replica(self, name: str, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.replicas[name].proc.pid, sig)


class Chaos:
    def __init__(self, settings: Settings, out=print) -> None:
        self.s = settings
        self.out = out
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self.fleet = Fleet(settings)
        self.calls: list[Call] = []
        self.writes: list[Write] = []
        self.windows: list[Window] = []
        self.observed: dict[str, list[tuple[float, int]]] = {}
        self.samples: list[Sample] = []
        self.rollouts: list[RolloutRun] = []
        self.faults: dict[str, int] = {}
        self.keys = itertools.count(1000)
        self.stop_load = asyncio.Event()
        self.stop_writers = asyncio.Event()
        self.stop_observers = asyncio.Event()
        self.no_more_rollouts = asyncio.Event()
        self.rollout_done = asyncio.Event()
        self.admin: dict[str, admin_pb2_grpc.AdminServiceStub] = {}
        self.rng = random.Random(settings.seed)
        self.driver_killed_mid_rollout = False
        self.heal_at = 0.0
        self.converged: tuple[float | None, list[str], int] = (None, [], 0)
        self.streams_left: dict[str, float] = {}
        self.ejected: dict[str, dict[str, int]] = {}
        self.scrape_errors = 0
        # Held while a fault acts on a backend, so the supervisor never restarts one mid-fault.
        self.backend_locks = {b: asyncio.Lock() for b in BACKENDS}
        self.crashes: list[tuple[str, float, int | None]] = []  # (backend, t, exit code)

    def event(self, text: str) -> None:
        t = time.monotonic() - self.t0
        self.events.append((t, text))
        if os.environ.get("CHAOS_VERBOSE"):
            self.out(f"[{t:7.2f}] {text}")

    # --- schedule ------------------------------------------------------------------------------

    def schedule(self) -> list[tuple[str, int, float, float]]:
        """(kind, target pick, hold, gap) from the seed: every mandatory kind once (the driver
        first), then random kinds."""
        rng = random.Random(self.s.seed)
        rest = list(MANDATORY[1:])
        rng.shuffle(rest)
        kinds = [MANDATORY[0], *rest]
        extra = [k for k in MANDATORY if k != "quorum_loss"] + ["latency_link", "reset_link",
                                                                "kill_etcd_leader"]  # fmt: skip
        out = []
        # enough for the duration: faults_loop stops once it has passed (a fault takes >= 2 s)
        for i in range(len(kinds) + int(self.s.duration / 2) + 1):
            kind = kinds[i] if i < len(kinds) else rng.choice(extra)
            hold = rng.uniform(*self.s.hold)
            gap = rng.uniform(*self.s.gap)
            out.append((kind, rng.randrange(1 << 30), hold, gap))
        return out

    # --- load ----------------------------------------------------------------------------------

    def entries(self) -> dict[str, str]:
        out = {n: gw.address for n, gw in self.fleet.replicas.items()}
        out.update(self.fleet.envoy_addresses)
        return out

    async def load_worker(self, entry: str, address: str, route: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = linear_request(route)
            while not self.stop_load.is_set():
                start = time.monotonic()
                detail = ""
                try:
                    await stub.ModelInfer(request, timeout=self.s.call_timeout)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code, detail = err.code().name, (err.details() or "")[:90]
                self.calls.append(
                    Call(entry, route, start - self.t0, time.monotonic() - self.t0, code, detail)
                )
                await asyncio.sleep(self.s.load_interval)

    # --- admin ---------------------------------------------------------------------------------

    def live_replicas(self) -> list[str]:
        return [n for n, gw in self.fleet.replicas.items()
                if gw.proc is not None and gw.proc.poll() is None]  # fmt: skip

    async def writer(self, name: str, rng: random.Random) -> None:
        while not self.stop_writers.is_set():
            replica = rng.choice(sorted(self.admin))
            stub = self.admin[replica]
            try:
                table = await stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN,
                                                 timeout=3)  # fmt: skip
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
                continue
            key = next(self.keys)
            expected = table.revision.number
            request = admin_pb2.SetVariantWeightsRequest(
                model="knob", weights={"x": key, "y": rng.randint(1, 100)},
                expected_revision=expected,
            )  # fmt: skip
            sent = time.monotonic()
            write = Write(key, f"{name}@{replica}", sent, 0.0, expected, "unknown")
            try:
                reply = await stub.SetVariantWeights(request, metadata=ADMIN, timeout=6)
                write.outcome, write.revision = "ack", reply.revision.number
            except grpc.aio.AioRpcError as err:
                write.detail = f"{err.code().name}: {err.details()}"
                trailer = dict(err.trailing_metadata() or ()).get(UNKNOWN_TRAILER)
                if trailer:
                    write.revision = admin_pb2.Revision.FromString(trailer).number
                elif err.code() == grpc.StatusCode.FAILED_PRECONDITION or (
                    err.code() == grpc.StatusCode.UNAVAILABLE
                    and "nothing was changed" in (err.details() or "")
                ):
                    write.outcome = "refused"
                elif err.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.PERMISSION_DENIED):  # fmt: skip
                    write.outcome = "refused"
            write.answered = time.monotonic()
            self.writes.append(write)
            await asyncio.sleep(rng.uniform(*self.s.write_pause))

    async def rollout_loop(self) -> None:
        """Rollouts one after the other on `linear` until no_more_rollouts; each polled until
        it ends."""
        while not self.no_more_rollouts.is_set():
            run = await self.start_rollout()
            if run is None:
                return
            while True:
                await asyncio.sleep(0.5)
                state = await self.rollout_state()
                if state is None:
                    continue
                run.polled.append((time.monotonic() - self.t0, state))
                if state != "RUNNING":
                    run.final = state
                    self.event(f"rollout {len(self.rollouts)} ended {state}")
                    break
            await asyncio.sleep(1.0)
        self.rollout_done.set()

    async def rollout_state(self) -> str | None:
        live = [r for r in self.live_replicas() if r in self.admin]
        if not live:
            return None
        try:
            reply = await self.admin[self.rng.choice(live)].GetRollout(
                admin_pb2.GetRolloutRequest(model="linear"), metadata=ADMIN, timeout=3
            )
        except grpc.aio.AioRpcError:
            return None
        return admin_pb2.Rollout.State.Name(reply.rollout.state).removeprefix("STATE_")

    async def start_rollout(self) -> RolloutRun | None:
        while not self.no_more_rollouts.is_set():
            live = [r for r in self.live_replicas() if r in self.admin]
            stub = self.admin[self.rng.choice(live)] if live else None
            try:
                table = await stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN,
                                                 timeout=3)  # fmt: skip
                (route,) = [r for r in table.routes if r.model == "linear"]
                weights = {v.name: v.weight for v in route.variants}
                canary = min(weights, key=lambda n: (weights[n], n))
                baseline = "stable" if canary == "canary" else "canary"
                first = await asyncio.to_thread(self.fleet.head) + 1
                request = admin_pb2.StartRolloutRequest(
                    model="linear", canary=canary, baseline=baseline, steps=list(self.s.steps),
                    min_step_duration={"seconds": int(self.s.min_step),
                                       "nanos": int(self.s.min_step % 1 * 1e9)},
                    min_requests=self.s.min_requests, max_p99_factor=10,
                )  # fmt: skip
                await stub.StartRollout(request, metadata=ADMIN, timeout=6)
            except (grpc.aio.AioRpcError, AttributeError, ValueError) as err:
                detail = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
                self.event(f"rollout start failed: {detail}")
                await asyncio.sleep(1.0)
                if await self.rollout_state() != "RUNNING":
                    continue
            if self.rollouts:
                self.rollouts[-1].last_revision = first
            run = RolloutRun("linear", canary, baseline, self.s.steps, first, 1 << 62, "RUNNING",
                             [])  # fmt: skip
            self.rollouts.append(run)
            self.event(f"rollout {len(self.rollouts)} started: {canary} over {baseline}")
            return run
        return None

    # --- observers -----------------------------------------------------------------------------

    def scrape(self, url: str) -> dict[str, dict[str, float]]:
        """{metric name: {worker label or "": value}} for the series the checks read."""
        out: dict[str, dict[str, float]] = {}
        with urllib.request.urlopen(url, timeout=1.5) as reply:
            for line in reply.read().decode().splitlines():
                if not line.startswith(("tensorgate_route_revision",
                                        "tensorgate_backend_requests_in_flight")):  # fmt: skip
                    continue
                name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else (
                    line.split(" ")[0], "", "")  # fmt: skip
                worker = ""
                if 'worker="' in rest:
                    worker = rest.split('worker="')[1].split('"')[0]
                value = float(line.rsplit(" ", 1)[1])
                bucket = out.setdefault(name, {})
                bucket[worker] = bucket.get(worker, 0.0) + value
        return out

    async def observe_revisions(self) -> None:
        while not self.stop_observers.is_set():
            for name in self.live_replicas():
                gw = self.fleet.replicas[name]
                try:
                    found = await asyncio.to_thread(self.scrape, gw.metrics_url)
                except Exception:  # killed or paused mid-scrape: next round
                    self.scrape_errors += 1
                    continue
                t = time.monotonic() - self.t0
                for worker, rev in found.get("tensorgate_route_revision", {}).items():
                    key = f"{name}/w{worker}" if worker else name
                    self.observed.setdefault(key, []).append((t, int(rev)))
            await asyncio.sleep(0.25)

    def sample_resources(self) -> None:
        t = time.monotonic() - self.t0
        for name in self.live_replicas():
            for pid in self.fleet.replicas[name].pids():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines()
                               if line.startswith("VmRSS:"))  # fmt: skip
                    fds = len(os.listdir(f"/proc/{pid}/fd"))
                except (OSError, StopIteration, ValueError):
                    continue
                self.samples.append(Sample(t, f"{name}/{pid}", rss, fds))

    async def observe_resources(self) -> None:
        while not self.stop_observers.is_set():
            await asyncio.to_thread(self.sample_resources)
            await asyncio.sleep(2.0)

    # --- faults --------------------------------------------------------------------------------

    def window(self, target: str, start: float, fault: str) -> None:
        self.windows.append(Window(target, start - self.t0, time.monotonic() - self.t0, fault))

    async def inject(self, kind: str, pick: int, hold: float) -> None:
        f = self.fleet
        rng = random.Random(pick)
        backend = BACKENDS[pick % 2]
        replica = ("r0", "r1", "r2")[pick % 3]
        envoy = ("e1", "e2")[pick % 2]
        run = asyncio.to_thread
        self.faults[kind] = self.faults.get(kind, 0) + 1
        start = time.monotonic()
        if kind == "kill_backend":
            async with self.backend_locks[backend]:
                self.event(f"kill -9 {backend}")
                await run(f.tritons[backend].kill)
                await asyncio.sleep(hold)
                await run(f.tritons[backend].start)
                self.window(backend, start, kind)
                self.event(f"{backend} restarted")
        elif kind == "pause_backend":
            async with self.backend_locks[backend]:
                self.event(f"SIGSTOP {backend}")
                f.tritons[backend]._signal_group(signal.SIGSTOP)
                await asyncio.sleep(hold)
                f.tritons[backend]._signal_group(signal.SIGCONT)
                self.window(backend, start, kind)
                self.event(f"SIGCONT {backend}")
        elif kind in ("latency_link", "reset_link", "blackhole_link"):
            proxy = f.proxies[backend]
            if kind == "latency_link":
                seconds = rng.choice((0.05, 0.1))
                self.event(f"latency {seconds} s on the link to {backend}")
                await run(proxy.set_latency, seconds)
            elif kind == "reset_link":
                self.event(f"resets on the link to {backend}")
                await run(proxy.reset)
            else:
                self.event(f"blackhole on the link to {backend}")
                await run(proxy.blackhole)
            await asyncio.sleep(hold)
            await run(proxy.heal)
            if kind != "latency_link":  # latency must cost no call
                self.window(backend, start, kind)
            self.event(f"link to {backend} healed")
        elif kind in ("kill_etcd_member", "kill_etcd_leader", "pause_etcd_member"):
            if kind == "kill_etcd_leader":
                member = await run(f.leader)
            else:
                member = f.members[pick % 3]
            what = "leader " if kind == "kill_etcd_leader" else ""
            if kind == "pause_etcd_member":
                self.event(f"SIGSTOP etcd {member.member}")
                member.pause()
                await asyncio.sleep(hold)
                member.resume()
                self.event(f"SIGCONT etcd {member.member}")
            else:
                self.event(f"kill -9 etcd {what}{member.member}")
                await run(member.kill)
                await asyncio.sleep(hold)
                await run(member.start)
                self.event(f"etcd {member.member} restarted")
        elif kind == "quorum_loss":
            await self.quorum_loss(pick, hold)
        elif kind in ("kill_replica", "kill_driver"):
            if kind == "kill_driver":
                replica = await run(f.driver) or replica
                running = await self.rollout_state() == "RUNNING"
                self.driver_killed_mid_rollout |= running
                what = f"the rollout's driver ({'a rollout running' if running else 'idle'}) "
            else:
                what = ""
            self.event(f"kill -9 replica {what}{replica}")
            await run(f.kill_replica, replica)
            await asyncio.sleep(hold)
            await run(f.restart_replica, replica)
            self.window(replica, start, kind)
            self.event(f"replica {replica} restarted")
        elif kind == "kill_worker":
            gw = f.replicas["r0"]
            workers = sorted(p for p in gw.pids() if p != gw.proc.pid)
            if workers:
                victim = workers[pick % len(workers)]
                self.event(f"kill -9 worker pid {victim} of r0")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while len([p for p in gw.pids() if p != gw.proc.pid]) < 2 or victim in gw.pids():
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # the new worker binds and serves
                self.window("r0", start, kind)
                self.event("r0 has 2 workers again")
        elif kind == "pause_replica":
            self.event(f"SIGSTOP replica {replica}")
            f.signal_replica(replica, signal.SIGSTOP)
            await asyncio.sleep(hold)
            f.signal_replica(replica, signal.SIGCONT)
            self.window(replica, start, kind)
            self.event(f"SIGCONT replica {replica}")
        elif kind in ("kill_envoy", "pause_envoy"):
            e, _ = f.envoys[envoy]
            if kind == "kill_envoy":
                self.count_ejections(await run(self.ejections, envoy))
                self.event(f"kill -9 Envoy {envoy}")
                await run(e.kill)
                await asyncio.sleep(hold)
                await run(e.start)
                self.event(f"Envoy {envoy} restarted")
            else:
                self.event(f"SIGSTOP Envoy {envoy}")
                os.killpg(e.pid, signal.SIGSTOP)
                await asyncio.sleep(hold)
                os.killpg(e.pid, signal.SIGCONT)
                self.event(f"SIGCONT Envoy {envoy}")
            self.window(envoy, start, kind)
        else:
            raise ValueError(kind)

    async def supervise_backends(self) -> None:
        """Restart a Triton that exited on its own, as a container's restart policy would, and
        count the time it was gone as a down window. Triton 2.51's python backend can abort after
        a SIGSTOP/SIGCONT of its process group (`boost::interprocess::lock_exception` thrown in
        libtriton_python.so while executing, seen once in a 30-minute run): no scheduled fault
        explains the calls that then fail, and without a restart the backend stayed dead until
        the schedule happened to kill it 56 s later."""
        alive_at = {b: time.monotonic() for b in BACKENDS}
        while not self.stop_observers.is_set():
            for backend, triton in self.fleet.tritons.items():
                lock = self.backend_locks[backend]
                if lock.locked():
                    alive_at[backend] = time.monotonic()
                    continue
                async with lock:
                    if triton.running:
                        alive_at[backend] = time.monotonic()
                        continue
                    code = triton._proc.returncode if triton._proc is not None else None
                    t = alive_at[backend] - self.t0
                    self.crashes.append((backend, round(t, 2), code))
                    self.event(f"{backend} exited on its own (code {code}): restarting it")
                    await asyncio.to_thread(triton.kill)  # reaps it, removes its regions
                    await asyncio.to_thread(triton.start)
                    self.window(backend, alive_at[backend], "crash")
                    self.event(f"{backend} restarted after its crash")
                    alive_at[backend] = time.monotonic()
            await asyncio.sleep(0.25)

    async def quorum_loss(self, pick: int, hold: float, before_heal=None) -> None:
        f = self.fleet
        lost = [m for i, m in enumerate(f.members) if i != pick % 3]
        self.event(f"etcd quorum lost: kill -9 {lost[0].member}, {lost[1].member}")
        for m in lost:
            await asyncio.to_thread(m.kill)
        await asyncio.sleep(hold)
        if before_heal is not None:
            await before_heal()
        await asyncio.to_thread(start_all, lost)
        self.event("etcd quorum back")

    async def faults_loop(self, plan) -> None:
        """The plan in order: every mandatory kind, then more until `duration` has passed."""
        started = time.monotonic()
        for i, (kind, pick, hold, gap) in enumerate(plan):
            if i >= len(MANDATORY) and time.monotonic() - started >= self.s.duration:
                return
            await self.inject(kind, pick, hold)
            await asyncio.sleep(gap)

    # --- the run -------------------------------------------------------------------------------

    async def main(self) -> None:
        s = self.s
        channels = {}
        for name, gw in self.fleet.replicas.items():
            channels[name] = grpc.aio.insecure_channel(gw.admin_address)
            self.admin[name] = admin_pb2_grpc.AdminServiceStub(channels[name])
        load = [asyncio.create_task(self.load_worker(e, a, r))
                for e, a in self.entries().items() for r in ROUTES]  # fmt: skip
        observers = [asyncio.create_task(self.observe_revisions()),
                     asyncio.create_task(self.observe_resources()),
                     asyncio.create_task(self.supervise_backends())]  # fmt: skip
        writers = [asyncio.create_task(self.writer(f"w{i}", random.Random(s.seed * 100 + i)))
                   for i in range(s.writers)]  # fmt: skip
        await asyncio.sleep(2.0)
        rollouts = asyncio.create_task(self.rollout_loop())
        await asyncio.sleep(4.0)  # the first rollout's first step is under way
        plan = self.schedule()
        self.event(f"schedule: {len(plan)} faults: {', '.join(k for k, *_ in plan)}")
        await self.faults_loop(plan)
        # the end: no new rollout; the running one ends; then a last quorum loss with the
        # writers still writing, stopped before it heals
        self.no_more_rollouts.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.rollout_done.wait(), 120)
        if self.rollouts and self.rollouts[-1].final == "RUNNING":
            self.event("the last rollout did not end within 120 s")

        async def stop_writers() -> None:
            await asyncio.sleep(1.0)
            self.stop_writers.set()
            await asyncio.gather(*writers, return_exceptions=True)

        self.faults["quorum_loss"] = self.faults.get("quorum_loss", 0) + 1
        await self.quorum_loss(self.rng.randrange(3), 2.0, stop_writers)
        self.heal_at = time.monotonic()
        self.converged = await self.convergence()
        await asyncio.sleep(2.0)
        self.stop_load.set()
        await asyncio.gather(*load, return_exceptions=True)
        rollouts.cancel()
        await asyncio.sleep(2.0)  # every call has ended: nothing may stay in flight
        await asyncio.to_thread(self.sample_resources)
        self.stop_observers.set()
        await asyncio.gather(*observers, return_exceptions=True)
        self.streams_left = await asyncio.to_thread(self.in_flight)
        self.count_ejections(await asyncio.to_thread(self.ejections))
        for channel in channels.values():
            await channel.close()

    def count_ejections(self, found: dict[str, dict[str, int]]) -> None:
        for envoy, clusters in found.items():
            mine = self.ejected.setdefault(envoy, {})
            for cluster, n in clusters.items():
                mine[cluster] = mine.get(cluster, 0) + n

    def ejections(self, only: str | None = None) -> dict[str, dict[str, int]]:
        """Per Envoy, outlier ejections enforced per backend cluster (Envoy's breaker)."""
        out: dict[str, dict[str, int]] = {}
        for name, (e, _) in self.fleet.envoys.items():
            if only is not None and name != only:
                continue
            found = {}
            for line in e.admin("/stats?filter=ejections_enforced_total").splitlines():
                stat, _, value = line.partition(": ")
                if stat.startswith(ENVOY_CLUSTERS) and int(value or 0):
                    found[stat.split(".")[1]] = int(value)
            out[name] = found
        return out

    def in_flight(self) -> dict[str, float]:
        out = {}
        for name in self.live_replicas():
            found = self.scrape(self.fleet.replicas[name].metrics_url)
            for worker, value in found.get("tensorgate_backend_requests_in_flight", {}).items():
                out[f"{name}/w{worker}" if worker else name] = value
        for name, (e, _) in self.fleet.envoys.items():
            active = 0
            for line in e.admin("/stats?filter=upstream_rq_active").splitlines():
                if line.startswith(ENVOY_CLUSTERS):
                    active += int(line.rsplit(": ", 1)[1])
            out[name] = float(active)
        return out

    async def convergence(self) -> tuple[float | None, list[str], int]:
        """Seconds from the last heal until every replica worker and Envoy serves the head."""
        deadline = self.heal_at + 15.0
        lagging: list[str] = []
        head = 0
        expected: dict[int, tuple[dict, str]] = {}
        while time.monotonic() < deadline:
            head = await asyncio.to_thread(self.fleet.head)
            lagging = []
            for name in self.live_replicas():
                try:
                    found = await asyncio.to_thread(
                        self.scrape, self.fleet.replicas[name].metrics_url
                    )
                except Exception:  # not answering yet
                    lagging.append(name)
                    continue
                for worker, rev in found.get("tensorgate_route_revision", {}).items():
                    if int(rev) != head:
                        lagging.append(f"{name}/w{worker}" if worker else name)
            if not lagging and head not in expected:
                expected[head] = await asyncio.to_thread(self.expected_envoy, head)
            for name, (e, _) in self.fleet.envoys.items():
                if head not in expected or not await asyncio.to_thread(
                    self.envoy_matches, e, *expected[head]
                ):
                    lagging.append(name)
            if not lagging:
                took = time.monotonic() - self.heal_at
                self.event(f"converged on revision {head} in {took:.2f} s")
                return took, [], head
            await asyncio.sleep(0.05)
        return None, lagging, head

    def expected_envoy(self, head: int) -> tuple[dict, str]:
        """The weights layer and route table version an Envoy must have at revision `head`:
        compiled here, with the gateway's own compiler, from that revision's table."""
        from gateway.controlplane.config import from_dict
        from gateway.controlplane.envoy.compile import compile_config
        from gateway.controlplane.envoy.resources import ROUTE, RUNTIME, WEIGHTS_LAYER

        gw = self.fleet.replicas["r1"]
        with grpc.insecure_channel(gw.admin_address) as channel:
            table = admin_pb2_grpc.AdminServiceStub(channel).GetRouteTable(
                admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=5
            )
        assert table.revision.number == head, (table.revision.number, head)
        config = from_dict(gw.config)
        del config.routes[:]
        config.routes.extend(table.routes)
        resources = compile_config(config)
        layer = resources.by_type[RUNTIME][WEIGHTS_LAYER].layer
        weights = {k: float(v) for k, v in layer.items()}
        return weights, resources.by_type[ROUTE]

    @staticmethod
    def envoy_matches(envoy, weights: dict, routes: dict) -> bool:
        from gateway.controlplane.envoy.resources import content_version

        try:
            runtime = json.loads(envoy.admin("/runtime"))
            dump = json.loads(envoy.admin("/config_dump?resource=dynamic_route_configs"))
        except (OSError, ValueError):
            return False
        entries = runtime.get("entries", {})
        for key, value in weights.items():
            final = entries.get(key, {}).get("final_value")
            if final is None or float(final) != value:
                return False
        compared = 0
        for config in dump.get("configs", []):
            name = config.get("route_config", {}).get("name")
            if name in routes:
                if config.get("version_info") != content_version({name: routes[name]}):
                    return False
                compared += 1
        return bool(weights) and compared > 0  # nothing compared: nothing known

    def verdicts(self) -> list[Verdict]:
        s = self.s
        audit = self.fleet.audit()
        seconds, lagging, head = self.converged
        return [
            check_history(
                self.writes, audit, self.observed, min_samples=int(self.heal_at - self.t0)
            ),
            check_calls(self.calls, ROUTES, WITH_FALLBACK, self.windows, slack=s.slack),
            check_convergence(seconds, s.convergence_bound, lagging, head),
            check_rollouts(self.rollouts, audit),
            check_resources(
                self.samples,
                rss_bound=s.rss_bound_mib * 2**20,
                rss_growth=s.rss_growth,
                fd_slack=s.fd_slack,
                streams_left=self.streams_left,
                warmup=s.warmup,
            ),
        ]

    def run(self) -> dict:
        started = time.monotonic()
        try:
            self.fleet.start()
            self.t0 = time.monotonic()
            self.event("fleet up")
            asyncio.run(self.main())
            verdicts = self.verdicts()
        finally:
            self.fleet.stop()
        return self.report(verdicts, time.monotonic() - started)

    def report(self, verdicts: list[Verdict], wall: float) -> dict:
        outcomes: dict[str, int] = {}
        for w in self.writes:
            outcomes[w.outcome] = outcomes.get(w.outcome, 0) + 1
        per_entry: dict[str, int] = {}
        for c in self.calls:
            per_entry[c.entry] = per_entry.get(c.entry, 0) + 1
        return {
            "seed": self.s.seed,
            "duration": self.s.duration,
            "wall_seconds": round(wall, 1),
            "fault_seconds": round(self.heal_at - self.t0, 1),
            "ok": all(v.ok for v in verdicts),
            "verdicts": [dataclasses.asdict(v) for v in verdicts],
            "faults": dict(sorted(self.faults.items())),
            "driver_killed_mid_rollout": self.driver_killed_mid_rollout,
            "calls": len(self.calls),
            "calls_per_entry": per_entry,
            "writes": outcomes,
            "rollouts": [r.final for r in self.rollouts],
            "envoy_ejections": self.ejected,
            "scrape_errors": self.scrape_errors,
            "backend_crashes": self.crashes,
            # for analysis after the run: every failed call and every down window
            "failed_calls": [dataclasses.astuple(c) for c in self.calls if c.code != "OK"],
            "windows": [dataclasses.astuple(w) for w in self.windows],
            "events": [f"{t:8.2f} {text}" for t, text in self.events],
        }


def render(report: dict) -> str:
    lines = [
        f"chaos run, seed {report['seed']}: {report['fault_seconds']} s of faults, "
        f"{report['wall_seconds']} s in all",
        f"faults: {sum(report['faults'].values())} "
        f"({', '.join(f'{k} {n}' for k, n in report['faults'].items())}); the driver killed "
        f"mid-rollout: {'yes' if report['driver_killed_mid_rollout'] else 'no'}",
        f"calls: {report['calls']} ("
        + ", ".join(f"{k} {n}" for k, n in report["calls_per_entry"].items())
        + ")",
        f"admin writes: {', '.join(f'{k} {n}' for k, n in sorted(report['writes'].items()))}; "
        f"rollouts: {', '.join(report['rollouts']) or 'none'}",
    ]
    lines.append(
        "Envoy outlier ejections (its breaker) per backend cluster: "
        + "; ".join(f"{e}: {', '.join(f'{c} {n}' for c, n in found.items()) or 'none'}"
                    for e, found in report.get("envoy_ejections", {}).items())
    )  # fmt: skip
    crashes = report.get("backend_crashes", [])
    lines.append(
        "backends that exited on their own (restarted, counted down): "
        + (", ".join(f"{b} at {t:.1f} s (code {c})" for b, t, c in crashes) or "none")
    )
    for v in report["verdicts"]:
        lines.append(f"{'PASS' if v['ok'] else 'FAIL'} {v['name']}: {v['figure']}")
        lines += [f"    {p}" for p in v["problems"]]
    if not report["ok"]:
        lines.append(f"FAILED: replay with `python -m bench.chaos --seed {report['seed']} "
                     f"--duration {report['duration']:g}`; event log:")  # fmt: skip
        lines += [f"  {e}" for e in report["events"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of faults")
    parser.add_argument("--json", help="write the report (with the event log) here")
    args = parser.parse_args(argv)
    chaos = Chaos(Settings(seed=args.seed, duration=args.duration))
    report = chaos.run()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO_ROOT).stdout.strip()  # fmt: skip
    report["commit"] = commit
    report["machine"] = f"{platform.node()} {os.cpu_count()} cores {platform.python_version()}"
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
