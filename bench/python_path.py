"""The Python path's targets (issue 9), in one run with one load generator.

Starts a real Triton (demo_linear only, from a copy of deploy/demo/models whose config has
Triton's own dynamic_batching REMOVED unless --triton-dynamic-batching: so any batching Triton
reports is the gateway's), a real TorchServe (linear v1, one worker, no server-side batching),
the gateway (asyncio), the same gateway under uvloop, and the bare Python proxy
(bench/reference_proxy.py). One gateway config serves every route:

    linear            -> Triton demo_linear v1                      (no batching, no cache)
    linear-batch      -> the same, Variant.batching (max_batch_size, max_queue_delay; the
                         default dispatch: sent at once when the backend is free)
    linear-batch-wait -> the same, dispatch BATCH_DISPATCH_WAIT_FOR_DELAY (every batch waits)
    linear-cache      -> the same, RoutePolicy.response_cache (every call after the first hits)
    ts-linear         -> TorchServe linear v1                       (no batching)
    ts-linear-batch   -> the same, batching (route schema max_batch_size)

Groups of targets are measured in mirrored order (each target twice per round, --duration split
over its legs, each leg after its own warm-up), as bench.gateway_vs_direct does:

    triton c=16: direct, gateway, gateway-batch, gateway-batch-wait, pyproxy, gateway-uvloop,
                 gateway-cache
    triton c=1 : direct, gateway, gateway-batch, gateway-batch-wait, gateway-cache
    torchserve c=16: ts-direct (HTTP, bench.http_loadgen), gateway-ts, gateway-ts-batch

then one extra gateway leg at c=16 on `linear` under py-spy (--native) for the profile. Prints
the tables, the targets of issue 9 (met / missed) and the profile, writes bench/results/*.json.

    python -m bench.python_path [--duration 10] [--rounds 1] [--no-torchserve] [--no-profile]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from bench.gateway_vs_direct import (
    BACKEND_MODEL,
    BACKEND_VERSION,
    CLK_TCK,
    EXPECTED,
    REPO_ROOT,
    GatewayProcess,
    LoadFn,
    ReferenceProxyProcess,
    Target,
    machine_info,
    measure_leg,
    process_group,
    source_state,
    write_results,
)
from bench.http_loadgen import oip_json_body, probe_http, run_http_load
from bench.legs import leg_kwargs, print_leg, run_mirrored, running
from bench.loadgen import LoadResult, build_request, decode_fp32, run_load
from tests.backends.triton import TritonServer

TS_SCHEMA = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}
CACHE_HEADER = "x-tensorgate-cache"
UVLOOP_MAIN = (
    "import sys, uvloop; uvloop.install(); "
    "from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
)


# ----------------------------------------------------------------------------- servers


def triton_repository(workdir: Path, keep_dynamic_batching: bool) -> Path:
    """A model repository holding demo_linear only; without Triton's dynamic_batching unless
    asked (then every execution of more than one inference is a batch the gateway made)."""
    repo = workdir / "models"
    shutil.copytree(
        REPO_ROOT / "deploy" / "demo" / "models" / BACKEND_MODEL,
        repo / BACKEND_MODEL,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    config = repo / BACKEND_MODEL / "config.pbtxt"
    text = config.read_text()
    if not keep_dynamic_batching:
        text, n = re.subn(r"(?m)^dynamic_batching\s*\{[^}]*\}\s*$", "", text)
        if n != 1 or "dynamic_batching" in text:
            raise RuntimeError(f"could not remove dynamic_batching from {config}")
        config.write_text(text)
    return repo


def gateway_config(
    triton_address: str | None,
    ts: object | None,
    max_batch: int,
    max_delay_ms: float,
    listen: str,
    metrics: str,
) -> dict:
    """Triton's routes (with `triton_address`) and/or TorchServe's (with `ts`)."""
    batching = {"max_batch_size": max_batch, "max_queue_delay": f"{max_delay_ms / 1000:.6f}s"}
    triton_v1 = {
        "name": "v1",
        "backend": "triton",
        "backend_model": BACKEND_MODEL,
        "backend_version": BACKEND_VERSION,
        "version": "1",
        "weight": 1,
    }
    backends: list[dict] = []
    routes: list[dict] = []
    if triton_address is not None:
        backends.append(
            {
                "name": "triton",
                "kind": "BACKEND_KIND_TRITON",
                "address": triton_address,
                "per_try_timeout": "10s",
            }
        )
        routes += [
            {"model": "linear", "variants": [triton_v1]},
            {"model": "linear-batch", "variants": [{**triton_v1, "batching": batching}]},
            {
                "model": "linear-batch-wait",
                "variants": [
                    {
                        **triton_v1,
                        "batching": {**batching, "dispatch": "BATCH_DISPATCH_WAIT_FOR_DELAY"},
                    }
                ],
            },
            {
                "model": "linear-cache",
                "variants": [triton_v1],
                "policy": {"response_cache": {"deterministic": True, "ttl": "600s"}},
            },
        ]
    if ts is not None:
        backends.append(
            {
                "name": "ts",
                "kind": "BACKEND_KIND_TORCHSERVE",
                "address": ts.inference_url.removeprefix("http://"),
                "per_try_timeout": "10s",
                "torchserve": {"management_address": ts.management_url.removeprefix("http://")},
            }
        )
        ts_v1 = {**triton_v1, "backend": "ts", "backend_model": "linear"}
        schema = {**TS_SCHEMA, "max_batch_size": max_batch}
        routes += [
            {"model": "ts-linear", "schema": schema, "variants": [ts_v1]},
            {
                "model": "ts-linear-batch",
                "schema": schema,
                "variants": [{**ts_v1, "batching": batching}],
            },
        ]
    return {
        "listeners": {"data_plane": listen, "metrics": metrics},
        "backends": backends,
        "routes": routes,
        "lifecycle": {"shutdown_grace": "5s", "drain_delay": "0s"},
    }


class PathGateway(GatewayProcess):
    """`tensorgate serve` with the routes above; with `uvloop`, the same entry point after
    uvloop.install() (the gateway's code is unchanged: asyncio.run picks uvloop's loop)."""

    def __init__(self, name: str, workdir: Path, config_args: tuple, use_uvloop: bool) -> None:
        self.name = name
        own = workdir / name  # own state dir next to its config
        own.mkdir(parents=True, exist_ok=True)
        super().__init__("", own)
        self.config_path = own / "gateway.yaml"
        self.use_uvloop = use_uvloop
        self.config = gateway_config(
            *config_args, listen=self.address, metrics=f"127.0.0.1:{self.metrics_port}"
        )

    def command(self) -> list[str]:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        args = ["serve", "--config", str(self.config_path)]
        if self.use_uvloop:
            return [sys.executable, "-c", UVLOOP_MAIN, *args]
        return [sys.executable, "-m", "gateway.cli", *args]

    def metrics(self) -> dict[str, float]:
        """Every sample of the gateway's /metrics: 'name{labels}' -> value."""
        out = {}
        for line in self.metrics_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# ----------------------------------------------------------------------------- legs


