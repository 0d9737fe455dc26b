"""The gateway's memory: resident set per idle connection and per MiB of requests in flight.

Starts one real Triton serving `hold_fp32` (written here: a python-backend model answering
OUTPUT0 = INPUT0[:1] that holds every execution while a "hold" file exists) and, per part, a
fresh `tensorgate serve` in front of it (route `hold`). The gateway's VmRSS is read after every
step once it stopped moving, and the step's peak (VmHWM, reset through /proc/PID/clear_refs):

- baseline: after start-up and one call;
- connections: N idle client connections (each its own grpc.aio channel that made one call and
  stays open), N ascending; RSS per connection = slope of a least-squares fit of RSS over N;
  the gateway's open sockets are counted to show the connections are real;
- in flight: K concurrent calls of S MiB of FP32 each, all held at Triton (the gateway has
  dispatched all K: tensorgate_backend_requests_in_flight) for several totals K x S; RSS per
  MiB in flight = slope of RSS held over the total; then released, and RSS after they answered;
- bounds: limits.max_in_flight_bytes at a quarter of the largest total, offered that total at
  once (the memory bulkhead refuses what is over the budget), then requests over
  limits.max_request_bytes (refused unparsed, but gRPC receives them in full first);
- rest: connections and in flight again through the KServe v2 REST listener (binary tensors);
- idle: each gateway's RSS once more after --idle seconds without calls (is memory given back?).

    python -m bench.memory            # full: N 0,100,500,1000; S 2 and 8 MiB; 0..128 MiB
    python -m bench.memory --quick    # under a minute

The JSON goes to bench/results/memory-<UTC time>.json (gitignored)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from bench.gateway_vs_direct import GatewayProcess, machine_info, source_state, write_results
from bench.loadgen import OWN_CONNECTION
from tests.backends.triton import TritonServer, free_port

MIB = 1 << 20
MODEL = "hold_fp32"
ROUTE = "hold"
PLANS = {
    "full": {"connections": [0, 100, 500, 1000], "sizes": [2, 8], "totals": [16, 64, 128]},
    "quick": {"connections": [0, 50, 200], "sizes": [4], "totals": [8, 16, 32]},
}
PARTS = ("connections", "in_flight", "bounds", "rest")

_CONFIG = """name: "hold_fp32"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters { key: "hold_file", value: { string_value: "HOLD" } }
"""
# One instance: while the first execution waits, Triton queues every later call, so all K stay
# in flight at the gateway; once the file is gone each execution returns at once.
_MODEL = """import json, os, time

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_HOLD_S = 120.0  # a bench that died must not leave Triton stuck


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.hold_file = parameters["hold_file"]["string_value"]

    def execute(self, requests):
        deadline = time.monotonic() + MAX_HOLD_S
        while os.path.exists(self.hold_file) and time.monotonic() < deadline:
            time.sleep(0.01)
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array(x[:1]))]))
        return out
"""


def write_repository(workdir: Path) -> tuple[Path, Path]:
    """(model repository, hold file)."""
    repo, hold = workdir / "models", workdir / "hold"
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.pbtxt").write_text(_CONFIG.replace("HOLD", str(hold)))
    (repo / MODEL / "1" / "model.py").write_text(_MODEL)
    return repo, hold


# ------------------------------------------------------------------------------ process memory


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid`, in MiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {x[:5]: int(x.split()[1]) / 1024 for x in lines if x[:5] in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (Linux >= 4.0), so the next read of VmHWM is this step's peak."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += fd.readlink().name.startswith("socket:")
    return count


def set_hold(hold: Path, on: bool) -> None:
    """While the file exists, Triton's hold_fp32 holds every call it gets."""
    if on:
        hold.touch()
    else:
        hold.unlink(missing_ok=True)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


