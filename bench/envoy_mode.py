"""Envoy mode vs the Python gateway vs direct: the same closed-loop load, one run.

Starts one real Triton (deploy/demo/models), one `tensorgate serve` with listeners.xds (the
control plane, and the Python data plane), and one Envoy 1.40 (tools venv) bootstrapped by
`tensorgate envoy-bootstrap`, then measures, per concurrency level, in mirrored order:

- `direct`: Triton itself, model demo_linear version 1;
- `envoy`: Envoy, model `linear` (public name; Envoy reads it from the body with Lua, picks one
  of two variants 80/20, and renames it to demo_linear v1 for Triton with its upstream filter),
  retries (UNAVAILABLE) and outlier detection on;
- `envoy-plain` (with --plain): Envoy, model `demo_linear` pinned to version 1: the same weights,
  retries and outlier detection, but no rename (the route's names are Triton's);
- `gateway`: the Python gateway, model `linear`, the same route table;
- `envoy-bare` (with --bare): a second Envoy, same binary and flags, with the least an Envoy hop
  can be: one static route forwarding every call to Triton, no filter but the router, no
  retries. Not a tensorgate path; it separates the cost of the hop itself (Envoy's HTTP/2
  proxying on this machine) from the cost of tensorgate's listener (Lua body read, route
  table, weights, retries, stats, trailers).

    python -m bench.envoy_mode [--duration 10] [--concurrency 1,16] [--rounds 1] [--plain] [--bare]

Everything shares the machine's cores (load generator, Envoy, gateway, Triton); results are
noisy on a shared machine. Writes bench/results/envoy_mode-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.gateway_vs_direct import (
    BACKEND_MODEL,
    BACKEND_VERSION,
    GatewayProcess,
    ServerProcess,
    Target,
    add_load_options,
    leg_settings,
    machine_info,
    measure,
    parse_load_args,
    report,
    source_state,
    write_results,
)
from bench.legs import running
from tests.backends.process import tool
from tests.backends.triton import TritonServer, free_port

ROUTE = "linear"


class ControlPlaneGateway(GatewayProcess):
    """The bench gateway with listeners.xds on, and a route table Envoy can serve alone."""

    def __init__(self, triton_address: str, workdir: Path) -> None:
        super().__init__(triton_address, workdir)
        self.xds_port = free_port()
        self.envoy_port = free_port()
        self.config["listeners"]["xds"] = f"127.0.0.1:{self.xds_port}"
        self.config["envoy"] = {"listen": f"127.0.0.1:{self.envoy_port}"}
        self.config["backends"][0]["circuit_breaker"] = {"consecutive_failures": 5}

        def variant(name: str, weight: int) -> dict:
            return {
                "name": name,
                "backend": "triton",
                "backend_model": BACKEND_MODEL,
                "backend_version": BACKEND_VERSION,
                "version": "1",
                "weight": weight,
            }

        retry = {"retry": {"max_attempts": 2, "retry_on": ["UNAVAILABLE"]}}
        self.config["routes"] = [
            {"model": ROUTE, "variants": [variant("a", 80), variant("b", 20)], "policy": retry},
            {
                "model": BACKEND_MODEL,
                "variants": [
                    {**variant("a", 80), "backend_model": ""},
                    {**variant("b", 20), "backend_model": ""},
                ],
                "policy": retry,
            },
        ]


class EnvoyProcess(ServerProcess):
    name = "envoy"

    def __init__(self, gateway: ControlPlaneGateway, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = gateway.envoy_port
        self.address = f"127.0.0.1:{self.port}"
        self.admin_port = free_port()
        self.bootstrap = workdir / "envoy.json"
        subprocess.run(
            [sys.executable, "-m", "gateway.cli", "envoy-bootstrap", "-c",
             str(gateway.config_path), "-o", str(self.bootstrap),
             "--admin", f"127.0.0.1:{self.admin_port}", "--node-id", "bench"],
            check=True,
        )  # fmt: skip

    def command(self) -> list[str]:
        return [
            tool("envoy"), "-c", str(self.bootstrap), "--disable-hot-restart",
            "--base-id", "77", "--concurrency", "1", "--log-level", "warn",
        ]  # fmt: skip

    def is_ready(self, channel: grpc.Channel) -> bool:
        url = f"http://127.0.0.1:{self.admin_port}/listeners"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return b"tensorgate" in reply.read()
        except OSError:  # admin not up yet
            return False

    def stats(self) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.admin_port}/stats"
        with urllib.request.urlopen(url, timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        out = {}
        for line in lines:
            name, _, value = line.partition(": ")
            # Backend clusters, one per slot (a variant's place in its route): the weighted split.
            if name.startswith(("cluster.tgb|", "cluster.tga|")) and value.isdigit():
                out[name] = int(value)
        return out


def socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _typed(type_name: str, **fields) -> dict:
    return {"@type": f"type.googleapis.com/envoy.{type_name}", **fields}


class BareEnvoyProcess(EnvoyProcess):
    """Envoy with a static config: every call to Triton, the router the only HTTP filter."""

    name = "envoy-bare"

    def __init__(self, triton_address: str, workdir: Path) -> None:
        ServerProcess.__init__(self, workdir)
        self.admin_port = free_port()
        self.bootstrap = workdir / "envoy-bare.json"
        host, port = triton_address.rsplit(":", 1)
        route = {"match": {"prefix": "/"}, "route": {"cluster": "triton", "timeout": "0s"}}
        manager = _typed(
            "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix="bare",
            codec_type="HTTP2",
            generate_request_id=False,
            route_config={"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            http_filters=[
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": _typed("extensions.filters.http.router.v3.Router"),
                }
            ],
        )
        listener = {
            "name": "tensorgate",  # what is_ready looks for
            "address": socket_address("127.0.0.1", self.port),
            "filter_chains": [
                {"filters": [{"name": "envoy.http_connection_manager", "typed_config": manager}]}
            ],
        }
        http2 = "extensions.upstreams.http.v3.HttpProtocolOptions"
        cluster = {
            "name": "triton",
            "type": "STATIC",
            "connect_timeout": "5s",
            "typed_extension_protocol_options": {
                f"envoy.{http2}": _typed(http2, explicit_http_config={"http2_protocol_options": {}})
            },
            "load_assignment": {
                "cluster_name": "triton",
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": socket_address(host, int(port))}}]}
                ],
            },
        }
        config = {
            "admin": {"address": socket_address("127.0.0.1", self.admin_port)},
            "static_resources": {"listeners": [listener], "clusters": [cluster]},
        }
        self.bootstrap.write_text(json.dumps(config, indent=1))

    def command(self) -> list[str]:
        return [
            tool("envoy"), "-c", str(self.bootstrap), "--disable-hot-restart",
            "--base-id", "79", "--concurrency", "1", "--log-level", "warn",
        ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.envoy_mode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_options(parser, duration=10.0, concurrency=[1, 16], rounds=1)
    parser.add_argument("--plain", action="store_true", help="also measure envoy-plain")
    parser.add_argument(
        "--bare", action="store_true", help="also measure envoy-bare (the Envoy hop alone)"
    )
    argv_list, args = parse_load_args(parser, argv)

    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    print(f"machine: {machine['cores']} cores, load avg {' '.join(machine['loadavg_at_start'])}")

    workdir = Path(tempfile.mkdtemp(prefix="bench-envoy-"))
    triton = TritonServer(args.models)
    try:
        with running() as fleet:  # stops Envoy first
            fleet.start_backend(triton)
            gateway = fleet.start(ControlPlaneGateway(triton.address, workdir))
            envoy = fleet.start(EnvoyProcess(gateway, workdir))
            time.sleep(0.5)  # routes follow the listener over ADS
            targets = [
                Target("direct", triton.address, BACKEND_MODEL, BACKEND_VERSION, None),
                Target("envoy", envoy.address, ROUTE, "", envoy.pid),
            ]
            if args.plain:
                targets.append(Target("envoy-plain", envoy.address, BACKEND_MODEL, "1", envoy.pid))
            if args.bare:
                bare = fleet.start(BareEnvoyProcess(triton.address, workdir))
                targets.append(
                    Target("envoy-bare", bare.address, BACKEND_MODEL, BACKEND_VERSION, bare.pid)
                )
            targets.append(Target("gateway", gateway.address, ROUTE, "", gateway.pid))
            runs, merged = asyncio.run(measure(args, triton, targets))
            envoy_stats = envoy.stats()
    except KeyboardInterrupt:
        return 130
    names = [t.name for t in targets]
    table, rows, ratios = report(runs, merged, args.concurrency, names)
    print()
    print(table)
    split = {k: v for k, v in envoy_stats.items() if k.endswith(".upstream_rq_total")}
    print(f"envoy calls per backend cluster (tgb|backend|slot): {split}")
    output = write_results(
        "envoy_mode",
        started,
        argv_list,
        args.output,
        {
            "machine": machine,
            "source": source_state(),
            "settings": leg_settings(args, names),
            "gateway_config": gateway.config,
            "summary": rows,
            "ratios": ratios,
            "runs": runs,
            "envoy_variant_calls": split,
        },
    )
    print(f"results: {output}")
    return 1 if sum(r.error_count for r in merged.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
