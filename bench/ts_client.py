"""CPU per call of the TorchServe adapter and of the HTTP clients it could use (issue #24).

Starts a real TorchServe (linear v1 and echo v1, one worker each) and, in THIS process, drives
closed loops of `--concurrency` calls in flight. Each leg's figure is this process's CPU time
(user + system, every thread) during the measured window divided by the calls answered in it:
the backend's CPU is in other processes and not counted. Legs:

    raw           bench.http_loadgen.RawConnection: a prebuilt request per keep-alive connection,
                  the answer not even parsed (the floor of any Python client on asyncio)
    httpx         httpx.AsyncClient on its default transport (httpcore), as the adapter was
    http1         httpx.AsyncClient on adapters.http1.HTTP1Transport
    http1-direct  an httpx.Request handed to HTTP1Transport, no client: the adapter's way now
    aiohttp       aiohttp.ClientSession (the usual alternative; a dev dependency here)
    adapter-old   TorchServeAdapter.infer as of --old-ref (git; default ef908f7, before issue 24:
                  httpx.AsyncClient on httpcore, json + tolist)
    adapter       TorchServeAdapter.infer as in the work tree (HTTP1Transport, orjson)

The client legs POST a prebuilt body and decode the JSON answer; the adapter legs do the whole
call (OIP request -> JSON body -> HTTP -> JSON answer -> OIP response). Workloads: `linear` (FP32
[1, 4] -> [1, 3], the toy model) and `echo` (FP32 [1, --values] of pixel values 0..255 echoed
back: the realistic CNN's ~3,500 values a call, encoded and decoded). Legs run in mirrored order
(A B ... B A) per round; `json` also times the old and new body encoding alone.

    flock /tmp/w/bench.lock .venv/bin/python -m bench.ts_client [--duration 4] [--rounds 1]
        [--workload linear,echo] [--legs raw,httpx,http1,http1-direct,aiohttp,adapter-old,adapter]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import kserve_json
from adapters.codecs import oip as oip_codec
from adapters.http1 import HTTP1Transport
from adapters.torchserve import TorchServeAdapter
from bench.http_loadgen import LIMITS, RawConnection
from bench.loadgen import OK, closed_loop
from gateway.dataplane.target import Target
from tensorgate.config.v1 import config_pb2

LEGS = ("raw", "httpx", "http1", "http1-direct", "aiohttp", "adapter-old", "adapter")
OLD_REF = "ef908f7"  # the last commit before issue 24's TorchServe changes
REPO = Path(__file__).resolve().parent.parent


@functools.cache
def old_adapter_class(ref: str) -> type:
    """TorchServeAdapter as adapters/torchserve.py was at `ref` (read with git show; nothing in
    the work tree changes). The old module only uses what kserve_json still offers."""
    source = subprocess.run(
        ["git", "show", f"{ref}:adapters/torchserve.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("adapters._torchserve_old")
    exec(compile(source, f"{ref}:adapters/torchserve.py", "exec"), module.__dict__)
    return module.TorchServeAdapter


LINEAR_SCHEMA = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


def workload(name: str, values: int) -> tuple[str, np.ndarray, dict | None]:
    """(TorchServe model, input array, route schema)."""
    if name == "linear":
        return "linear", np.array([[1, 2, 3, 4]], dtype=np.float32), LINEAR_SCHEMA
    rng = np.random.default_rng(7)
    return "echo", rng.integers(0, 256, (1, values)).astype(np.float32), None


def adapter_for(ts, cls: type | None = None) -> TorchServeAdapter:
    backend = json_format.ParseDict(
        {
            "name": "ts",
            "kind": "BACKEND_KIND_TORCHSERVE",
            "address": ts.inference_url.removeprefix("http://"),
        },
        config_pb2.Backend(),
    )
    return (cls or TorchServeAdapter)(backend)


def client_sender(leg: str, url: str, body: bytes):
    """(`closed_loop` sender factory, close) for a client leg: POST `body`, decode the answer."""
    headers = {"content-type": "application/json"}
    if leg in ("httpx", "http1"):
        transport = HTTP1Transport(limits=LIMITS) if leg == "http1" else None
        client = httpx.AsyncClient(timeout=5.0, limits=LIMITS, transport=transport)

        async def send() -> str:
            reply = await client.post(url, content=body, headers=headers)
            kserve_json.loads(reply.content)
            return OK if reply.status_code == 200 else f"HTTP_{reply.status_code}"

        return (lambda: send), client.aclose
    if leg == "http1-direct":
        transport = HTTP1Transport(limits=LIMITS)
        target = httpx.URL(url)
        timeouts = dict.fromkeys(("connect", "read", "write", "pool"), 5.0)

        async def send() -> str:
            request = httpx.Request(
                "POST", target, content=body, headers=headers, extensions={"timeout": timeouts}
            )
            reply = await transport.handle_async_request(request)
            kserve_json.loads(await reply.aread())
            return OK if reply.status_code == 200 else f"HTTP_{reply.status_code}"

        return (lambda: send), transport.aclose
    if leg == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))

        async def send() -> str:
            async with session.post(url, data=body, headers=headers) as reply:
                kserve_json.loads(await reply.read())
                return OK if reply.status == 200 else f"HTTP_{reply.status}"

        return (lambda: send), session.close

    def make() -> Callable[[], Awaitable[str]]:
        connection = RawConnection(url, body)  # one keep-alive connection per worker

        async def send() -> str:
            status = (await connection.post())[0]
            return OK if status == 200 else f"HTTP_{status}"

        return send

    return make, _nothing


def adapter_sender(leg: str, ts, model: str, array: np.ndarray, schema: dict | None, old_ref: str):
    """(`closed_loop` sender factory, close) for an adapter leg: one OIP call a time."""
    adapter = adapter_for(ts, old_adapter_class(old_ref) if leg == "adapter-old" else None)
    request = oip.ModelInferRequest(model_name=model)
    oip_codec.add_input(request, "x", array, "FP32")
    target = Target(
        model=model,
        variant="v",
        backend="ts",
        backend_model=model,
        backend_version="1",
        version="1",
        weight=1,
        schema=json_format.ParseDict(schema, config_pb2.ModelSchema()) if schema else None,
    )

    async def send() -> str:
        await adapter.infer(request, timeout=5.0, target=target)
        return OK

    return (lambda: send), adapter.close


async def _nothing() -> None:
    return None


async def measure(
    leg: str,
    ts,
    work: str,
    values: int,
    concurrency: int,
    duration: float,
    warmup: float,
    old_ref: str = OLD_REF,
) -> dict:
    model, array, schema = workload(work, values)
    if leg.startswith("adapter"):
        make, close = adapter_sender(leg, ts, model, array, schema, old_ref)
    else:
        body = json.dumps({"inputs": [kserve_json.to_json_tensor("x", array, "FP32")]}).encode()
        make, close = client_sender(leg, f"{ts.inference_url}/predictions/{model}/1", body)
    cpu: dict[str, float] = {}

    def start() -> None:
        cpu["start"] = time.process_time()

    def end() -> None:
        cpu["end"] = time.process_time()

    try:
        window = await closed_loop(
            make,
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            on_window_start=start,
            on_window_end=end,
        )
    finally:
        await close()
    ok = window["ok"]
    latencies = sorted(window["latencies_s"])
    return {
        "leg": leg,
        "workload": work,
        "ok": ok,
        "errors": dict(window["errors"]),
        "calls_per_s": round(ok / window["elapsed_s"], 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "cpu_us_per_call": round((cpu["end"] - cpu["start"]) / ok * 1e6, 1) if ok else None,
    }


def json_micro(values: int, repeat: int = 2000) -> list[dict]:
    """CPU per body of the old (tolist + json.dumps) and new (orjson) encodings, and decoding."""
    _, array, _ = workload("echo", values)
    old_body = json.dumps({"inputs": [kserve_json.to_json_tensor("x", array, "FP32")]}).encode()
    rows = []
    for name, fn in (
        ("encode old", lambda: json.dumps({"inputs": [kserve_json.to_json_tensor(
            "x", array, "FP32")]}).encode()),
        ("encode new", lambda: kserve_json.dumps({"inputs": [kserve_json.to_json_tensor(
            "x", array, "FP32", lists=False)]})),
        ("decode old", lambda: json.loads(old_body)),
        ("decode new", lambda: kserve_json.loads(old_body)),
    ):  # fmt: skip
        fn()
        t0 = time.process_time()
        for _ in range(repeat):
            fn()
        rows.append({"what": name, "values": values,
                     "cpu_us": round((time.process_time() - t0) / repeat * 1e6, 1)})  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ts_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=4.0, help="measured s per leg")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1, help="mirrored blocks")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--values", type=int, default=3500, help="echo workload's values")
    parser.add_argument("--workload", default="linear,echo")
    parser.add_argument("--legs", default=",".join(LEGS))
    parser.add_argument("--old-ref", default=OLD_REF, help="git ref of the adapter-old leg")
    parser.add_argument("--json", type=str, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    legs = [leg for leg in args.legs.split(",") if leg]
    unknown = set(legs) - set(LEGS)
    if unknown:
        parser.error(f"unknown legs: {sorted(unknown)}")
    from tests.backends.torchserve import TorchServe

    rows: list[dict] = json_micro(args.values) if "echo" in args.workload else []
    for row in rows:
        print(f"json {row['what']:<10} {row['values']} values: {row['cpu_us']} us", flush=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with TorchServe(models=[("linear", "1"), ("echo", "1")], workers=1) as ts:
        for work in args.workload.split(","):
            order = []
            for _ in range(args.rounds):
                order += legs + legs[::-1]
            for leg in order:
                row = asyncio.run(
                    measure(
                        leg,
                        ts,
                        work,
                        args.values,
                        args.concurrency,
                        args.duration,
                        args.warmup,
                        args.old_ref,
                    )
                )
                row["loadavg_1m"] = round(os.getloadavg()[0], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if "leg" in row and row["cpu_us_per_call"] is not None:
            summary.setdefault((row["workload"], row["leg"]), []).append(row["cpu_us_per_call"])
    print("\nworkload  leg            CPU us/call (median of legs)")
    for (work, leg), cpus in summary.items():
        print(f"{work:<9} {leg:<14} {statistics.median(cpus):8.1f}   {cpus}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