@dataclass(frozen=True)
class Leg:
    target: Target
    backend: str  # "triton" or "torchserve": whose statistics and CPU
    gateway: PathGateway | None = None  # whose /metrics to read (batch sizes, cache hits)
    load: LoadFn | None = None  # None: bench.loadgen.run_load with `request`
    request: oip.ModelInferRequest | None = None

    @property
    def name(self) -> str:
        return self.target.name


def grpc_load(target: Target, request: oip.ModelInferRequest | None) -> LoadFn:
    return functools.partial(
        run_load, target.address, target.model, version=target.version, request=request
    )


async def check_leg(leg: Leg) -> str:
    """The target answers demo_linear v1's [4, 8, 12] (and a cached route says it hit)."""
    t = leg.target
    if leg.load is not None:  # TorchServe direct
        answer = await probe_http(t.address, oip_json_body())
        got = [float(v) for v in answer["outputs"][0]["data"]]
        note = ""
    else:
        request = leg.request or build_request(t.model, t.version)
        async with grpc.aio.insecure_channel(t.address) as channel:
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=10.0
            )
            response = await call
            trailers = dict(await call.trailing_metadata() or ())
        got = decode_fp32(response)
        note = f" trailers {trailers}" if trailers else ""
    if got != EXPECTED:
        raise RuntimeError(f"{t.name}: answered {got}, not {EXPECTED}")
    return f"answer OK from {t.name}: {got}{note}"


