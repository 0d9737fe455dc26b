"""Gateway overhead: the same closed-loop load, straight to Triton and through the gateway.

Starts one real Triton on deploy/demo/models and one gateway (a subprocess on this venv's
python) in front of it, checks both answer demo_linear v1 correctly, then for each concurrency
level measures the targets in mirrored order (direct, gateway, gateway, direct; --rounds times;
each leg gets --duration / (2 * rounds) seconds after its own warm-up) so drift on the shared
machine hits every target alike. Prints a table (with each leg's rate, to show the spread) and
the gateway/direct ratios, and writes everything to bench/results/*.json.

With --reference-proxy a third target joins (direct, gateway, pyproxy, pyproxy, gateway,
direct): bench/reference_proxy.py, a bare grpc.aio proxy forwarding bytes, i.e. the cost of a
Python gRPC hop with none of the gateway's work.

    python -m bench.gateway_vs_direct [--duration 10] [--concurrency 1,16] [--rounds 1]

Everything (this load generator, the gateway, Triton and its python-backend stub) shares the
machine's cores; per-process CPU time per call is reported to show where they go, and the CPU
that other processes used meanwhile to show how noisy the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as dt
import functools
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from bench import reference_proxy
from bench.legs import (
    calls_sent,
    leg_kwargs,
    leg_seconds,
    machine_line,
    print_leg,
    run_mirrored,
    running,
    source_line,
)
from bench.loadgen import LoadResult, decode_fp32, probe, run_load
from tests.backends.triton import TritonServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
BACKEND_MODEL = "demo_linear"
BACKEND_VERSION = "1"
ROUTE = "linear"
EXPECTED = [4.0, 8.0, 12.0]  # demo_linear v1 for x = [1, 2, 3, 4] (deploy/demo/models/README.md)
GATEWAY_READY_LINE = "serving Open Inference Protocol on"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------------------- machine, CPU time


def machine_info() -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def source_state() -> dict:
    """The commit measured, and which gateway source files differed from it (a dirty tree)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        # Only trailing newlines: porcelain lines start with a status column that may be a space.
        return out.stdout.rstrip("\n") if out.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "gateway", "adapters", "protos")
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "gateway_changes_uncommitted": [line[3:] for line in changed.splitlines()],
    }


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time so far of `pids` (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return ticks / CLK_TCK


def process_group(pgid: int) -> list[int]:
    """Live pids in process group `pgid` (tritonserver and its python-backend stubs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


class CpuSampler:
    """CPU seconds each named process set used between start() and stop(), plus "other": what
    the rest of the machine used meanwhile (other jobs: noise in the figures)."""

    def __init__(self, sets: dict[str, Callable[[], list[int]]]) -> None:
        self._sets = sets
        self._start: dict[str, float] = {}
        self._machine = (0.0, 0.0)
        self.used: dict[str, float] = {}
        self.other = 0.0
        self.steal = 0.0

    def start(self) -> None:
        self._start = {name: cpu_seconds(pids()) for name, pids in self._sets.items()}
        self._machine = machine_cpu_seconds()

    def stop(self) -> None:
        busy, steal = machine_cpu_seconds()
        self.used = {
            name: cpu_seconds(pids()) - self._start[name] for name, pids in self._sets.items()
        }
        self.other = max(0.0, busy - self._machine[0] - sum(self.used.values()))
        self.steal = steal - self._machine[1]


# ----------------------------------------------------------------------------- server processes


def _pdeathsig() -> Callable[[], None] | None:
    """Child gets SIGKILL if this process dies (armed only from the main thread: the kernel ties
    it to the forking thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ServerProcess:
    """A Python gRPC server subprocess on this interpreter; ready once `ready_line` is logged
    and `is_ready()` holds."""

    name = "server"
    ready_line = ""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self, channel: grpc.Channel) -> bool:
        grpc.channel_ready_future(channel).result(timeout=1.0)
        return True

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig(),
        )
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with code {self._proc.returncode}\n{self.log_tail()}"
                    )
                if self.ready_line in self.log_tail():
                    try:
                        if self.is_ready(channel):
                            return
                    except (grpc.RpcError, grpc.FutureTimeoutError):
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {timeout:.0f} s\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the server drains), SIGKILL after `timeout`; returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self._proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class GatewayProcess(ServerProcess):
    """`tensorgate serve` with one route `linear` -> Triton demo_linear v1."""

    name = "gateway"
    ready_line = GATEWAY_READY_LINE

    def __init__(self, triton_address: str, workdir: Path) -> None:
        super().__init__(workdir)
        self.metrics_port = free_port()
        self.config_path = workdir / "gateway.yaml"
        self.config = {
            "listeners": {
                "data_plane": self.address,
                "metrics": f"127.0.0.1:{self.metrics_port}",
            },
            "backends": [
                {
                    "name": "triton",
                    "kind": "BACKEND_KIND_TRITON",
                    "address": triton_address,
                    "per_try_timeout": "10s",
                }
            ],
            "routes": [
                {
                    "model": ROUTE,
                    "variants": [
                        {
                            "name": "v1",
                            "backend": "triton",
                            "backend_model": BACKEND_MODEL,
                            "backend_version": BACKEND_VERSION,
                            "version": "1",
                            "weight": 1,
                        }
                    ],
                }
            ],
            "lifecycle": {"shutdown_grace": "5s", "drain_delay": "0s"},
        }

    def command(self) -> list[str]:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)]

    def is_ready(self, channel: grpc.Channel) -> bool:
        ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady
        return ready(oip.ServerReadyRequest(), timeout=1.0).ready

    def metrics_text(self, timeout: float = 5.0) -> str:
        """The gateway's /metrics page, as scraped."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.read().decode()

    def request_counts(self) -> dict[str, int]:
        """tensorgate_requests_total summed by gRPC code, from the gateway's /metrics."""
        counts: Counter[str] = Counter()
        for line in self.metrics_text().splitlines():
            if line.startswith("tensorgate_requests_total{"):
                code = re.search(r'code="([^"]*)"', line)
                counts[code.group(1) if code else "?"] += int(float(line.rsplit(" ", 1)[1]))
        return dict(counts)


