"""`serve --workers` (issue 11): throughput and CPU per call for 1 and 2 workers vs direct.

Starts one real Triton (deploy/demo/models) and two gateways with the same route (`linear` ->
demo_linear v1): `tensorgate serve` (one process) and `tensorgate serve --workers 2`. Then, per
concurrency level, the same closed loop (bench.loadgen.closed_loop) against each target in
mirrored order (direct, gateway-w1, gateway-w2, gateway-w2, gateway-w1, direct; --rounds times),
spread over --channels client channels, each its own TCP connection: SO_REUSEPORT balances
connections, not calls, and grpc would otherwise put every channel of this process on one.

CPU per call counts every process of the target: for a gateway, the supervisor and its workers
(its process group); for Triton, tritonserver and its python-backend stub. The 2-worker legs
also record how many calls each worker served (the supervisor's /metrics, label `worker`).

    python -m bench.workers [--duration 16] [--concurrency 16] [--channels 16] [--rounds 1]

Everything (this load generator, the gateways, Triton) shares the machine's cores; on a 2-core
machine the load generator and Triton take a large part of them. Writes bench/results/*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.gateway_vs_direct import (
    BACKEND_MODEL,
    BACKEND_VERSION,
    GATEWAY_READY_LINE,
    GatewayProcess,
    Target,
    add_load_options,
    check_answers,
    leg_settings,
    machine_info,
    measure_leg,
    parse_load_args,
    process_group,
    source_state,
    write_results,
)
from bench.legs import leg_kwargs, machine_line, print_leg, run_mirrored, running
from bench.loadgen import LoadResult, run_load
from tests.backends.triton import TritonServer

ROUTE = "linear"
WORKERS_UP = "workers up:"  # the supervisor's line once all workers serve (gateway/workers.py)


class WorkersGateway(GatewayProcess):
    """`tensorgate serve [--workers N]` with bench.gateway_vs_direct's config, in its own dir."""

    def __init__(self, triton_address: str, workdir: Path, workers: int) -> None:
        self.name = f"gateway-w{workers}"
        self.ready_line = WORKERS_UP if workers > 1 else GATEWAY_READY_LINE
        own = workdir / self.name  # own config and state dir
        own.mkdir(parents=True, exist_ok=True)
        super().__init__(triton_address, own)
        self.workers = workers

    def command(self) -> list[str]:
        command = super().command()
        return [*command, "--workers", str(self.workers)] if self.workers > 1 else command

    def served(self) -> dict[str, float]:
        """tensorgate_requests_total by worker label ("" for a single process)."""
        counts: Counter[str] = Counter()
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == "tensorgate_requests_total":
                    counts[s.labels.get("worker", "")] += s.value
        return dict(counts)


async def measure(
    args: argparse.Namespace,
    triton: TritonServer,
    targets: Sequence[Target],
    gateways: dict[str, WorkersGateway],
) -> tuple[list[dict], dict[tuple[str, int], LoadResult]]:
    await check_answers(targets)

    async def leg(target: Target, concurrency: int, _pass: int) -> tuple[dict, LoadResult]:
        gw = gateways.get(target.name)
        cpu_sets = {"gateway": functools.partial(process_group, gw.pid)} if gw else {}
        before = gw.served() if gw else {}
        record, result = await measure_leg(
            target,
            concurrency,
            **leg_kwargs(args, triton),
            cpu_sets=cpu_sets,
            load=functools.partial(
                run_load,
                target.address,
                target.model,
                version=target.version,
                channels=args.channels,
            ),
        )
        record["channels"] = args.channels
        split = ""
        if gw:
            after = gw.served()
            served = {w: int(after[w] - before.get(w, 0)) for w in sorted(after)}
            record["served_by_worker"] = served  # warm-up included
            if gw.workers > 1:
                total = sum(served.values()) or 1
                split = "  by worker " + "/".join(
                    f"{100 * n / total:.0f}%" for n in served.values()
                )
        gw_us = record["cpu"].get("gateway", {}).get("us_per_call", "-")
        label = f"c={concurrency:<3} {target.name:<11}"
        print_leg(label, result, record, f"gateway CPU {gw_us} us/call{split}", rps_width=7)
        return record, result

    return await run_mirrored(args.concurrency, targets, args.rounds, leg)


