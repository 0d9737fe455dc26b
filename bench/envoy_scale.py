"""Envoy mode at scale: a route table of N routes (default 10,000, two variants each) compiled,
pushed over ADS to a real Envoy 1.40, then one weight changed. Prints compile time, push sizes,
and how long Envoy took to apply each (its own rds/cds update_success counters). No backend is
called: this measures the control plane and Envoy's config handling only.

    python -m bench.envoy_scale [--routes 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.config import from_dict
from gateway.envoy import ads
from gateway.envoy.bootstrap import bootstrap, render
from gateway.envoy.compile import CLUSTER, ROUTE, Compiler
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


def counter(admin: int, name: str) -> int:
    url = f"http://127.0.0.1:{admin}/stats?filter=^{name}$"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return -1
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(status.split("VmRSS:")[1].split()[0]) / 1024, 1)


async def wait(admin: int, name: str, above: int, timeout: float) -> float:
    started = time.monotonic()
    while await asyncio.to_thread(counter, admin, name) <= above:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{name} not above {above} after {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def run(routes: int) -> dict:
    xds = ads.XdsServer(CollectorRegistry())
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
    envoy = subprocess.Popen(  # noqa: ASYNC220
        [tool("envoy"), "-c", str(boot), "--disable-hot-restart", "--base-id", "78",
         "--concurrency", "1", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        rds = "http.tensorgate.rds.tensorgate.update_success"
        t0 = time.monotonic()
        cds_s = await wait(admin, "cluster_manager.cds.update_success", 0, 300)
        initial_s = await wait(admin, rds, 0, 300)
        initial_total = time.monotonic() - t0
        before = await asyncio.to_thread(counter, admin, rds)
        changed = from_dict(config(routes, port, listen, 50))
        t = time.perf_counter()
        resources2 = compiler.compile(changed)
        recompile_s = time.perf_counter() - t
        pushed: list[float] = []
        xds.listeners.append(
            lambda node, kind, version, what: (
                pushed.append(time.monotonic()) if (kind, what) == ("rds", "push") else None
            )
        )
        t1 = time.monotonic()
        xds.set_snapshot(resources2)
        change_s = await wait(admin, rds, before, 60)
        result = {
            "routes": routes,
            "clusters": len(resources.by_type[CLUSTER]),
            "cds_bytes": sum(c.ByteSize() for c in resources.by_type[CLUSTER].values()),
            "rds_bytes": resources.by_type[ROUTE]["tensorgate"].ByteSize(),
            "compile_s": round(compile_s, 3),
            "initial_apply_s": round(initial_total, 3),
            "initial_cds_applied_s": round(cds_s, 3),
            "eds_pushes": xds.metrics.pushes.labels("eds")._value.get(),
            "one_weight_recompile_s": round(recompile_s, 3),
            "one_weight_push_to_applied_s": round(change_s, 3),
            "of_which_control_plane_s": round(pushed[0] - t1, 3) if pushed else None,
            "cds_pushes": xds.metrics.pushes.labels("cds")._value.get(),
            "rds_pushes": xds.metrics.pushes.labels("rds")._value.get(),
            "nacks": sum(xds.metrics.nacks.labels(k)._value.get() for k in ("cds", "rds")),
            "envoy_rss_mb": rss_mb(envoy.pid),
        }  # fmt: skip
        del initial_s, t0
        return result
    finally:
        envoy.terminate()
        envoy.wait(15)
        await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.envoy_scale", description=__doc__)
    parser.add_argument("--routes", type=int, default=10_000)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.routes)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