async def settle(pid: int, minimum: float, maximum: float = 20.0, band: float = 0.5) -> dict:
    """RSS once it stayed within `band` MiB for a second (at least `minimum` s, at most
    `maximum` s: gRPC frees receive buffers on its own threads, late when the CPU is busy)."""
    started = time.monotonic()
    window: list[float] = []
    while True:
        window = [*window[-4:], memory(pid)["VmRSS"]]
        waited = time.monotonic() - started
        still = len(window) == 5 and max(window) - min(window) <= band
        if waited >= maximum or (waited >= minimum and still):
            return {"rss": round(window[-1], 1), "settled_s": round(waited, 1), "stable": still}
        await asyncio.sleep(0.25)


# ------------------------------------------------------------------------------ gateway, clients


class MemoryGateway(GatewayProcess):
    """`tensorgate serve` with route `hold` -> Triton hold_fp32; optionally REST and limits."""

    def __init__(self, name: str, triton: str, workdir: Path, rest: bool = False, limits=None):
        self.name = name
        (workdir / name).mkdir()
        super().__init__(triton, workdir / name)
        self.config["backends"][0]["per_try_timeout"] = "150s"
        variant = {"name": "a", "backend": "triton", "backend_model": MODEL, "weight": 1}
        self.config["routes"] = [{"model": ROUTE, "variants": [variant]}]
        self.rest_address = f"127.0.0.1:{free_port()}" if rest else None
        if rest:
            self.config["listeners"]["rest"] = self.rest_address
        if limits:
            self.config["limits"] = limits

    def at_backend(self) -> int:
        """Calls the gateway has dispatched to Triton and not yet had answered."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        name = "tensorgate_backend_requests_in_flight{"
        return int(sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(name)))


def infer_request(mib: float) -> oip.ModelInferRequest:
    elements = int(mib * MIB) // 4
    request = oip.ModelInferRequest(model_name=ROUTE)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[elements])
    request.raw_input_contents.append(np.ones(elements, np.float32).tobytes())
    return request


def grpc_infer(channel: grpc.aio.Channel) -> Callable[[oip.ModelInferRequest], Awaitable[str]]:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def call(request: oip.ModelInferRequest) -> str:
        try:
            await stub.ModelInfer(request, timeout=150)
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return "OK"

    return call


def rest_body(mib: float) -> tuple[bytes, int]:
    """A binary-tensor infer body of `mib` MiB and its JSON header's length."""
    elements = int(mib * MIB) // 4
    tensor = {"name": "INPUT0", "shape": [elements], "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": elements * 4}
    head = json.dumps({"inputs": [tensor]}).encode()
    return head + np.ones(elements, np.float32).tobytes(), len(head)


async def http_call(reader, writer, method: str, path: str, body=b"", extra="") -> int:
    """One HTTP/1.1 request on a kept-alive connection; the status code."""
    head = f"{method} {path} HTTP/1.1\r\nhost: gw\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def rest_infer(address: str, body: bytes, head_length: int) -> str:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        path = f"/v2/models/{ROUTE}/infer"
        extra = f"inference-header-content-length: {head_length}\r\n"
        status = await http_call(reader, writer, "POST", path, body, extra)
        return "OK" if status == 200 else f"HTTP {status}"
    finally:
        writer.close()


# ------------------------------------------------------------------------------ the measurements

COLUMNS = ("gateway", "step", "RSS before", "RSS", "peak", "after", "load", "outcome")
ROW = "{:<10} {:<24} {:>10} {:>8} {:>8} {:>8} {:>5} {}"


def show(rows: list[dict], row: dict) -> None:
    """Adds `row` and prints it as a line of the table (MiB; peak = VmHWM during the step)."""
    row["load"] = loadavg()
    rows.append(row)
    cells = [row["gateway"], row["step"]]
    cells += [row.get(k, "") for k in ("rss_before", "rss", "peak", "rss_after", "load")]
    print(ROW.format(*cells, row.get("outcome", "")), flush=True)


