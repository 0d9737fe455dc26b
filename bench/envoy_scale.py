"""Envoy mode at scale: a route table of N routes (default 10,000, two variants each, on one
backend) compiled, pushed over ADS to a real Envoy 1.40, then one weight changed a few times,
then one model added. Prints compile time, push sizes, the Envoy's RSS, and how long each took
from the admin-side change to the Envoy's ACK (Envoy ACKs a response after applying it). No
backend is called: this measures the control plane and Envoy's
config handling, plus the cost of selecting a route per call at that size: calls (one in
flight) for the first and the last model of the table, whose backend address refuses
connections, so Envoy answers each UNAVAILABLE itself after the Lua body read and the route
selection (twice: before and after the Lua filter sets the model header).

    python -m bench.envoy_scale [--routes 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as oip

from gateway.controlplane.config import from_dict
from gateway.controlplane.envoy import ads
from gateway.controlplane.envoy.bootstrap import bootstrap, render
from gateway.controlplane.envoy.compile import Compiler
from gateway.controlplane.envoy.resources import (
    CLUSTER,
    ROUTE,
    RUNTIME,
    WEIGHTS_LAYER,
    shard_of,
    shard_route_name,
)
from tests.backends.process import tool
from tests.backends.triton import free_port


def config(routes: int, xds: int, listen: int, weight: int) -> dict:
    return {
        "listeners": {"xds": f"127.0.0.1:{xds}", "data_plane": f"127.0.0.1:{listen + 1}"},
        "envoy": {"listen": f"127.0.0.1:{listen}"},
        "backends": [{"name": "t", "kind": "BACKEND_KIND_TRITON", "address": "127.0.0.1:9"}],
        "routes": [
            {
                "model": f"m{i}",
                "variants": [
                    {"name": "a", "backend": "t", "version": "1", "backend_version": "1",
                     "weight": weight if i == 0 else 90},
                    {"name": "b", "backend": "t", "version": "2", "backend_version": "2",
                     "weight": 10},
                ],
            }
            for i in range(routes)
        ],
    }  # fmt: skip


# Route configurations applied, summed over the route table's shards (scoped routes).
RDS_APPLIED = r"^http\.tensorgate\..*rds\.[^.]*\.update_success$"


def counter(admin: int, pattern: str) -> int:
    """The sum of the counters whose names match `pattern` (Envoy's /stats filter, a regex)."""
    url = f"http://127.0.0.1:{admin}/stats?filter={urllib.parse.quote(pattern)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return -1
    return sum(int(line.partition(": ")[2] or 0) for line in text.splitlines() if ": " in line)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def route_selection(address: str, pid: int, model: str, calls: int) -> dict:
    """p50 of `calls` sequential calls for `model` (answered UNAVAILABLE by Envoy: its backend
    refuses connections) and Envoy's CPU per call."""
    request = oip.ModelInferRequest(model_name=model).SerializeToString()
    times = []
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        codes = set()
        for i in range(calls + 20):  # the first 20 warm up
            if i == 20:
                cpu0 = cpu_seconds(pid)
            t = time.perf_counter()
            try:
                await infer(request, timeout=5)
                codes.add("OK")
            except grpc.aio.AioRpcError as err:
                codes.add(err.code().name)
            if i >= 20:
                times.append(time.perf_counter() - t)
        cpu = cpu_seconds(pid) - cpu0
    times.sort()
    return {
        "model": model,
        "codes": sorted(codes),
        "p50_ms": round(times[len(times) // 2] * 1000, 3),
        "envoy_cpu_us_per_call": round(cpu / calls * 1e6),
    }


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(status.split("VmRSS:")[1].split()[0]) / 1024, 1)


class Acks:
    """When the Envoy ACKed each xDS type (it ACKs after applying): no admin polling, which at
    20,000 clusters costs ~1.3 s of Envoy's main thread per /stats call and would delay the very
    updates being timed."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.changed = asyncio.Event()

    def __call__(self, node: str, kind: str, version: str, what: str) -> None:
        self.events.append((time.monotonic(), kind, what))
        self.changed.set()

    async def wait(self, kind: str, what: str, after: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            for at, k, w in self.events:
                if at >= after and (k, w) == (kind, what):
                    return at - after
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))

    async def wait_count(self, kind: str, what: str, after: float, n: int, timeout: float):
        """Seconds from `after` to the n-th (kind, what) event (every shard of the route table
        ACKed, for instance)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [at for at, k, w in self.events if at >= after and (k, w) == (kind, what)]
            if len(found) >= n:
                return found[n - 1] - after
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))

    def count(self, kind: str, what: str, after: float) -> int:
        return sum(1 for at, k, w in self.events if at >= after and (k, w) == (kind, what))


