"""Open-loop load: calls leave on a precomputed schedule, whether or not earlier ones answered.

A closed loop (bench/loadgen.py) slows down with the server it measures, so a stall delays the
calls that would have seen it and the tail looks better than it is (coordinated omission). Here
every call has a scheduled send time, fixed before the run, and its latency is measured FROM THAT
TIME to its answer: if this process sends late (its event loop was busy), the lateness counts
against the call. Failed calls, calls past their deadline and calls the generator could not send
(more than `max_in_flight` outstanding) count as infinitely slow in the percentiles.

Arrivals (`arrival_times`), over a window of D seconds at an offered rate of R calls/s:
- "poisson": R*D arrival times drawn uniformly over the window and sorted: a Poisson process
  conditioned on its count (gaps exponential, the count exactly the offered rate's), so a short
  window offers what it says rather than R*D +- sqrt(R*D).
- "onoff": bursts. Poisson arrivals at 2R during the first half of every `period` (default 1 s),
  none in the second half: the same mean rate, twice the peak.

Which request each call sends (`Popularity`): Zipf(s) over `n` distinct requests (rank k drawn
with probability proportional to 1/k^s; ranks are mapped to requests by a fixed random
permutation, so popularity says nothing about a request's size) or uniform over them.

    times = arrival_times("poisson", rate=200, duration=5, rng=np.random.default_rng(1))
    result = await open_loop(send, times, keys, duration=5)
    result.percentile_ms(99), result.sent_rps, result.ok_rps
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
import numpy as np

from bench.http_loadgen import RawConnection
from bench.loadgen import OK

PATTERNS = ("poisson", "onoff")
OVERLOAD = "NOT_SENT_IN_FLIGHT_LIMIT"


# ----------------------------------------------------------------------------- schedules


def arrival_times(
    pattern: str, rate: float, duration: float, rng: np.random.Generator, period: float = 1.0
) -> np.ndarray:
    """Sorted send times in [0, duration) (seconds) offering `rate` calls/s on average."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    if pattern == "poisson":
        return np.sort(rng.uniform(0.0, duration, round(rate * duration)))
    if pattern == "onoff":
        parts = []
        start = 0.0
        while start < duration:
            on = min(period / 2, duration - start)
            parts.append(start + rng.uniform(0.0, on, round(2 * rate * on)))
            start += period
        return np.sort(np.concatenate(parts)) if parts else np.empty(0)
    raise ValueError(f"pattern must be one of {PATTERNS}, not {pattern!r}")


class Popularity:
    """Draws request indices in [0, n): "zipf" (exponent s) or "uniform"."""

    def __init__(self, kind: str, n: int, s: float = 1.1, seed: int = 0) -> None:
        if kind not in ("zipf", "uniform"):
            raise ValueError(f"kind must be zipf or uniform, not {kind!r}")
        self.kind, self.n, self.s = kind, n, s
        weights = np.arange(1, n + 1, dtype=np.float64) ** -s
        self._cdf = np.cumsum(weights / weights.sum())
        self._cdf[-1] = 1.0
        self._request_of_rank = np.random.default_rng(seed).permutation(n)

    def draw(self, size: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "uniform":
            return rng.integers(0, self.n, size)
        ranks = np.searchsorted(self._cdf, rng.random(size), side="right")
        return self._request_of_rank[np.minimum(ranks, self.n - 1)]

    def top_share(self, k: int) -> float:
        """Probability that a draw is one of the k most popular requests (an ideal k-entry
        cache's hit ratio)."""
        if self.kind == "uniform":
            return min(k, self.n) / self.n
        return float(self._cdf[min(k, self.n) - 1])


# ----------------------------------------------------------------------------- results


def percentile_ms(ordered: Sequence[float], q: float, total: int) -> float:
    """Nearest-rank percentile (q in 0..100) in ms of `total` calls whose OK latencies are
    `ordered` (ascending): the calls beyond them (errors) rank above every latency (inf)."""
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(q / 100 * total))
    return 1e3 * ordered[rank - 1] if rank <= len(ordered) else math.inf