async def connections(gw: MemoryGateway, levels: Sequence[int], rest: bool, args, rows) -> None:
    """N idle connections (one call each, then kept open), N ascending; then all closed."""
    opened: list = []
    small = infer_request(16 / MIB)

    async def open_one():
        if rest:
            host, port = gw.rest_address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            status = await http_call(reader, writer, "GET", "/v2/health/ready")
            return writer if status == 200 else RuntimeError(f"ready: HTTP {status}")
        channel = grpc.aio.insecure_channel(gw.address, options=OWN_CONNECTION)
        code = await grpc_infer(channel)(small)
        return channel if code == "OK" else RuntimeError(f"ModelInfer: {code}")

    base = sockets(gw.pid)
    for n in sorted(levels):
        while len(opened) < n:
            opened += await asyncio.gather(*(open_one() for _ in range(min(50, n - len(opened)))))
            if errors := [e for e in opened if isinstance(e, Exception)]:
                raise errors[0]
        state = await settle(gw.pid, args.settle)
        more = sockets(gw.pid) - base
        row = {"gateway": gw.name, "part": "connections", "n": n, "sockets": more, **state}
        show(rows, {**row, "step": f"{n} idle connections", "outcome": f"+{more} sockets"})
    for item in opened:
        if asyncio.iscoroutine(closing := item.close()):
            await closing
    state = await settle(gw.pid, args.settle)
    show(rows, {"gateway": gw.name, "part": "closed", "step": "all closed", "outcome": "", **state})


async def held(gw, send: Callable[[], Awaitable[str]], k: int, hold: Path, args) -> dict:
    """K calls at once, held at Triton until the gateway's RSS settles, then released. The peak
    is VmHWM since the step began (the kernel's RSS counters lag by a few hundred KiB, so at
    least the held reading)."""
    before = await settle(gw.pid, args.settle)
    reset_peak(gw.pid)
    set_hold(hold, True)
    tasks = [asyncio.create_task(send()) for _ in range(k)]
    try:
        deadline = time.monotonic() + 120
        # Every call is either at Triton or already answered (refused by the gateway).
        while sum(t.done() for t in tasks) + await asyncio.to_thread(gw.at_backend) < k:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{k} calls never all reached Triton")
            await asyncio.sleep(0.1)
        state = await settle(gw.pid, args.settle)
        at_backend = await asyncio.to_thread(gw.at_backend)
    finally:
        set_hold(hold, False)
    codes = dict(Counter(await asyncio.gather(*tasks)))
    after = await settle(gw.pid, args.settle)
    return {
        "calls": k, "at_backend": at_backend, "codes": codes, "rss_before": before["rss"],
        **state, "peak": round(max(memory(gw.pid)["VmHWM"], state["rss"]), 1),
        "rss_after": after["rss"],
        "outcome": f"{at_backend} held; " + " ".join(f"{c} {n}" for c, n in codes.items()),
    }  # fmt: skip


def sender(gw: MemoryGateway, size: float, rest: bool) -> Callable[[], Awaitable[str]]:
    if rest:
        body, head_length = rest_body(size)
        return lambda: rest_infer(gw.rest_address, body, head_length)
    # One channel (one connection) for all: the per-connection cost is measured on its own.
    call, request = grpc_infer(grpc.aio.insecure_channel(gw.address)), infer_request(size)
    return lambda: call(request)


async def in_flight(gw, size: float, totals: Sequence[int], hold: Path, rest: bool, args, rows):
    """K x `size` MiB held for each total (K = total / size)."""
    send = sender(gw, size, rest)
    state = await settle(gw.pid, args.settle)
    row = {"gateway": gw.name, "part": "in_flight", "total_mib": 0, "size_mib": size}
    show(rows, {**row, "step": "nothing in flight", "outcome": "", **state})
    for total in totals:
        k = max(1, round(total / size))
        step = await held(gw, send, k, hold, args)
        row.update(total_mib=total, expected={"OK": k}, step=f"{k} x {size:g} MiB held")
        show(rows, {**row, **step})


