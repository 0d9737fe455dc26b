"""The REST front door, measured: the gateway's KServe v2 REST listener against its own gRPC
listener and against Triton directly (HTTP/REST and gRPC), same run, same load generators
(bench.loadgen for gRPC, bench.http_loadgen's raw keep-alive client for HTTP), mirrored legs;
and the choice of ASGI server: one gateway per server (uvicorn+httptools as shipped,
uvicorn+h11, hypercorn, granian's embedded server), each serving the same RestApp in the
gateway's event loop, compared by the gateway's CPU per call.

Every REST call is the v2 JSON body curl users send (FP32 [1,4], demo_linear v1 through route
`linear`); gRPC calls carry the same tensor in raw_input_contents.

    python -m bench.rest --duration 24 --rounds 2 --concurrency 16
    python -m bench.rest --servers uvicorn            # only the shipped server

Targets (issue 22): the Python REST path's CPU per call <= 1.3x the Python gRPC path's at 16 in
flight. Results: docs/benchmarks.md ("REST front door").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.gateway_vs_direct import (
    BACKEND_MODEL,
    BACKEND_VERSION,
    EXPECTED,
    ROUTE,
    GatewayProcess,
    Target,
    add_load_options,
    check_answers,
    leg_settings,
    machine_info,
    measure_leg,
    parse_load_args,
    report,
    source_state,
    write_results,
)
from bench.http_loadgen import oip_json_body, probe_http, run_http_load
from bench.legs import leg_kwargs, print_leg, run_mirrored, running
from bench.loadgen import DEFAULT_INPUT, LoadResult
from tests.backends.triton import TritonServer, free_port

SERVERS = {
    "uvicorn": "",  # the shipped server (gateway/dataplane/rest/server.py)
    "uvicorn-h11": "bench.rest_servers:uvicorn_h11",
    "hypercorn": "bench.rest_servers:hypercorn",
    "granian": "bench.rest_servers:granian",
}
BODY = oip_json_body(DEFAULT_INPUT, input_name="INPUT0")


class RestGateway(GatewayProcess):
    """The bench gateway with its REST listener on, served by `server`."""

    def __init__(self, triton_address: str, workdir: Path, server: str) -> None:
        super().__init__(triton_address, workdir / server)
        (workdir / server).mkdir(exist_ok=True)
        self.name = f"gateway-{server}"
        self.rest_address = f"127.0.0.1:{free_port()}"
        self.config["listeners"]["rest"] = self.rest_address
        self._factory = SERVERS[server]

    def command(self) -> list[str]:
        command = super().command()
        if self._factory:
            return ["env", f"TENSORGATE_BENCH_REST_SERVER={self._factory}", *command]
        return command


async def _check_rest(name: str, url: str) -> None:
    document = await probe_http(url, BODY)
    got = document["outputs"][0]["data"]
    if got != EXPECTED:
        raise RuntimeError(f"{name}: answered {got}, not {EXPECTED}")
    print(f"answer OK from {name}: {got}")


async def measure(args, triton: TritonServer, grpc_targets, http_targets):
    await check_answers(grpc_targets)
    for target, url in http_targets:
        await _check_rest(target.name, url)
    urls = {target.name: url for target, url in http_targets}
    targets = [*grpc_targets, *(t for t, _ in http_targets)]

    async def leg(target: Target, concurrency: int, _pass: int) -> tuple[dict, LoadResult]:
        load = None
        if target.name in urls:
            load = functools.partial(run_http_load, urls[target.name], BODY)
        record, result = await measure_leg(
            target, concurrency, **leg_kwargs(args, triton), load=load
        )
        hop_us = record["cpu"].get("hop", {}).get("us_per_call", "-")
        print_leg(
            f"c={concurrency:<3} {target.name:<14}", result, record, f"hop CPU {hop_us} us/call"
        )
        return record, result

    return await run_mirrored(args.concurrency, targets, args.rounds, leg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rest", description=__doc__.split("\n")[0]
    )
    add_load_options(parser, duration=24.0, concurrency=[16], rounds=2)
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"ASGI servers to compare, of {', '.join(SERVERS)}")  # fmt: skip
    argv_list, args = parse_load_args(parser, argv)
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - SERVERS.keys()
    if unknown or "uvicorn" not in servers:
        parser.error(f"--servers: of {', '.join(SERVERS)}, uvicorn included")
    started = dt.datetime.now(dt.UTC)
    print(f"machine: {machine_info()}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    triton = TritonServer(args.models, http=True)
    gateways: dict[str, RestGateway] = {}
    with running() as fleet:
        fleet.start_backend(triton)
        for server in servers:
            gateways[server] = fleet.start(RestGateway(triton.address, workdir, server))
        shipped = gateways["uvicorn"]
        grpc_targets = [
            Target("direct", triton.address, BACKEND_MODEL, BACKEND_VERSION, None),
            Target("gateway-grpc", shipped.address, ROUTE, "1", shipped.pid),
        ]
        infer = f"/v2/models/{ROUTE}/versions/1/infer"
        http_targets = [
            (Target("triton-http", triton.http_address, BACKEND_MODEL, BACKEND_VERSION, None),
             f"http://{triton.http_address}/v2/models/{BACKEND_MODEL}/versions/"
             f"{BACKEND_VERSION}/infer"),
            *((Target(f"rest-{name}", gw.rest_address, ROUTE, "1", gw.pid),
               f"http://{gw.rest_address}{infer}") for name, gw in gateways.items()),
        ]  # fmt: skip
        runs, merged = asyncio.run(measure(args, triton, grpc_targets, http_targets))
    names = [t.name for t in grpc_targets] + [t.name for t, _ in http_targets]
    text, rows, _ = report(runs, merged, args.concurrency, names)
    print("\n" + text)
    print('("direct" is Triton over gRPC; triton-http the same Triton over HTTP/REST)')
    verdicts = []
    for c in args.concurrency:
        cpu = {row["name"]: row["cpu_us_per_call"].get("hop") for row in rows
               if row["concurrency"] == c}  # fmt: skip
        grpc_cpu, rest_cpu = cpu.get("gateway-grpc"), cpu.get("rest-uvicorn")
        http_rps = merged[("triton-http", c)].rps
        for name in gateways:
            print(f"c={c}: rest-{name}/triton-http throughput "
                  f"{merged[(f'rest-{name}', c)].rps / http_rps:.3f}")  # fmt: skip
        if grpc_cpu and rest_cpu:
            ratio = round(rest_cpu / grpc_cpu, 3)
            verdicts.append({"concurrency": c, "rest_over_grpc_cpu": ratio, "target": 1.3,
                             "met": ratio <= 1.3})  # fmt: skip
            print(f"c={c}: REST (uvicorn) CPU per call / gRPC's = {ratio} (target <= 1.3)")
        for name in gateways:
            if cpu.get(f"rest-{name}") and rest_cpu:
                print(f"c={c}: rest-{name} CPU per call {cpu[f'rest-{name}']} us "
                      f"({cpu[f'rest-{name}'] / rest_cpu:.2f}x uvicorn+httptools)")  # fmt: skip
    path = write_results("rest", started, argv_list, args.output, {
        "machine": machine_info(), "source": source_state(),
        "settings": {**leg_settings(args, names), "servers": servers,
                     "request": "REST: v2 JSON FP32 [1,4]; gRPC: raw_input_contents"},
        "results": rows, "verdicts": verdicts, "runs": runs,
    })  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
