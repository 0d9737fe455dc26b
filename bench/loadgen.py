"""Closed-loop Open Inference Protocol load generator on grpc.aio.

N workers share one channel and one event loop; each sends ModelInfer back to back (the next call
leaves as soon as the previous one answers). After a warm-up, every call that starts inside the
measured window is recorded: its latency (time.perf_counter around the awaited call, so it
includes this process's event-loop time) and its gRPC status code.

    result = asyncio.run(run_load("127.0.0.1:8001", "linear", concurrency=16, duration=10))
    print(result.rps, result.percentile_ms(99), result.errors)

Command line:
    python -m bench.loadgen --target 127.0.0.1:PORT --model M --concurrency 16 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

OK = grpc.StatusCode.OK.name
DEFAULT_INPUT = (1.0, 2.0, 3.0, 4.0)


def build_request(
    model: str,
    version: str = "",
    values: Sequence[float] = DEFAULT_INPUT,
    input_name: str = "INPUT0",
) -> oip.ModelInferRequest:
    """A batch-1 FP32 ModelInferRequest carrying `values` in raw_input_contents."""
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = "FP32"
    tensor.shape.extend([1, len(values)])
    request.raw_input_contents.append(struct.pack(f"<{len(values)}f", *values))
    return request


def decode_fp32(response: oip.ModelInferResponse, index: int = 0) -> list[float]:
    """The `index`-th output of a response, as floats (raw_output_contents or fp32_contents)."""
    if response.raw_output_contents:
        raw = response.raw_output_contents[index]
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(response.outputs[index].contents.fp32_contents)


@dataclass
class LoadResult:
    """What one closed-loop run measured. Latencies are of OK calls only, in seconds."""

    target: str
    model: str
    version: str
    concurrency: int
    elapsed_s: float  # measured window: from its start until the last call in it answered
    ok: int
    errors: dict[str, int]
    warmup_calls: int  # calls (any status) made during the warm-up, not in the figures
    latencies_s: list[float] = field(default_factory=list, repr=False)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def calls(self) -> int:
        """Every call made, warm-up included (what the server side should have counted)."""
        return self.warmup_calls + self.ok + self.error_count

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile (q in 0..100) of OK-call latency, in ms; NaN if no call."""
        return percentile_ms(sorted(self.latencies_s), q)

    def summary(self) -> dict:
        """JSON-ready figures (no raw latencies)."""
        ordered = sorted(self.latencies_s)
        return {
            "target": self.target,
            "model": self.model,
            "version": self.version,
            "concurrency": self.concurrency,
            "elapsed_s": round(self.elapsed_s, 3),
            "ok": self.ok,
            "errors": dict(self.errors),
            "warmup_calls": self.warmup_calls,
            "rps": round(self.rps, 1),
            "mean_ms": round(1e3 * sum(ordered) / len(ordered), 3) if ordered else None,
            **{f"p{q}_ms": _round(percentile_ms(ordered, q)) for q in (50, 95, 99)},
            "max_ms": round(1e3 * ordered[-1], 3) if ordered else None,
        }

    @classmethod
    def merge(cls, results: Sequence[LoadResult]) -> LoadResult:
        """Several runs against the same target as one: calls and windows add up."""
        first = results[0]
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        for r in results:
            errors.update(r.errors)
            latencies.extend(r.latencies_s)
        return cls(
            target=first.target,
            model=first.model,
            version=first.version,
            concurrency=first.concurrency,
            elapsed_s=sum(r.elapsed_s for r in results),
            ok=sum(r.ok for r in results),
            errors=dict(errors),
            warmup_calls=sum(r.warmup_calls for r in results),
            latencies_s=latencies,
        )