async def idle(gw: MemoryGateway, args, rows) -> None:
    await asyncio.sleep(args.idle)
    state = await settle(gw.pid, args.settle)
    show(rows, {"gateway": gw.name, "part": "idle", "step": f"{args.idle:g} s idle", **state})


async def bounds(gw, size: float, offered: int, budget: int, hold: Path, args, rows) -> None:
    """`offered` MiB of `size` MiB calls at once against a `budget` MiB memory bulkhead; then
    the same MiB in requests of 2 x `size`, over limits.max_request_bytes."""
    for name, mib in (("over_budget", size), ("oversized", 2 * size)):
        k, request = max(1, round(offered / mib)), infer_request(mib)
        ok = min(k, budget * MIB // request.ByteSize()) if name == "over_budget" else 0
        expected = {"OK": ok, "RESOURCE_EXHAUSTED": k - ok} if ok else {"INVALID_ARGUMENT": k}
        step = await held(gw, sender(gw, mib, False), k, hold, args)
        row = {"gateway": gw.name, "part": name, "size_mib": mib, "total_mib": offered}
        show(rows, {**row, "expected": expected, "step": f"{name} {k} x {mib:g} MiB", **step})


async def run(args, triton: TritonServer, hold: Path, workdir: Path) -> list[dict]:
    plan = PLANS["quick" if args.quick else "full"]
    rows: list[dict] = []
    gateways: list[MemoryGateway] = []

    async def gateway(name: str, **kwargs) -> MemoryGateway:
        gw = MemoryGateway(name, triton.address, workdir, **kwargs)
        gateways.append(gw)
        await asyncio.to_thread(gw.start)
        channel = grpc.aio.insecure_channel(gw.address)
        code = await grpc_infer(channel)(infer_request(16 / MIB))
        await channel.close()
        if code != "OK":
            raise RuntimeError(f"{name}: the first call answered {code}")
        state = {**await settle(gw.pid, args.settle), "peak": round(memory(gw.pid)["VmHWM"], 1)}
        show(
            rows,
            {"gateway": name, "part": "baseline", "step": "up, one call", "outcome": "", **state},
        )
        return gw

    print(ROW.format(*COLUMNS), flush=True)
    try:
        if "connections" in args.parts:
            gw = await gateway("grpc-conn")
            await connections(gw, plan["connections"], False, args, rows)
            await idle(gw, args, rows)
        for size in plan["sizes"] if "in_flight" in args.parts else ():
            gw = await gateway(f"grpc-{size}m")
            await in_flight(gw, size, plan["totals"], hold, False, args, rows)
            await idle(gw, args, rows)
        if "bounds" in args.parts:
            size, offered = plan["sizes"][-1], plan["totals"][-1]
            limits = {
                "max_request_bytes": (size + 1) * MIB,
                "max_in_flight_bytes": offered * MIB // 4,
            }
            gw = await gateway("bounded", limits=limits)
            await bounds(gw, size, offered, offered // 4, hold, args, rows)
            await idle(gw, args, rows)
        if "rest" in args.parts:
            gw = await gateway("rest", rest=True)
            await connections(gw, plan["connections"], True, args, rows)
            await in_flight(gw, plan["sizes"][-1], plan["totals"], hold, True, args, rows)
            await idle(gw, args, rows)
    finally:
        set_hold(hold, False)
        for gw in gateways:
            rows.append({"gateway": gw.name, "part": "exit", "exit_code": gw.stop()})
    return rows


# ------------------------------------------------------------------------------ report


def fit(points: Sequence[tuple[float, float]]) -> dict:
    """Least-squares slope of y over x, and the correlation."""
    xs, ys = zip(*points, strict=True)
    slope, _ = statistics.linear_regression(xs, ys)
    return {
        "slope": slope,
        "r": round(statistics.correlation(xs, ys), 4) if len(set(ys)) > 1 else 0,
    }


def figures(rows: list[dict]) -> dict:
    """Per gateway: KiB per idle connection, MiB per MiB in flight, what the bounds did."""
    out: dict = {}
    for name in dict.fromkeys(r["gateway"] for r in rows):
        mine = [r for r in rows if r["gateway"] == name]
        conns = [(r["n"], r["rss"]) for r in mine if r["part"] == "connections"]
        held = [r for r in mine if r["part"] == "in_flight"]
        got = out.setdefault(name, {})
        if len(conns) > 1:
            line = fit(conns)
            got.update(kib_per_connection=round(line["slope"] * 1024, 1), connections_r=line["r"])
        if len(held) > 1:
            line = fit([(r["total_mib"], r["rss"]) for r in held])
            got.update(mib_per_mib=round(line["slope"], 3), in_flight_r=line["r"])
            got["kept_after_mib"] = round(held[-1]["rss_after"] - held[0]["rss"], 1)
        for r in mine:
            if r["part"] in ("over_budget", "oversized") or r is (held[-1] if held else None):
                got[f"{r['part']}_peak_over_start_mib"] = round(r["peak"] - r["rss_before"], 1)
                got[f"{r['part']}_held_over_start_mib"] = round(r["rss"] - r["rss_before"], 1)
            if r["part"] == "idle":  # what the gateway kept once everything was over
                got["idle_over_baseline_mib"] = round(r["rss"] - mine[0]["rss"], 1)
    return out


def failures(rows: list[dict]) -> list[str]:
    """Calls answered other than expected, connections not all open, a gateway's bad exit."""
    bad = [f"{r['gateway']} {r['step']}: {r['codes']}, expected {r['expected']}"
           for r in rows if "expected" in r and r["codes"] != r["expected"]]  # fmt: skip
    bad += [f"{r['gateway']}: {r['n']} connections, +{r['sockets']} sockets"
            for r in rows if r["part"] == "connections" and r["sockets"] < r["n"]]  # fmt: skip
    return bad + [f"{r['gateway']} exited {r['exit_code']}" for r in rows if r.get("exit_code")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small plan, under a minute")
    parser.add_argument("--parts", help=f"subset of {','.join(PARTS)} (--quick: all but rest)")
    parser.add_argument("--settle", type=float, help="least seconds before an RSS reading (2)")
    parser.add_argument("--idle", type=float, help="seconds before the last reading (10)")
    parser.add_argument("--output", type=Path, help="JSON path")
    args = parser.parse_args(argv)
    default_parts = PARTS[:3] if args.quick else PARTS
    args.parts = args.parts.split(",") if args.parts else list(default_parts)
    if set(args.parts) - set(PARTS):
        parser.error(f"--parts: choose from {','.join(PARTS)}")
    args.settle = args.settle or (1.0 if args.quick else 2.0)
    args.idle = args.idle if args.idle is not None else (3.0 if args.quick else 10.0)

    started = dt.datetime.now(dt.UTC)
    machine, source = machine_info(), source_state()
    print(
        f"{machine['cores']} cores, load avg {' '.join(machine['loadavg_at_start'])}, "
        f"commit {(source['commit'] or 'unknown')[:12]}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    repo, hold = write_repository(workdir)
    triton = TritonServer(repo)
    try:
        triton.start()
        rows = asyncio.run(run(args, triton, hold, workdir))
    finally:
        triton.stop()
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    found, bad = figures(rows), failures(rows)
    print()
    for name, values in found.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    for problem in bad:
        print(f"FAILED: {problem}")
    payload = {"machine": machine, "source": source, "parts": args.parts, "settle_s": args.settle}
    payload["idle_s"] = args.idle
    payload.update(plan=PLANS["quick" if args.quick else "full"], figures=found, failures=bad)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    output = write_results("memory", started, argv_list, args.output, {**payload, "rows": rows})
    print(f"results: {output}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