class ReferenceProxyProcess(ServerProcess):
    """bench/reference_proxy.py in front of Triton."""

    name = "pyproxy"
    ready_line = reference_proxy.READY_LINE

    def __init__(self, triton_address: str, workdir: Path) -> None:
        super().__init__(workdir)
        self.triton_address = triton_address

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.reference_proxy",
            "--listen",
            self.address,
            "--backend",
            self.triton_address,
        ]


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    model: str
    version: str
    hop_pid: int | None  # the process between the load generator and Triton, if any


async def triton_stats(address: str) -> dict[str, int]:
    """Cumulative Triton counters of demo_linear v1 (inferences, batches, time in queue/compute)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelStatistics(
            oip.ModelStatisticsRequest(name=BACKEND_MODEL, version=BACKEND_VERSION), timeout=5.0
        )
    stats = reply.model_stats[0]
    infer = stats.inference_stats
    return {
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "success_ns": infer.success.ns,
        "queue_ns": infer.queue.ns,
        "compute_infer_ns": infer.compute_infer.ns,
    }


def _triton_delta(before: dict[str, int], after: dict[str, int]) -> dict:
    d = {k: after[k] - before[k] for k in before}
    n = d["inference_count"] or 1
    return {
        "inferences": d["inference_count"],
        "executions": d["execution_count"],
        "avg_batch": round(d["inference_count"] / (d["execution_count"] or 1), 2),
        "server_mean_ms": round(d["success_ns"] / n / 1e6, 3),
        "queue_mean_ms": round(d["queue_ns"] / n / 1e6, 3),
        "compute_infer_mean_ms": round(d["compute_infer_ns"] / n / 1e6, 3),
    }


async def check_answers(targets: Sequence[Target]) -> None:
    """Every target must return demo_linear v1's answer before its speed means anything."""
    for target in targets:
        response, headers = await probe(target.address, target.model, target.version)
        got = decode_fp32(response)
        if got != EXPECTED:
            raise RuntimeError(f"{target.name}: demo_linear v1 answered {got}, not {EXPECTED}")
        if response.model_name != target.model:
            raise RuntimeError(
                f"{target.name} answered for model {response.model_name!r}, not {target.model!r}"
            )
        extra = f" (headers {dict(headers)})" if headers else ""
        print(f"answer OK from {target.name}: {got}{extra}")


LoadFn = Callable[..., Awaitable[LoadResult]]