def percentile_ms(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return 1e3 * ordered[rank - 1]


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


# Options of a channel that must be its own TCP connection (run_load's `channels`).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def run_load(
    target: str,
    model: str,
    *,
    version: str = "",
    concurrency: int = 16,
    duration: float = 10.0,
    warmup: float = 2.0,
    timeout: float = 5.0,
    request: oip.ModelInferRequest | None = None,
    channels: int = 1,
    on_window_start: Callable[[], None] | None = None,
    on_window_end: Callable[[], None] | None = None,
) -> LoadResult:
    """Closed loop against `target` for `warmup` s (discarded), then `duration` s (measured).

    Workers stop starting calls when the window closes; calls already started are awaited and
    counted, and the window is stretched to when the last one answered. `on_window_start` and
    `on_window_end` run right at the window's edges (e.g. to sample CPU counters).
    `channels` > 1: closed-loop worker i uses connection i % channels, each its own TCP
    connection (grpc otherwise puts every channel of a process to one target on one).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if channels < 1:
        raise ValueError("channels must be >= 1")
    if request is None:
        request = build_request(model, version)
    options = OWN_CONNECTION if channels > 1 else None
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10.0) for c in opened))
        stubs = itertools.cycle(service_pb2_grpc.GRPCInferenceServiceStub(c) for c in opened)

        def sender() -> Callable[[], Awaitable[str]]:
            infer = next(stubs).ModelInfer

            async def send() -> str:
                try:
                    await infer(request, timeout=timeout)
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return OK

            return send

        window = await closed_loop(
            sender,
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            on_window_start=on_window_start,
            on_window_end=on_window_end,
        )
    finally:
        await asyncio.gather(*(c.close() for c in opened))
    return LoadResult(
        target=target, model=model, version=version, concurrency=concurrency, **window
    )


async def closed_loop(
    sender: Callable[[], Callable[[], Awaitable[str]]],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    on_window_start: Callable[[], None] | None = None,
    on_window_end: Callable[[], None] | None = None,
) -> dict:
    """The measuring loop shared by every load generator here (gRPC above, HTTP in
    bench/http_loadgen.py): `concurrency` workers, each with its own `sender()`, call it back to
    back; a call returns its outcome code (OK or an error name). Returns LoadResult's
    measurement fields: elapsed_s, ok, errors, warmup_calls, latencies_s."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    warmup_calls = 0
    measure_from = math.inf
    stop_at = math.inf
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal warmup_calls
        send = sender()
        while True:
            start = clock()
            if start >= stop_at:
                return
            code = await send()
            end = clock()
            if start < measure_from:
                warmup_calls += 1
            elif code == OK:
                latencies.append(end - start)
            else:
                errors[code] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        if on_window_start is not None:
            on_window_start()
        measure_from = clock()
        stop_at = measure_from + duration
        await asyncio.gather(*tasks)
        elapsed = clock() - measure_from
        if on_window_end is not None:
            on_window_end()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "elapsed_s": elapsed,
        "ok": len(latencies),
        "errors": dict(errors),
        "warmup_calls": warmup_calls,
        "latencies_s": latencies,
    }


async def probe(
    target: str, model: str, version: str = "", values: Sequence[float] = DEFAULT_INPUT
) -> tuple[oip.ModelInferResponse, tuple[tuple[str, str], ...]]:
    """One ModelInfer call: (response, initial metadata). Raises grpc.aio.AioRpcError."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            build_request(model, version, values), timeout=10.0
        )
        response = await call
        metadata = tuple(tuple(m) for m in (await call.initial_metadata() or ()))
        return response, metadata


def format_result(result: LoadResult) -> str:
    errors = ", ".join(f"{k}={v}" for k, v in sorted(result.errors.items())) or "0"
    return (
        f"{result.target} model={result.model!r} c={result.concurrency}: "
        f"{result.rps:.0f} ok/s over {result.elapsed_s:.1f} s, "
        f"p50 {result.percentile_ms(50):.3f} ms, p95 {result.percentile_ms(95):.3f} ms, "
        f"p99 {result.percentile_ms(99):.3f} ms, errors {errors}"
    )


def add_loop_options(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    """The closed loop's options on the command line of a load generator here."""
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--timeout", type=float, default=5.0, help=timeout_help)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def print_result(result: LoadResult, as_json: bool) -> int:
    """A load generator's answer on the command line; its exit code (1: no call succeeded)."""
    print(json.dumps(result.summary(), indent=2) if as_json else format_result(result))
    return 1 if result.ok == 0 else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description="Closed-loop ModelInfer load on grpc.aio."
    )
    parser.add_argument("--target", required=True, help="host:port of an OIP gRPC server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-version", default="", help='e.g. "1" (default: unpinned)')
    add_loop_options(parser, "per-call deadline, seconds")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_load(
            args.target,
            args.model,
            version=args.model_version,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            timeout=args.timeout,
        )
    )
    return print_result(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
