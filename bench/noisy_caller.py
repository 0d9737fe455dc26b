"""A noisy caller at 10x its rate limit next to a quiet one: does the quiet caller notice?

Starts a real Triton (demo models) and a gateway in front of it with JWT callers and a per-caller
limit on the route (50 calls/s, burst 50). A quiet caller sends 20 calls/s open-loop (each call
timed from its scheduled send time, so a stalled gateway cannot hide its queueing): first alone,
then while a noisy caller offers 500 calls/s (10x its limit). Both phases in the same run, with
the same generator. Prints the quiet caller's p50/p99 in both, their ratio (target: p99 within
1.2x of its solo value), and what happened to the noisy caller's calls.

    python -m bench.noisy_caller [--duration 20] [--quiet-rate 20] [--noisy-rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import grpc

from tests.backends.triton import TritonServer
from tests.builders import triton_backend, variant
from tests.callers import Signer, bearer, callers_config
from tests.conftest import DEMO_MODELS
from tests.gateway_process import GatewayProcess
from tests.oip import linear_request

LIMIT = {"name": "per-caller", "calls_per_second": 50, "burst": 50}
RESULTS = Path(__file__).resolve().parent / "results"


async def open_loop(address: str, metadata, rate: float, duration: float) -> dict:
    """Sends at `rate`/s for `duration` s; latencies measured from each scheduled send time."""
    from tritonclient.grpc import service_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = linear_request("linear")
        latencies: list[float] = []
        codes: dict[str, int] = {}
        start = time.perf_counter() + 0.05
        tasks = []

        async def one(scheduled: float) -> None:
            try:
                await stub.ModelInfer(request, metadata=metadata, timeout=5)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            codes[code] = codes.get(code, 0) + 1
            if code == "OK":
                latencies.append(time.perf_counter() - scheduled)

        for i in range(int(rate * duration)):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    latencies.sort()

    def p(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
        )

    return {"codes": codes, "p50_ms": round(p(0.5), 3), "p99_ms": round(p(0.99), 3),
            "calls": sum(codes.values())}  # fmt: skip


def _noisy(address: str, metadata, rate: float, duration: float, out) -> None:
    out.put(asyncio.run(open_loop(address, metadata, rate, duration)))


def phases(address: str, quiet, noisy, args) -> dict:
    """The noisy caller runs in a process of its own: generating its 500 calls/s in the quiet
    caller's event loop would delay the quiet caller's sends, not the gateway's answers."""
    asyncio.run(open_loop(address, quiet, args.quiet_rate, 2.0))  # warm-up
    solo = asyncio.run(open_loop(address, quiet, args.quiet_rate, args.duration))
    out = multiprocessing.Queue()
    noisy_process = multiprocessing.Process(
        target=_noisy, args=(address, noisy, args.noisy_rate, args.duration + 1.0, out)
    )
    noisy_process.start()
    time.sleep(0.5)  # the noisy caller is at full rate before the quiet one starts
    mixed = asyncio.run(open_loop(address, quiet, args.quiet_rate, args.duration))
    noisy_result = out.get(timeout=args.duration + 60)
    noisy_process.join()
    return {"quiet_solo": solo, "quiet_with_noisy": mixed, "noisy": noisy_result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--quiet-rate", type=float, default=20.0)
    parser.add_argument("--noisy-rate", type=float, default=500.0)
    args = parser.parse_args()
    signer = Signer(Path(tempfile.mkdtemp(prefix="tensorgate-noisy-")))
    with TritonServer(DEMO_MODELS) as triton:
        config = {
            "backends": [triton_backend(triton.address)],
            "callers": callers_config(signer, metric_labels=["quiet", "noisy"]),
            "routes": [{"model": "linear", "variants": [variant("v1")], "rate_limits": [LIMIT]}],
        }
        with GatewayProcess(config) as gateway:
            quiet = bearer(signer.token("quiet", expires_in=3600))
            noisy = bearer(signer.token("noisy", expires_in=3600))
            result = phases(gateway.address, quiet, noisy, args)
    solo, mixed = result["quiet_solo"], result["quiet_with_noisy"]
    result["p99_ratio"] = round(mixed["p99_ms"] / solo["p99_ms"], 3) if solo["p99_ms"] else None
    result["settings"] = vars(args) | {"limit": LIMIT}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "noisy_caller.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