def gateway_delta(leg: Leg, before: dict[str, float], after: dict[str, float]) -> dict:
    model = leg.target.model

    def d(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    out: dict = {}
    count = d("tensorgate_batch_size_count", model=model)
    if count:
        out["batches"] = int(count)
        out["avg_gateway_batch"] = round(d("tensorgate_batch_size_sum", model=model) / count, 2)
        n = d("tensorgate_batch_queue_delay_seconds_count", model=model) or 1
        out["mean_queue_delay_ms"] = round(
            1e3 * d("tensorgate_batch_queue_delay_seconds_sum", model=model) / n, 3
        )
    hits = d("tensorgate_cache_requests_total", model=model, result="hit")
    misses = d("tensorgate_cache_requests_total", model=model, result="miss")
    if hits or misses:
        out["cache_hits"], out["cache_misses"] = int(hits), int(misses)
    return out


async def run_groups(
    args: argparse.Namespace,
    groups: Sequence[tuple[str, int, Sequence[Leg]]],
    triton: TritonServer,
    ts_pid: int | None,
) -> tuple[list[dict], dict[tuple[str, str, int], LoadResult]]:
    runs: list[dict] = []
    merged: dict[tuple[str, str, int], LoadResult] = {}
    for group, concurrency, legs in groups:
        for leg in legs:
            print(await check_leg(leg), flush=True)

        async def measure(
            leg: Leg, concurrency: int, _pass: int, group: str = group
        ) -> tuple[dict, LoadResult]:
            cpu_sets = {}
            if leg.backend == "triton":
                if ts_pid:
                    cpu_sets["torchserve"] = lambda: process_group(ts_pid)
            else:
                cpu_sets["torchserve"] = lambda: process_group(ts_pid)
                cpu_sets["triton"] = lambda: process_group(triton.pid)
            rejected: list[float] = []
            while True:
                before = leg.gateway.metrics() if leg.gateway else {}
                record, result = await measure_leg(
                    leg.target,
                    concurrency,
                    **leg_kwargs(args, triton if leg.backend == "triton" else None),
                    cpu_sets=cpu_sets,
                    load=leg.load or grpc_load(leg.target, leg.request),
                )
                if record["other_cores"] <= args.max_other or len(rejected) >= args.noisy_retries:
                    break
                rejected.append(record["other_cores"])
                print(
                    f"  {group:<16} {leg.name:<16} noisy leg: other processes used "
                    f"{record['other_cores']:.2f} cores; measuring it again in "
                    f"{args.noisy_wait:.0f} s",
                    flush=True,
                )
                await asyncio.sleep(args.noisy_wait)
            record["group"] = group
            record["rejected_noisy_other_cores"] = rejected
            if leg.gateway:
                record["gateway_metrics"] = gateway_delta(leg, before, leg.gateway.metrics())
            extra = record.get("gateway_metrics", {})
            batch = record.get("triton", {}).get("avg_batch")
            hop_us = record["cpu"].get("hop", {}).get("us_per_call", "-")
            notes = [f"hop CPU {hop_us} us/call"]
            if batch is not None:
                notes.append(f"Triton inf/exec {batch}")
            if "avg_gateway_batch" in extra:
                notes.append(f"gw batch {extra['avg_gateway_batch']}")
            if "cache_hits" in extra:
                notes.append(f"cache hits {extra['cache_hits']}")
            print_leg(f"{group:<16} {leg.name:<16}", result, record, *notes, rps_width=7)
            return record, result

        group_runs, group_merged = await run_mirrored([concurrency], legs, args.rounds, measure)
        runs += group_runs
        merged.update({(group, name, c): r for (name, c), r in group_merged.items()})
    return runs, merged


# ----------------------------------------------------------------------------- profile


CATEGORIES = (  # innermost frame that matches decides the sample's category
    ("gateway", re.compile(r"\(gateway/")),
    ("adapters", re.compile(r"\(adapters/")),
    ("protobuf", re.compile(r"google/protobuf|_upb|upb\.|\(upb/|message\.c|decode\.c|encode\.c")),
    ("prometheus", re.compile(r"prometheus_client")),
    ("grpc", re.compile(r"grpc|cygrpc|\.pyx|\.pxi|libgrpc|absl|\(src/core")),
    ("asyncio", re.compile(r"asyncio|_asynciomodule|selectors\.py|uvloop")),
)


def _frame_name(frame: str) -> str:
    """'fn (file.py:12)' -> 'fn (file.py)'; native frames keep their library."""
    return re.sub(r":\d+\)$", ")", frame.strip())


# Leaf functions of a thread that is blocked, not running: py-spy --native samples those too
# (asyncio's epoll_wait, the metrics server's poll loop, condition waits).
IDLE_LEAVES = frozenset(
    "epoll_wait epoll_pwait poll select pthread_cond_wait pthread_cond_timedwait sem_wait "
    "sem_timedwait clock_nanosleep".split()
)


def summarize_profile(raw: Path, top: int = 10) -> dict:
    """py-spy --format raw: 'frame;frame;...;leaf count' per line -> self and inclusive shares
    of the on-CPU samples (samples whose leaf is a blocking wait are counted apart as idle)."""
    self_: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        if frames[-1].split(" (", 1)[0] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        self_[frames[-1]] += count
        for name in set(frames):
            incl[name] += count
        for frame in reversed(frames):
            cat = next((c for c, rx in CATEGORIES if rx.search(frame)), None)
            if cat is not None:
                cats[cat] += count
                break
        else:
            cats["other (interpreter, libc, kernel)"] += count
    total = total or 1

    def pct(counter: Counter[str], n: int, where=lambda name: True) -> list[tuple[str, float]]:
        rows = [(k, v) for k, v in counter.most_common() if where(k)][:n]
        return [(k, round(100 * v / total, 1)) for k, v in rows]

    ours = re.compile(r"\((gateway/(?!cli\.py)|adapters/)")
    return {
        "samples": total,
        "idle_samples": idle,
        "self_top": pct(self_, top),
        "inclusive_gateway_top": pct(incl, top, lambda k: bool(ours.search(k))),
        "by_category": pct(cats, len(cats)),
    }


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of `pid`, summed by thread name (comm)."""
    out: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[comm] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return dict(out)


def profile_leg(args: argparse.Namespace, gateway: PathGateway, out: Path, native: bool) -> dict:
    """A c=16 leg on route `linear` while py-spy samples the gateway (not in the comparisons).

    Without `native`: Python frames only, --nonblocking at 100 Hz (the gateway is never paused,
    so it runs at nearly its normal rate). With `native`: C frames too (gRPC core, protobuf,
    libc), which needs py-spy to pause the process for each sample (50 Hz): the gateway runs
    slower while sampled, which shifts the shares somewhat (see the leg's rate)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
    seconds = max(4, int(args.profile_seconds))
    cmd = [pyspy, "record", "--pid", str(gateway.pid), "--duration", str(seconds + 1)]
    cmd += ["--format", "raw", "--output", str(out)]
    cmd += ["--rate", "50", "--native"] if native else ["--rate", "100", "--nonblocking"]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = Target("gateway-profiled", gateway.address, "linear", "", gateway.pid)
    threads_before = thread_cpu(gateway.pid)
    record, result = asyncio.run(
        measure_leg(
            target,
            16,
            duration=seconds,
            warmup=1.0,
            timeout=args.timeout,
            triton=None,
            load=grpc_load(target, None),
        )
    )
    threads_after = thread_cpu(gateway.pid)
    _, err = spy.communicate()
    if spy.returncode != 0 or not out.exists():
        return {"skipped": f"py-spy failed ({spy.returncode}): {err.decode()[-500:]}"}
    summary = summarize_profile(out)
    calls = result.ok + result.error_count + result.warmup_calls
    by_thread = Counter(
        {k: v - threads_before.get(k, 0.0) for k, v in threads_after.items()}
    )  # whole leg (warm-up included), py-spy's own pauses included
    summary.update(
        thread_cpu_us_per_call={
            k: round(1e6 * v / max(calls, 1), 1) for k, v in by_thread.most_common() if v > 0
        },
        raw=str(out),
        command=shlex.join(cmd),
        leg={"rps": round(result.rps, 1), "hop_us_per_call": record["cpu"]["hop"]["us_per_call"]},
    )
    return summary


# ----------------------------------------------------------------------------- report


def _cpu(runs: list[dict], group: str, name: str) -> dict[str, float]:
    legs = [r for r in runs if r["group"] == group and r["name"] == name]
    ok = sum(r["ok"] for r in legs) or 1
    return {
        p: round(1e6 * sum(r["cpu"][p]["seconds"] for r in legs) / ok, 1) for p in legs[0]["cpu"]
    }


def _extra(runs: list[dict], group: str, name: str) -> str:
    legs = [r for r in runs if r["group"] == group and r["name"] == name]
    parts = []
    tri = [r["triton"] for r in legs if "triton" in r]
    if tri:
        inf, ex = sum(t["inferences"] for t in tri), sum(t["executions"] for t in tri)
        parts.append(f"Triton inf/exec {inf / (ex or 1):.2f}")
    gm = [r.get("gateway_metrics", {}) for r in legs]
    if any("batches" in g for g in gm):
        b = sum(g.get("batches", 0) for g in gm)
        s = sum(g.get("batches", 0) * g.get("avg_gateway_batch", 0) for g in gm)
        parts.append(f"gateway batch {s / (b or 1):.2f}")
    if any("cache_hits" in g for g in gm):
        parts.append(
            f"cache hits {sum(g.get('cache_hits', 0) for g in gm)}"
            f"/misses {sum(g.get('cache_misses', 0) for g in gm)}"
        )
    parts.append("other " + "/".join(f"{r['other_cores']:.2f}" for r in legs))
    redone = sum(len(r.get("rejected_noisy_other_cores", [])) for r in legs)
    if redone:
        parts.append(f"{redone} noisy legs re-measured")
    return ", ".join(parts)


def report(runs: list[dict], merged: dict, groups: Sequence[tuple[str, int, Sequence[Leg]]]):
    lines, rows = [], []
    for group, c, legs in groups:
        header = (
            f"{group:<16} {'rps':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'err':>4}  "
            "CPU us/call: loadgen / hop / backend   notes (other procs: cores per leg)"
        )
        lines += [header, "-" * len(header)]
        for leg in legs:
            name = leg.target.name
            r = merged[(group, name, c)]
            cpu = _cpu(runs, group, name)
            backend = cpu.get(leg.backend, "-")
            rows.append({"group": group, "name": name, **r.summary(), "cpu_us_per_call": cpu})
            lines.append(
                f"{name:<16} {r.rps:>7.0f} {r.percentile_ms(50):>8.3f} {r.percentile_ms(95):>8.3f} "
                f"{r.percentile_ms(99):>8.3f} {r.error_count:>4}  "
                f"{cpu['loadgen']:>7} / {cpu.get('hop', '-'):>6} / {backend:<8}       "
                f"{_extra(runs, group, name)}"
            )
        lines.append("")
    return "\n".join(lines), rows


def targets_met(runs: list[dict], merged: dict, have_ts: bool) -> list[dict]:
    def get(group: str, name: str) -> LoadResult | None:
        for (g, n, _), r in merged.items():
            if g == group and n == name:
                return r
        return None

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else math.nan

    out = []
    t16 = "triton c=16"
    gw, gb = get(t16, "gateway"), get(t16, "gateway-batch")
    if gw and gb:
        x = ratio(gb.rps, gw.rps)
        out.append({"target": "batched gateway >= 2x unbatched gateway (Triton, c=16)",
                    "value": x, "met": x >= 2})  # fmt: skip
        legs = [r for r in runs if r["group"] == t16 and r["name"] == "gateway-batch"]
        inf = sum(r["triton"]["inferences"] for r in legs)
        ex = sum(r["triton"]["executions"] for r in legs) or 1
        out.append({"target": "Triton inferences/execution >= 3 (batched gateway, c=16)",
                    "value": round(inf / ex, 2), "met": inf / ex >= 3})  # fmt: skip
    if have_ts:
        td, tb = get("torchserve c=16", "ts-direct"), get("torchserve c=16", "gateway-ts-batch")
        if td and tb:
            x = ratio(tb.rps, td.rps)
            out.append({"target": "gateway->TorchServe batched >= 3x direct unbatched (c=16)",
                        "value": x, "met": x >= 3})  # fmt: skip
        th = get("torchserve c=16", "ts-direct-httpx")
        if th and tb:
            out.append({"target": "(info) the same against a direct client on httpx (c=16)",
                        "value": ratio(tb.rps, th.rps), "met": None})  # fmt: skip
    rt, batched = get("triton c=1", "gateway"), get("triton c=1", "gateway-batch")
    if rt and batched:
        extra = batched.percentile_ms(50) - rt.percentile_ms(50)
        out.append({"target": "batched p50 within 0.1 ms of unbatched (c=1)",
                    "value": round(extra, 3), "met": extra <= 0.1})  # fmt: skip
    for group in ("triton c=1", t16):
        rt, hit = get(group, "gateway"), get(group, "gateway-cache")
        if rt and hit:
            x = ratio(hit.percentile_ms(50), rt.percentile_ms(50))
            out.append({"target": f"cache hit p50 <= 30% of gateway round trip ({group})",
                        "value": x, "met": x <= 0.3})  # fmt: skip
    if get(t16, "pyproxy") and gw:
        g, p = _cpu(runs, t16, "gateway")["hop"], _cpu(runs, t16, "pyproxy")["hop"]
        x = ratio(g, p)
        out.append({"target": "gateway CPU/call <= bare proxy + 15% (c=16)",
                    "value": x, "met": x <= 1.15, "detail": f"{g} vs {p} us"})  # fmt: skip
    if get(t16, "gateway-uvloop") and gw:
        g, u = _cpu(runs, t16, "gateway")["hop"], _cpu(runs, t16, "gateway-uvloop")["hop"]
        out.append({"target": "(info) uvloop gateway CPU/call vs asyncio gateway (c=16)",
                    "value": ratio(u, g), "met": None, "detail": f"{u} vs {g} us"})  # fmt: skip
    return out


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.python_path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per target")
    parser.add_argument("--rounds", type=int, default=1, help="mirrored blocks per group")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each leg")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline, seconds")
    parser.add_argument("--max-batch-size", type=int, default=32, help="gateway batching")
    parser.add_argument("--max-queue-delay-ms", type=float, default=1.0, help="gateway batching")
    parser.add_argument(
        "--triton-dynamic-batching",
        action="store_true",
        help="keep demo_linear's own dynamic_batching (default: removed, see above)",
    )
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.25,
        help="a leg during which other processes used more cores than this is measured again",
    )
    parser.add_argument("--noisy-retries", type=int, default=3, help="re-measurements per leg")
    parser.add_argument("--noisy-wait", type=float, default=10.0, help="seconds before one")
    parser.add_argument("--no-torchserve", action="store_true", help="skip the TorchServe group")
    parser.add_argument("--no-uvloop", action="store_true", help="skip the uvloop gateway")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy leg")
    parser.add_argument("--profile-seconds", type=float, default=12.0)
    parser.add_argument(
        "--no-native", dest="profile_native", action="store_false", help="py-spy without --native"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_list)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    if not 0 <= args.max_queue_delay_ms <= 1000:
        parser.error("--max-queue-delay-ms must be between 0 and 1000")
    if not args.no_uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print(
                "uvloop not importable: the uvloop gateway is skipped "
                "(.venv/bin/pip install uvloop)"
            )
            args.no_uvloop = True

    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    source = source_state()
    print(
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}, "
        f"grpcio {machine['grpcio']}, load avg {' '.join(machine['loadavg_at_start'])}; "
        f"commit {(source['commit'] or '?')[:12]}"
        + (
            f", uncommitted: {', '.join(source['gateway_changes_uncommitted'])}"
            if source["gateway_changes_uncommitted"]
            else ""
        ),
        flush=True,
    )

    workdir = Path(tempfile.mkdtemp(prefix="bench-python-path-"))
    repo = triton_repository(workdir, args.triton_dynamic_batching)
    triton = TritonServer(repo)
    ts = None
    profile: dict[str, dict] = {}
    try:
        with running("stopping everything") as fleet:
            t0 = time.monotonic()
            fleet.start_backend(triton)
            if not args.no_torchserve:
                from tests.backends.torchserve import TorchServe

                ts = fleet.start_backend(TorchServe(models=[("linear", "1")], workers=1))
            # Triton's routes and TorchServe's on separate gateway processes: neither's health
            # probes or idle work land in the other's figures.
            batch_args = (args.max_batch_size, args.max_queue_delay_ms)
            triton_args = (triton.address, None, *batch_args)
            gateway = fleet.start(PathGateway("gateway", workdir, triton_args, False))
            uv = None
            if not args.no_uvloop:
                uv = fleet.start(PathGateway("gateway-uvloop", workdir, triton_args, True))
            ts_gateway = None
            if ts is not None:
                ts_args = (None, ts, *batch_args)
                ts_gateway = fleet.start(PathGateway("gateway-ts", workdir, ts_args, False))
            proxy = fleet.start(ReferenceProxyProcess(triton.address, workdir))
            print(f"up in {time.monotonic() - t0:.1f} s (logs in {workdir})", flush=True)

            def gw(name: str, model: str, g: PathGateway = gateway, backend: str = "triton") -> Leg:
                req = build_request(model, "", input_name="x") if backend == "torchserve" else None
                return Leg(Target(name, g.address, model, "", g.pid), backend, g, request=req)

            direct = Leg(
                Target("direct", triton.address, BACKEND_MODEL, BACKEND_VERSION, None), "triton"
            )
            pyproxy = Leg(
                Target("pyproxy", proxy.address, BACKEND_MODEL, BACKEND_VERSION, proxy.pid),
                "triton",
            )
            c16 = [
                direct,
                gw("gateway", "linear"),
                gw("gateway-batch", "linear-batch"),
                gw("gateway-batch-wait", "linear-batch-wait"),
                pyproxy,
            ]
            if uv is not None:
                c16.append(gw("gateway-uvloop", "linear", uv))
            c16.append(gw("gateway-cache", "linear-cache"))
            c1 = [
                direct,
                gw("gateway", "linear"),
                gw("gateway-batch", "linear-batch"),
                gw("gateway-batch-wait", "linear-batch-wait"),
                gw("gateway-cache", "linear-cache"),
            ]
            groups: list[tuple[str, int, Sequence[Leg]]] = [
                ("triton c=16", 16, c16),
                ("triton c=1", 1, c1),
            ]
            if ts is not None:
                url = f"{ts.inference_url}/predictions/linear/1"
                body = oip_json_body()
                ts_direct = Leg(
                    Target("ts-direct", url, "linear", "1", None),
                    "torchserve",
                    load=functools.partial(run_http_load, url, body, client="raw"),
                )
                ts_direct_httpx = Leg(
                    Target("ts-direct-httpx", url, "linear", "1", None),
                    "torchserve",
                    load=functools.partial(run_http_load, url, body, client="httpx"),
                )
                groups.append(
                    (
                        "torchserve c=16",
                        16,
                        [
                            ts_direct,
                            ts_direct_httpx,
                            gw("gateway-ts", "ts-linear", ts_gateway, "torchserve"),
                            gw("gateway-ts-batch", "ts-linear-batch", ts_gateway, "torchserve"),
                        ],
                    )
                )
            runs, merged = asyncio.run(run_groups(args, groups, triton, ts.pid if ts else None))
            if not args.no_profile:
                profile["python"] = profile_leg(args, gateway, workdir / "pyspy-python.txt", False)
                if args.profile_native:
                    profile["native"] = profile_leg(
                        args, gateway, workdir / "pyspy-native.txt", True
                    )
    except KeyboardInterrupt:
        return 130
    exit_codes = fleet.exit_codes
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]

    table, rows = report(runs, merged, groups)
    met = targets_met(runs, merged, ts is not None)
    print()
    print(table)
    for t in met:
        verdict = "info" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(
            f"  [{verdict:>6}] {t['target']}: {t['value']}"
            + (f" ({t['detail']})" if "detail" in t else "")
        )
    for kind, prof in profile.items():
        print()
        if "skipped" in prof:
            print(f"profile ({kind}) skipped: {prof['skipped']}")
            continue
        print(
            f"profile ({kind} frames): gateway at c=16 on `linear`, {prof['samples']} on-CPU "
            f"samples ({prof['leg']['rps']} ok/s while sampled); raw stacks {prof['raw']}"
        )
        print(
            f"  {prof['idle_samples']} idle samples (blocked in epoll/poll/cond waits) left out; "
            "CPU us per call by gateway thread: "
            + ", ".join(f"{k} {v}" for k, v in prof["thread_cpu_us_per_call"].items())
        )
        print(
            "  by category (innermost matching frame): "
            + ", ".join(f"{k} {v}%" for k, v in prof["by_category"])
        )
        print("  top self (leaf frame):")
        for name, share in prof["self_top"]:
            print(f"    {share:5.1f}%  {name}")
        print("  gateway/adapters functions, inclusive:")
        for name, share in prof["inclusive_gateway_top"]:
            print(f"    {share:5.1f}%  {name}")
    print(f"exit codes after SIGTERM: {exit_codes}")

    output = write_results(
        "python_path",
        started,
        argv_list,
        args.output,
        {
            "machine": machine,
            "source": source,
            "settings": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "triton_model_config": (repo / BACKEND_MODEL / "config.pbtxt").read_text(),
                "gateway_configs": {
                    g.name: g.config for g in (gateway, uv, ts_gateway) if g is not None
                },
            },
            "summary": rows,
            "targets": met,
            "profile": profile,
            "runs": runs,
            "exit_codes": exit_codes,
        },
    )
    print(f"results: {output}")
    errors = sum(r.error_count for r in merged.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