def report(
    runs: list[dict], merged: dict[tuple[str, int], LoadResult], levels: Sequence[int]
) -> tuple[str, list[dict]]:
    header = (
        f"{'target':<11} {'conc':>4} {'rps':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}   "
        f"{'CPU us/call: loadgen / gateway / triton':<40} {'gw cores':>8}   other procs (legs)"
    )
    lines = [header, "-" * len(header)]
    rows = []
    for c in levels:
        names = dict.fromkeys(r["name"] for r in runs if r["concurrency"] == c)
        for name in names:
            legs = [r for r in runs if r["name"] == name and r["concurrency"] == c]
            result = merged[(name, c)]
            ok = sum(r["ok"] for r in legs) or 1
            elapsed = sum(r["elapsed_s"] for r in legs) or 1

            def per_call(proc: str, legs=legs, ok=ok) -> float | None:
                if proc not in legs[0]["cpu"]:
                    return None
                return round(1e6 * sum(r["cpu"][proc]["seconds"] for r in legs) / ok, 1)

            cpu = {p: per_call(p) for p in ("loadgen", "gateway", "triton")}
            gateway_s = sum(r["cpu"].get("gateway", {}).get("seconds", 0.0) for r in legs)
            row = {
                "name": name,
                **result.summary(),
                "cpu_us_per_call": cpu,
                "gateway_cores": round(gateway_s / elapsed, 2) if cpu["gateway"] else None,
            }
            rows.append(row)
            errs = ", ".join(f"{k}={v}" for k, v in sorted(result.errors.items())) or "0"
            other = ", ".join(f"{r['other_cores']:.2f}" for r in legs)
            cpu_text = " / ".join(
                "-" if cpu[p] is None else str(cpu[p]) for p in ("loadgen", "gateway", "triton")
            )
            lines.append(
                f"{name:<11} {c:>4} {result.rps:>7.0f} {result.percentile_ms(50):>7.3f} "
                f"{result.percentile_ms(99):>7.3f} {errs:>6}   {cpu_text:<40} "
                f"{row['gateway_cores'] or '-':>8}   {other}"
            )
        base = merged.get(("direct", c))
        w1, w2 = merged.get(("gateway-w1", c)), merged.get(("gateway-w2", c))
        if base and w1 and w2:
            lines.append(
                f"{'ratio':<11} {c:>4}  throughput w1/direct {w1.rps / base.rps:.2f}, "
                f"w2/direct {w2.rps / base.rps:.2f}, w2/w1 {w2.rps / w1.rps:.2f}"
            )
        lines.append("")
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_options(parser, duration=16.0, concurrency=[16], rounds=1)
    parser.add_argument("--channels", type=int, default=16, help="client connections per leg")
    argv_list, args = parse_load_args(parser, argv)
    if args.channels < 1:
        parser.error("--channels must be >= 1")

    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    source = source_state()
    print(machine_line(machine))
    print("the load generator, the gateways and Triton share these cores.", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    triton = TritonServer(args.models)
    gateways: dict[str, WorkersGateway] = {}
    try:
        with running("stopping the gateways and Triton") as fleet:
            t0 = time.monotonic()
            fleet.start_backend(triton)
            targets = [Target("direct", triton.address, BACKEND_MODEL, BACKEND_VERSION, None)]
            for workers in (1, 2):
                gw = fleet.start(WorkersGateway(triton.address, workdir, workers))
                gateways[gw.name] = gw
                targets.append(Target(gw.name, gw.address, ROUTE, "", None))
            print(f"up in {time.monotonic() - t0:.1f} s (logs in {workdir})", flush=True)
            runs, merged = asyncio.run(measure(args, triton, targets, gateways))
    except KeyboardInterrupt:
        return 130
    exit_codes = fleet.exit_codes
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    table, rows = report(runs, merged, args.concurrency)
    print()
    print(table)
    print(f"exit codes after SIGTERM: {exit_codes}")
    output = write_results(
        "workers",
        started,
        argv_list,
        args.output,
        {
            "machine": machine,
            "source": source,
            "settings": {
                **leg_settings(args, [t.name for t in targets]),
                "channels": args.channels,
                "gateway_config": gateways["gateway-w1"].config,
            },
            "summary": rows,
            "runs": runs,
            "exit_codes": exit_codes,
        },
    )
    print(f"results: {output}")
    errors = sum(r.error_count for r in merged.values())
    return 1 if errors or any(exit_codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