async def measure_leg(
    target: Target,
    concurrency: int,
    *,
    duration: float,
    warmup: float,
    timeout: float,
    triton: TritonServer | None,
    cpu_sets: dict[str, Callable[[], list[int]]] | None = None,
    load: LoadFn | None = None,
) -> tuple[dict, LoadResult]:
    """One measured leg against `target`: the load, CPU seconds by process set, other processes'
    CPU, and (with `triton`) Triton's batching and server-side time over the window.

    `load` runs the closed loop (default: bench.loadgen.run_load on the target's address, model
    and version); it is called with concurrency, duration, warmup, timeout, on_window_start and
    on_window_end. `cpu_sets` adds process sets to the CPU sample (e.g. another backend)."""
    hop = target.hop_pid
    sets: dict[str, Callable[[], list[int]]] = {
        "loadgen": lambda: [os.getpid()],
        "hop": lambda: [hop] if hop else [],
    }
    if triton is not None:
        sets["triton"] = lambda: process_group(triton.pid)
    sets.update(cpu_sets or {})
    sampler = CpuSampler(sets)
    if load is None:
        load = functools.partial(run_load, target.address, target.model, version=target.version)
    before = await triton_stats(triton.address) if triton is not None else None
    result = await load(
        concurrency=concurrency,
        duration=duration,
        warmup=warmup,
        timeout=timeout,
        on_window_start=sampler.start,
        on_window_end=sampler.stop,
    )
    cpu = {
        proc: {
            "seconds": round(used, 3),
            "cores": round(used / result.elapsed_s, 3),
            "us_per_call": round(1e6 * used / max(result.ok, 1), 1),
        }
        for proc, used in sampler.used.items()
        if proc != "hop" or hop
    }
    record = {
        "name": target.name,
        **result.summary(),
        "cpu": cpu,
        "other_cores": round(sampler.other / result.elapsed_s, 3),
        "steal_cores": round(sampler.steal / result.elapsed_s, 3),
    }
    if triton is not None and before is not None:
        record["triton"] = _triton_delta(before, await triton_stats(triton.address))
    return record, result


async def measure(
    args: argparse.Namespace, triton: TritonServer, targets: Sequence[Target]
) -> tuple[list[dict], dict[tuple[str, int], LoadResult]]:
    await check_answers(targets)

    async def leg(target: Target, concurrency: int, _pass: int) -> tuple[dict, LoadResult]:
        record, result = await measure_leg(target, concurrency, **leg_kwargs(args, triton))
        label = f"c={concurrency:<3} {target.name:<8}"
        print_leg(label, result, record, f"avg Triton batch {record['triton']['avg_batch']}")
        return record, result

    return await run_mirrored(args.concurrency, targets, args.rounds, leg)


# ----------------------------------------------------------------------------- report


def _cpu_per_call(runs: list[dict], name: str, concurrency: int) -> dict[str, float]:
    """CPU microseconds per OK call by process, over all legs of (name, concurrency)."""
    legs = [r for r in runs if r["name"] == name and r["concurrency"] == concurrency]
    ok = sum(r["ok"] for r in legs) or 1
    procs = legs[0]["cpu"].keys()
    return {p: round(1e6 * sum(r["cpu"][p]["seconds"] for r in legs) / ok, 1) for p in procs}


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def _ratio(base: LoadResult, other: LoadResult) -> dict:
    return {
        "throughput_ratio": _round(other.rps / base.rps if base.rps else math.nan),
        "p50_added_ms": _round(other.percentile_ms(50) - base.percentile_ms(50)),
        "p99_added_ms": _round(other.percentile_ms(99) - base.percentile_ms(99)),
    }


def report(
    runs: list[dict],
    merged: dict[tuple[str, int], LoadResult],
    levels: Sequence[int],
    names: Sequence[str],
) -> tuple[str, list[dict], list[dict]]:
    width = max(8, *(len(n) for n in names))
    header = (
        f"{'target':<{width}} {'conc':>4} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6}   CPU us/call (loadgen / hop / triton)   "
        "each leg: rps (other procs, cores)"
    )
    lines = [header, "-" * len(header)]
    rows, ratios = [], []
    for c in levels:
        for name in names:
            r = merged[(name, c)]
            cpu = _cpu_per_call(runs, name, c)
            rows.append({"name": name, **r.summary(), "cpu_us_per_call": cpu})
            errs = ", ".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "0"
            cpu_text = " / ".join(str(cpu.get(p, "-")) for p in ("loadgen", "hop", "triton"))
            legs = [
                f"{x['rps']:.0f} ({x['other_cores']:.2f})"
                for x in runs
                if x["name"] == name and x["concurrency"] == c
            ]
            lines.append(
                f"{name:<{width}} {c:>4} {r.rps:>8.0f} {r.percentile_ms(50):>8.3f} "
                f"{r.percentile_ms(95):>8.3f} {r.percentile_ms(99):>8.3f} {errs:>6}   "
                f"{cpu_text:<34} {', '.join(legs)}"
            )
        pairs = [("direct", n) for n in names if n != "direct"]
        if "pyproxy" in names:
            pairs.append(("pyproxy", "gateway"))
        for base, other in pairs:
            ratio = {
                "concurrency": c,
                "of": other,
                "to": base,
                **_ratio(merged[(base, c)], merged[(other, c)]),
            }
            ratios.append(ratio)
            lines.append(
                f"{'ratio':<{width}} {c:>4}   {other}/{base} "
                f"throughput {ratio['throughput_ratio']}, p50 +{ratio['p50_added_ms']} ms, "
                f"p99 +{ratio['p99_added_ms']} ms"
            )
        lines.append("")
    return "\n".join(lines), rows, ratios


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return levels


