"""A small closed-loop load generator for tests: concurrent workers sending ModelInfer calls and
recording, per call, its status, latency and which variant answered (and whether degraded)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc


@dataclass
class Outcome:
    code: str
    seconds: float
    variant: str = ""
    degraded: str = ""
    response: oip.ModelInferResponse | None = None
    started: float = 0.0  # time.monotonic() when the call was sent


@dataclass
class Results:
    outcomes: list[Outcome] = field(default_factory=list)

    def codes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.code] = counts.get(o.code, 0) + 1
        return counts

    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != "OK"]

    def p(self, q: float, *, code: str | None = None) -> float:
        values = sorted(o.seconds for o in self.outcomes if code is None or o.code == code)
        assert values, "no samples"
        return values[min(len(values) - 1, int(q * len(values)))]


async def infer(stub, request, *, timeout: float | None = None, metadata=()) -> Outcome:
    started = time.monotonic()
    start = time.perf_counter()
    call = stub.ModelInfer(request, timeout=timeout, metadata=metadata)
    try:
        response = await call
    except grpc.aio.AioRpcError as err:
        trailing = dict(err.trailing_metadata() or ())
        return Outcome(
            err.code().name,
            time.perf_counter() - start,
            trailing.get("x-tensorgate-variant", ""),
            started=started,
        )
    headers = dict(await call.trailing_metadata())
    return Outcome(
        "OK",
        time.perf_counter() - start,
        headers.get("x-tensorgate-variant", ""),
        headers.get("x-tensorgate-degraded", ""),
        response,
        started,
    )


async def run_load(
    address: str,
    make_request: Callable[[], oip.ModelInferRequest],
    *,
    concurrency: int,
    until: asyncio.Event | None = None,
    duration: float | None = None,
    timeout: float | None = None,
    pause_after_error: float = 0.0,
    results: Results | None = None,
) -> Results:
    """Run until `until` is set or `duration` passes. Pass `results` to watch it fill live."""
    results = results if results is not None else Results()
    stop_at = None if duration is None else time.monotonic() + duration
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            while not (until and until.is_set()) and (
                stop_at is None or time.monotonic() < stop_at
            ):
                outcome = await infer(stub, make_request(), timeout=timeout)
                results.outcomes.append(outcome)
                if outcome.code != "OK" and pause_after_error:
                    await asyncio.sleep(pause_after_error)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