async def run(routes: int, changes: int, settle: float) -> dict:
    xds = ads.XdsServer(CollectorRegistry())
    acks = Acks()
    xds.listeners.append(acks)
    server, port = await ads.serve("127.0.0.1:0", xds)
    listen, admin = free_port(), free_port()
    compiler = Compiler()
    first = from_dict(config(routes, port, listen, 90))
    t = time.perf_counter()
    resources = compiler.compile(first)
    compile_s = time.perf_counter() - t
    xds.set_snapshot(resources)
    workdir = Path(tempfile.mkdtemp(prefix="bench-envoy-scale-"))
    boot = workdir / "envoy.json"
    boot.write_text(render(bootstrap(first, admin=f"127.0.0.1:{admin}")))
    log = open(workdir / "envoy.log", "wb")  # noqa: ASYNC230 - a benchmark, not a server
    t0 = time.monotonic()
    envoy = subprocess.Popen(  # noqa: ASYNC220
        [tool("envoy"), "-c", str(boot), "--disable-hot-restart", "--base-id", "78",
         "--concurrency", "1", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        cds_s = await acks.wait("cds", "ack", t0, 300)
        initial_s = await acks.wait_count(
            "rds", "ack", t0, len(resources.by_type[ROUTE]), 300
        )  # every shard
        await asyncio.sleep(settle)
        address = f"127.0.0.1:{listen}"
        selection = [
            await route_selection(address, envoy.pid, model, 500)
            for model in ("m0", f"m{routes - 1}", "m0", f"m{routes - 1}")
        ]
        rds_before = await asyncio.to_thread(counter, admin, RDS_APPLIED)
        # Each change: one weight of model m0, compiled, pushed, ACKed by the Envoy.
        recompile, control, applied = [], [], []
        rtds_bytes = 0
        t_changes = time.monotonic()
        for i in range(changes):
            changed = from_dict(config(routes, port, listen, 50 + i))
            t1 = time.monotonic()
            update = compiler.compile(changed)
            recompile.append(time.monotonic() - t1)
            rtds_bytes = update.by_type[RUNTIME][WEIGHTS_LAYER].ByteSize()
            xds.set_snapshot(update)
            control.append(await acks.wait("rtds", "push", t1, 60))
            applied.append(await acks.wait("rtds", "ack", t1, 60))
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)  # a route table push, if any, would land by now
        rds_applied = await asyncio.to_thread(counter, admin, RDS_APPLIED) - rds_before
        rds_pushed = acks.count("rds", "push", t_changes)
        # For comparison, a change of the route table's shape (one model added), which is a
        # full route table push (after its clusters).
        await asyncio.sleep(settle)
        reshaped = from_dict(config(routes + 1, port, listen, 50))
        t2 = time.monotonic()
        added = compiler.compile(reshaped)
        added_compile_s = time.monotonic() - t2
        xds.set_snapshot(added)
        reshape_s = await acks.wait("rds", "ack", t2, 120)
        await asyncio.sleep(1)  # any further push it caused lands by now
        shard = added.by_type[ROUTE][shard_route_name(shard_of(f"m{routes}"))]
        pushed_after_add = {
            kind: acks.count(kind, "push", t2) for kind in ("cds", "eds", "rtds", "srds", "rds")
        }
        return {
            "routes": routes,
            "clusters": len(resources.by_type[CLUSTER]),
            "cds_bytes": sum(c.ByteSize() for c in resources.by_type[CLUSTER].values()),
            "rds_bytes": sum(c.ByteSize() for c in resources.by_type[ROUTE].values()),
            "rds_shards": len(resources.by_type[ROUTE]),
            "rtds_bytes": rtds_bytes,
            "compile_s": round(compile_s, 3),
            "initial_cds_acked_s": round(cds_s, 3),
            "initial_rds_acked_s": round(initial_s, 3),
            "route_selection": selection,
            "changes": changes,
            "change_recompile_s": [round(x, 3) for x in recompile],
            "change_compile_to_push_s": [round(x, 3) for x in control],
            "change_compile_push_ack_s": [round(x, 3) for x in applied],
            "change_max_s": round(max(applied), 3),
            "rds_pushes_by_the_changes": rds_pushed,
            "rds_applied_before_the_changes": rds_before,  # > 0: the counters are read
            "rds_applied_by_the_changes": rds_applied,
            "model_added_compile_s": round(added_compile_s, 3),
            "model_added_compile_push_rds_ack_s": round(reshape_s, 3),
            "model_added_rds_shard_bytes": shard.ByteSize(),
            "model_added_pushes": pushed_after_add,
            "nacks": sum(xds.metrics.nacks.labels(k)._value.get() for k in ("cds", "rds", "rtds")),
            "envoy_rss_mb": rss_mb(envoy.pid),
        }  # fmt: skip
    finally:
        envoy.terminate()
        envoy.wait(15)
        await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.envoy_scale", description=__doc__)
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=5, help="one-weight changes to time")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds between the first apply and a change"
    )
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.routes, args.changes, args.settle)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