@dataclass
class OpenLoopResult:
    """One open-loop window. Latencies (OK calls, seconds) run from each call's scheduled time."""

    offered_rps: float
    duration_s: float  # the scheduled window
    elapsed_s: float  # from the window's start until its last call answered (or gave up)
    scheduled: int  # calls scheduled inside the window
    sent_in_window: int  # of them, sent (by their actual send time) before the window closed
    ok: int
    errors: dict[str, int]
    warmup_calls: int
    send_lag_s: list[float] = field(default_factory=list, repr=False)  # actual - scheduled
    latencies_s: list[float] = field(default_factory=list, repr=False)

    @property
    def sent_rps(self) -> float:
        """Calls this generator actually put on the wire per second of the window."""
        return self.sent_in_window / self.duration_s

    @property
    def ok_rps(self) -> float:
        """Calls of the window answered OK, per second of the window."""
        return self.ok / self.duration_s

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile_ms(self, q: float) -> float:
        return percentile_ms(sorted(self.latencies_s), q, self.scheduled)

    def summary(self) -> dict:
        ordered = sorted(self.latencies_s)
        lag = sorted(self.send_lag_s)

        def pct(q: float) -> float | None:
            v = percentile_ms(ordered, q, self.scheduled)
            return None if math.isnan(v) else (v if math.isinf(v) else round(v, 3))

        return {
            "offered_rps": round(self.offered_rps, 2),
            "duration_s": self.duration_s,
            "elapsed_s": round(self.elapsed_s, 3),
            "scheduled": self.scheduled,
            "sent_rps": round(self.sent_rps, 2),
            "ok_rps": round(self.ok_rps, 2),
            "ok": self.ok,
            "errors": dict(self.errors),
            "warmup_calls": self.warmup_calls,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": round(1e3 * ordered[-1], 3) if ordered else None,
            "send_lag_p50_ms": round(1e3 * lag[len(lag) // 2], 3) if lag else None,
            "send_lag_p99_ms": round(1e3 * lag[min(len(lag) - 1, int(0.99 * len(lag)))], 3)
            if lag
            else None,
        }


# ----------------------------------------------------------------------------- the loop

Send = Callable[[int], Awaitable[str]]  # request index -> outcome code (OK or an error name)


async def open_loop(
    send: Send,
    times: np.ndarray,
    keys: np.ndarray,
    *,
    duration: float,
    warmup: float = 0.0,
    warmup_times: np.ndarray | None = None,
    warmup_keys: np.ndarray | None = None,
    max_in_flight: int = 4096,
    on_window_start: Callable[[], None] | None = None,
    on_window_end: Callable[[], None] | None = None,
) -> OpenLoopResult:
    """Sends `send(keys[i])` at `times[i]` seconds into a window of `duration` seconds, after a
    warm-up of `warmup` seconds (`warmup_times` in [0, warmup) with `warmup_keys`, not recorded).
    Returns once every call of the window has answered. `send` enforces its own deadline and
    returns an outcome code; an exception it raises counts as an error of that class's name.
    `on_window_start` / `on_window_end` run at the window's start and after its last answer."""
    if len(times) != len(keys):
        raise ValueError("times and keys differ in length")
    w_times = np.empty(0) if warmup_times is None else np.asarray(warmup_times, dtype=float)
    w_keys = np.empty(0, dtype=int) if warmup_keys is None else np.asarray(warmup_keys)
    all_times = np.concatenate([w_times, warmup + np.asarray(times, dtype=float)]).tolist()
    all_keys = np.concatenate([w_keys, np.asarray(keys)]).astype(int).tolist()
    n_warm, n = len(w_times), len(all_times)

    loop = asyncio.get_running_loop()
    clock = loop.time
    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    in_flight = 0
    sent_in_window = 0
    start = clock() + 0.05
    window_start = start + warmup
    window_end = window_start + duration
    last_answer = window_start

    async def one(i: int, scheduled: float) -> None:
        nonlocal in_flight, sent_in_window, last_answer
        sent = clock()
        in_flight += 1
        try:
            code = await send(all_keys[i])
        except Exception as err:  # a failed call is a result, not a crash of the run
            code = type(err).__name__
        finally:
            in_flight -= 1
        if i < n_warm:
            return
        done = clock()
        last_answer = max(last_answer, done)
        lags.append(sent - scheduled)
        if sent < window_end:
            sent_in_window += 1
        if code == OK:
            latencies.append(done - scheduled)
        else:
            errors[code] += 1

    def window_starts() -> None:
        if on_window_start is not None:
            on_window_start()

    tasks: list[asyncio.Task] = []
    i = 0
    while i < n:
        if i == n_warm:  # the window's first call: its edge comes first
            await asyncio.sleep(max(0.0, window_start - clock()))
            window_starts()
        scheduled = start + all_times[i]
        ahead = scheduled - clock()
        if ahead > 0:
            await asyncio.sleep(ahead)
        if in_flight >= max_in_flight:
            if i >= n_warm:
                errors[OVERLOAD] += 1
        else:
            tasks.append(asyncio.create_task(one(i, scheduled)))
        i += 1
    if n == n_warm:  # an empty window
        await asyncio.sleep(max(0.0, window_start - clock()))
        window_starts()
    await asyncio.sleep(max(0.0, window_end - clock()))
    await asyncio.gather(*tasks)
    if on_window_end is not None:
        on_window_end()
    return OpenLoopResult(
        offered_rps=len(times) / duration,
        duration_s=duration,
        elapsed_s=max(clock(), last_answer) - window_start,
        scheduled=len(times),
        sent_in_window=sent_in_window,
        ok=len(latencies),
        errors=dict(errors),
        warmup_calls=n_warm,
        send_lag_s=lags,
        latencies_s=latencies,
    )


# ----------------------------------------------------------------------------- senders

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits, n = n & 0x7F, n >> 7
        out.append(bits | (0x80 if n else 0))
        if not n:
            return bytes(out)


def model_name_field(model: str, version: str = "") -> bytes:
    """ModelInferRequest fields 1 (model_name) and 2 (model_version), encoded. Prefixed to a
    request serialized without them, it makes the whole request: protobuf merges fields in any
    order, so one encoding of the inputs serves every route."""
    out = b""
    for number, value in ((1, model), (2, version)):
        if value:
            data = value.encode()
            out += bytes([number << 3 | 2]) + _varint(len(data)) + data
    return out


class GrpcSender:
    """ModelInfer calls of prebuilt, pre-serialized requests on one channel: `send(i)` sends
    `model_name_field(model, version) + bodies(i)` with no serialization or parsing here (the
    answers' contents are checked apart, before the load)."""

    def __init__(
        self,
        target: str,
        model: str,
        bodies: Callable[[int], bytes],
        *,
        version: str = "",
        timeout: float = 2.0,
    ) -> None:
        self.target = target
        self._prefix = model_name_field(model, version)
        self._bodies = bodies
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._call = None

    async def __aenter__(self) -> GrpcSender:
        self._channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        await asyncio.wait_for(self._channel.channel_ready(), 10.0)
        self._call = self._channel.unary_unary(MODEL_INFER)  # bytes in, bytes out
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def send(self, key: int) -> str:
        try:
            await self._call(self._prefix + self._bodies(key), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return OK


class HttpSender:
    """POSTs of prebuilt bodies over a pool of HTTP/1.1 keep-alive connections (bench.
    http_loadgen's raw client: a few dozen microseconds of CPU a call); a new connection opens
    when none is idle, up to `max_connections`, after which calls wait for one (the wait counts
    in their latency)."""

    def __init__(
        self,
        url: str,
        bodies: Callable[[int], bytes],
        *,
        timeout: float = 2.0,
        max_connections: int = 256,
    ) -> None:
        self.url = url
        parts = urlsplit(url)
        self._head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        self._bodies = bodies
        self._timeout = timeout
        self._idle: list[RawConnection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._all: list[RawConnection] = []

    def request_bytes(self, body: bytes) -> bytes:
        return (
            self._head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def __aenter__(self) -> HttpSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for connection in self._all:
            connection.close()

    async def send(self, key: int) -> str:
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                connection = self._idle.pop() if self._idle else None
                if connection is None:
                    connection = RawConnection(self.url, b"")
                    self._all.append(connection)
                connection.request = self.request_bytes(self._bodies(key))
                try:
                    status, _ = await connection.post()
                finally:
                    self._idle.append(connection)
        except TimeoutError:
            return "DEADLINE_EXCEEDED"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            return type(err).__name__
        return OK if status == 200 else f"HTTP_{status}"