def add_load_options(
    parser: argparse.ArgumentParser, *, duration: float, concurrency: list[int], rounds: int
) -> None:
    """The options of every closed-loop benchmark here, with that benchmark's defaults."""
    parser.add_argument(
        "--duration", type=float, default=duration, help="measured seconds per target and level"
    )
    parser.add_argument(
        "--concurrency", type=parse_levels, default=concurrency, help="in-flight levels, e.g. 1,16"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each leg")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="mirrored blocks per level (legs get shorter)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline, seconds")
    parser.add_argument("--models", default=str(REPO_ROOT / "deploy" / "demo" / "models"))
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")


def parse_load_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[list[str], argparse.Namespace]:
    """(the arguments as given, parsed) for a parser built with add_load_options."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_list)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    return argv_list, args


def leg_settings(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """How the legs of a run were laid out (for its result file)."""
    return {
        "duration_s_per_target_and_level": args.duration,
        "rounds": args.rounds,
        "leg_order": [*names, *reversed(names)],
        "leg_s": leg_seconds(args),
        "warmup_s_per_leg": args.warmup,
        "timeout_s": args.timeout,
        "concurrency": args.concurrency,
        "request": "ModelInfer, FP32 [1,4] in raw_input_contents",
    }


def write_results(
    benchmark: str, started, argv: Sequence[str], output: Path | None, payload: dict
) -> Path:
    """bench/results/<benchmark>-<UTC start>.json (or `output`): which benchmark, when, the
    exact command, then `payload` (machine, source, settings, results)."""
    output = output or RESULTS_DIR / f"{benchmark}-{started:%Y%m%dT%H%M%SZ}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "benchmark": benchmark,
        "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", f"bench.{benchmark}", *argv]),
    }
    output.write_text(json.dumps({**header, **payload}, indent=2) + "\n")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_vs_direct",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_options(parser, duration=10.0, concurrency=[1, 16], rounds=1)
    parser.add_argument(
        "--reference-proxy",
        action="store_true",
        help="also measure a bare grpc.aio byte-forwarding proxy (bench/reference_proxy.py)",
    )
    argv_list, args = parse_load_args(parser, argv)

    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    source = source_state()
    print(machine_line(machine))
    print("the load generator, the gateway and Triton share these cores.")
    print(source_line(source), flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    triton = TritonServer(args.models)
    gateway: GatewayProcess | None = None
    gateway_counts: dict[str, int] = {}
    try:
        with running("stopping the servers and Triton") as fleet:
            t0 = time.monotonic()
            fleet.start_backend(triton)
            targets = [Target("direct", triton.address, BACKEND_MODEL, BACKEND_VERSION, None)]
            gateway = fleet.start(GatewayProcess(triton.address, workdir))
            targets.append(Target("gateway", gateway.address, ROUTE, "", gateway.pid))
            if args.reference_proxy:
                proxy = fleet.start(ReferenceProxyProcess(triton.address, workdir))
                targets.append(
                    Target("pyproxy", proxy.address, BACKEND_MODEL, BACKEND_VERSION, proxy.pid)
                )
            print(
                "up in {:.1f} s: {} (logs in {})".format(
                    time.monotonic() - t0,
                    ", ".join(f"{t.name} {t.address}" for t in targets),
                    workdir,
                ),
                flush=True,
            )
            runs, merged = asyncio.run(measure(args, triton, targets))
            gateway_counts = gateway.request_counts()
    except KeyboardInterrupt:
        return 130
    exit_codes = fleet.exit_codes
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]

    names = [t.name for t in targets]
    table, rows, ratios = report(runs, merged, args.concurrency, names)
    # Every call the load generator made through the gateway (+1 answer check) must show up in
    # the gateway's own counters, with the same status codes.
    sent = calls_sent(merged, "gateway")
    counted_total = sum(gateway_counts.values())
    consistent = counted_total == sum(sent.values()) and gateway_counts.get("OK", 0) >= sent["OK"]
    print()
    print(table)
    print(
        f"gateway /metrics counted {counted_total} ModelInfer calls {gateway_counts}; "
        f"load generator sent {sum(sent.values())} -> {'consistent' if consistent else 'MISMATCH'}"
    )
    print(f"exit codes after SIGTERM: {exit_codes}")

    output = write_results(
        "gateway_vs_direct",
        started,
        argv_list,
        args.output,
        {
            "machine": machine,
            "source": source,
            "settings": {
                **leg_settings(args, names),
                "targets": {t.name: {"model": t.model, "version": t.version} for t in targets},
                "gateway_config": gateway.config if gateway else None,
            },
            "summary": rows,
            "ratios": ratios,
            "runs": runs,
            "gateway_metrics_counts": gateway_counts,
            "exit_codes": exit_codes,
        },
    )
    print(f"results: {output}")
    errors = sum(r.error_count for r in merged.values())
    return 1 if errors or not consistent else 0


if __name__ == "__main__":
    sys.exit(main())
