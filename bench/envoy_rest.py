"""Envoy mode over KServe v2 REST vs Triton's own HTTP endpoint: the same closed-loop load, one run.

Starts one real Triton (deploy/demo/models) with its HTTP endpoint on, one `tensorgate serve` with
listeners.xds, listeners.rest and envoy.rest_listen (the control plane; the Python REST listener
takes what Envoy hands over, which here must be nothing), and one Envoy 1.40 bootstrapped by
`tensorgate envoy-bootstrap`, then measures per concurrency level, in mirrored order, with the
same HTTP/1.1 load generator (bench.http_loadgen, one keep-alive connection per caller, a
prebuilt JSON body: FP32 [1,4]):

- `direct`: Triton's HTTP endpoint, POST /v2/models/demo_linear/versions/1/infer;
- `envoy`: Envoy's REST listener, the same path and body: a plain route Envoy serves alone (two
  variants 80/20 by weight, both demo_linear v1, retries on UNAVAILABLE, outlier detection; the
  Lua body check, the exact-path match table, weighted clusters on HTTP/1.1 to Triton);
- `envoy-unpinned` (with --unpinned): Envoy, POST /v2/models/demo_linear/infer (the route
  rewrites the path to version 1);
- `gateway` (with --gateway): the gateway's own REST listener, same path and body (the Python
  REST path; its own benchmark is the Python path's);
- `envoy-bare` (with --bare): a second Envoy, same binary and flags, with the least an Envoy hop
  can be: one static route forwarding every call to Triton's HTTP port over HTTP/1.1, no filter
  but the router, no retries. Not a tensorgate path: it separates the cost of the hop itself
  from the cost of tensorgate's REST listener (Lua body check, match table, weights, retries).

    python -m bench.envoy_rest [--duration 10] [--concurrency 16] [--rounds 1] [--unpinned] [--bare]

Everything shares the machine's cores (load generator, Envoy, gateway, Triton): results are
ratios within one run, noisy on a shared machine; run it on a quiet one. The run fails (exit 1)
on any error, and when the gateway's REST cluster in Envoy took a call (Envoy must serve this
route alone). Writes bench/results/envoy_rest-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.envoy_mode import BareEnvoyProcess, ControlPlaneGateway, EnvoyProcess, socket_address
from bench.gateway_vs_direct import (
    BACKEND_MODEL,
    BACKEND_VERSION,
    EXPECTED,
    Target,
    add_load_options,
    leg_settings,
    machine_info,
    measure_leg,
    parse_load_args,
    report,
    source_state,
    write_results,
)
from bench.http_loadgen import oip_json_body, run_http_load
from bench.legs import leg_kwargs, print_leg, run_mirrored, running
from bench.loadgen import LoadResult
from tests.backends.triton import TritonServer, free_port

PINNED = f"/v2/models/{BACKEND_MODEL}/versions/{BACKEND_VERSION}/infer"
UNPINNED = f"/v2/models/{BACKEND_MODEL}/infer"


class RestGateway(ControlPlaneGateway):
    """bench.envoy_mode's gateway (route demo_linear: variants a/b, 80/20, both v1) with the REST
    listener, Envoy's REST listener, and Triton's HTTP endpoint as the backend's rest_address."""

    def __init__(self, triton: TritonServer, workdir: Path) -> None:
        super().__init__(triton.address, workdir)
        self.rest_port = free_port()
        self.envoy_rest_port = free_port()
        self.config["listeners"]["rest"] = f"127.0.0.1:{self.rest_port}"
        self.config["envoy"]["rest_listen"] = f"127.0.0.1:{self.envoy_rest_port}"
        self.config["backends"][0]["rest_address"] = triton.http_address


class BareRestEnvoy(BareEnvoyProcess):
    """bench.envoy_mode's bare Envoy, its one cluster speaking HTTP/1.1 to Triton's HTTP port."""

    name = "envoy-bare-rest"

    def __init__(self, triton: TritonServer, workdir: Path) -> None:
        super().__init__(triton.address, workdir)
        config = json.loads(self.bootstrap.read_text())
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        manager["typed_config"]["codec_type"] = "AUTO"
        (cluster,) = config["static_resources"]["clusters"]
        cluster["typed_extension_protocol_options"].clear()  # HTTP/1.1, Envoy's default
        host, port = triton.http_address.rsplit(":", 1)
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"] = socket_address(host, int(port))
        self.bootstrap.write_text(json.dumps(config, indent=1))


def _envoy_counters(envoy: EnvoyProcess) -> dict[str, int]:
    url = f"http://127.0.0.1:{envoy.admin_port}/stats?filter=upstream_rq_total$"
    with urllib.request.urlopen(url, timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    out = {}
    for line in lines:
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out


def _wait_answering(url: str, body: bytes, timeout: float = 30.0) -> None:
    """The REST listener and its routes reach Envoy over xDS after the gRPC ones."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = httpx.post(url, content=body, headers={"content-type": "application/json"})
            if reply.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} does not answer 200")
        time.sleep(0.2)


async def _check_answers(urls: dict[str, str], body: bytes) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for name, url in urls.items():
            reply = await client.post(url, content=body)
            reply.raise_for_status()
            got = reply.json()
            data = got["outputs"][0]["data"]
            if data != EXPECTED or got["model_name"] != BACKEND_MODEL:
                raise RuntimeError(f"{name}: answered {got}, not demo_linear v1's {EXPECTED}")
            print(f"answer OK from {name}: {data}")


async def _measure(args, triton, targets: Sequence[Target], urls: dict[str, str], body: bytes):
    await _check_answers(urls, body)

    async def leg(target: Target, concurrency: int, _pass: int) -> tuple[dict, LoadResult]:
        record, result = await measure_leg(
            target,
            concurrency,
            **leg_kwargs(args, triton),
            load=functools.partial(run_http_load, urls[target.name], body),
        )
        print_leg(f"c={concurrency:<3} {target.name:<15}", result, record)
        return record, result

    return await run_mirrored(args.concurrency, targets, args.rounds, leg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.envoy_rest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_options(parser, duration=10.0, concurrency=[16], rounds=1)
    parser.add_argument("--unpinned", action="store_true", help="also measure envoy-unpinned")
    parser.add_argument("--gateway", action="store_true", help="also measure the gateway's REST")
    parser.add_argument(
        "--bare", action="store_true", help="also measure envoy-bare (the Envoy hop alone)"
    )
    argv_list, args = parse_load_args(parser, argv)

    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    print(f"machine: {machine['cores']} cores, load avg {' '.join(machine['loadavg_at_start'])}")

    workdir = Path(tempfile.mkdtemp(prefix="bench-envoy-rest-"))
    triton = TritonServer(args.models, http=True)
    body = oip_json_body(input_name="INPUT0")
    try:
        with running() as fleet:  # stops Envoy first
            fleet.start_backend(triton)
            gateway = fleet.start(RestGateway(triton, workdir))
            envoy = fleet.start(EnvoyProcess(gateway, workdir))
            envoy_url = f"http://127.0.0.1:{gateway.envoy_rest_port}"
            urls = {"direct": f"http://{triton.http_address}{PINNED}", "envoy": envoy_url + PINNED}
            _wait_answering(urls["envoy"], body)
            targets = [
                Target("direct", triton.http_address, BACKEND_MODEL, BACKEND_VERSION, None),
                Target("envoy", envoy_url, BACKEND_MODEL, BACKEND_VERSION, envoy.pid),
            ]
            if args.unpinned:
                urls["envoy-unpinned"] = envoy_url + UNPINNED
                targets.append(Target("envoy-unpinned", envoy_url, BACKEND_MODEL, "", envoy.pid))
            if args.gateway:
                urls["gateway"] = f"http://127.0.0.1:{gateway.rest_port}{PINNED}"
                targets.append(
                    Target("gateway", urls["gateway"], BACKEND_MODEL, BACKEND_VERSION, gateway.pid)
                )
            if args.bare:
                bare = fleet.start(BareRestEnvoy(triton, workdir))
                urls["envoy-bare"] = f"http://{bare.address}{PINNED}"
                _wait_answering(urls["envoy-bare"], body)
                targets.append(
                    Target("envoy-bare", bare.address, BACKEND_MODEL, BACKEND_VERSION, bare.pid)
                )
            before = _envoy_counters(envoy)
            runs, merged = asyncio.run(_measure(args, triton, targets, urls, body))
            after = _envoy_counters(envoy)
    except KeyboardInterrupt:
        return 130
    names = [t.name for t in targets]
    table, rows, ratios = report(runs, merged, args.concurrency, names)
    print()
    print(table)
    calls = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    handed_over = calls.get("cluster.tensorgate_gateway_rest.upstream_rq_total", 0)
    print(f"envoy upstream calls by cluster during the run: {json.dumps(calls)}")
    output = write_results(
        "envoy_rest",
        started,
        argv_list,
        args.output,
        {
            "machine": machine,
            "source": source_state(),
            "settings": {**leg_settings(args, names), "request": "POST JSON FP32 [1,4], HTTP/1.1"},
            "gateway_config": gateway.config,
            "summary": rows,
            "ratios": ratios,
            "runs": runs,
            "envoy_upstream_calls": calls,
        },
    )
    print(f"results: {output}")
    if handed_over:
        print(f"FAILED: {handed_over} calls went to the gateway's REST listener", file=sys.stderr)
    return 1 if handed_over or sum(r.error_count for r in merged.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
