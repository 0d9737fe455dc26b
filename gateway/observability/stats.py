"""Recent per-variant outcomes, for rollout analysis and the admin status RPC.

Prometheus holds the long view; this holds the last few minutes in process, so the gateway can
judge a canary against its baseline without a Prometheus server. It also keeps cumulative
counts per variant (calls, failures, a latency histogram) that each replica publishes to the
store, so a rollout's driver judges the canary on the traffic of every replica (`window`).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from gateway.errors import BACKEND_FAILURES
from tensorgate.store.v1 import store_pb2

_FAILURE_NAMES = frozenset(code.name for code in BACKEND_FAILURES)

# Latency bucket bounds (seconds) of the published histograms: 0.25 ms to ~2 min, each 1.25x
# the last, so a p99 read from them is within 25% of the exact one.
BOUNDS = tuple(round(0.00025 * 1.25**i, 7) for i in range(60))


@dataclass(slots=True)
class ModelCounts:
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    cache_hits: int = 0
    cache_hit_ns: int = 0
    executions: int = 0  # backend calls made for them (retries and hedges count)
    last_inference_ms: int = 0


class RecentStats:
    def __init__(self, horizon: float = 300.0, max_samples: int = 50_000) -> None:
        self._horizon = horizon
        self._max = max_samples
        # (model, variant) -> deque of (monotonic time, failed, seconds)
        self._samples: dict[tuple[str, str], deque] = {}
        self._backend_of: dict[tuple[str, str], str] = {}
        # (model, variant) -> [calls, failures, histogram counts (len(BOUNDS) + 1)]
        self._totals: dict[tuple[str, str], list] = {}
        # (model, public version) -> ModelCounts: what ModelStatistics answers
        self.models: dict[tuple[str, str], ModelCounts] = {}

    def record_call(
        self, model: str, version: str, ok: bool, seconds: float, attempts: int, cached: bool
    ) -> None:
        """One call of a public model as the caller saw it (for ModelStatistics)."""
        counts = self.models.get((model, version))
        if counts is None:
            counts = self.models[(model, version)] = ModelCounts()
        ns = int(seconds * 1e9)
        if ok:
            counts.success += 1
            counts.success_ns += ns
            if cached:
                counts.cache_hits += 1
                counts.cache_hit_ns += ns
            counts.last_inference_ms = time.time_ns() // 1_000_000
        else:
            counts.fail += 1
            counts.fail_ns += ns
        counts.executions += 0 if cached else attempts

    def record(self, model: str, variant: str, backend: str, code: str, seconds: float) -> None:
        key = (model, variant)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self._max)
            self._backend_of[key] = backend
        failed = code in _FAILURE_NAMES
        samples.append((time.monotonic(), failed, seconds))
        totals = self._totals.get(key)
        if totals is None:
            totals = self._totals[key] = [0, 0, [0] * (len(BOUNDS) + 1)]
        totals[0] += 1
        totals[1] += failed
        totals[2][bisect.bisect_left(BOUNDS, seconds)] += 1

    def counts(self, replica: str, incarnation: str) -> store_pb2.ReplicaCounts:
        """This process's cumulative counts, as published to the store."""
        out = store_pb2.ReplicaCounts(replica=replica, incarnation=incarnation)
        out.at.GetCurrentTime()
        for (model, variant), (calls, failures, histogram) in sorted(self._totals.items()):
            out.variants.add(
                model=model, variant=variant, requests=calls, failures=failures,
                bounds=BOUNDS, counts=histogram,
            )  # fmt: skip
        return out

    def summary(
        self, model: str, variant: str, since: float | None = None
    ) -> tuple[int, float, float]:
        """(requests, error ratio, p99 seconds) since `since` (monotonic), or the horizon."""
        samples = self._samples.get((model, variant))
        if not samples:
            return 0, 0.0, 0.0
        start = since if since is not None else time.monotonic() - self._horizon
        picked = [(failed, s) for t, failed, s in samples if t >= start]
        if not picked:
            return 0, 0.0, 0.0
        errors = sum(1 for failed, _ in picked if failed)
        latencies = sorted(s for _, s in picked)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        return len(picked), errors / len(picked), p99

    def quantile(self, model: str, variant: str, q: float, since: float) -> float:
        """The q-quantile (0..1) of the variant's latency since `since` (monotonic); 0 if none."""
        latencies = sorted(s for t, _, s in self._samples.get((model, variant), ()) if t >= since)
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    def backend_summary(self, backend: str, since: float) -> tuple[int, float]:
        total = errors = 0
        for key, samples in self._samples.items():
            if self._backend_of.get(key) != backend:
                continue
            for t, failed, _ in samples:
                if t >= since:
                    total += 1
                    errors += failed
        return total, (errors / total if total else 0.0)


def window(
    start: list[store_pb2.ReplicaCounts], now: list[store_pb2.ReplicaCounts], model: str,
    variant: str,
) -> tuple[int, float, float]:  # fmt: skip
    """(requests, error ratio, p99 seconds) of one variant between two readings of every
    replica's published counts. A replica absent from `start`, or restarted since (another
    incarnation), counts from zero."""
    before = {(c.replica, c.incarnation): c for c in start}
    calls = failures = 0
    histogram = [0] * (len(BOUNDS) + 1)
    for replica in now:
        current = _variant(replica, model, variant)
        if current is None:
            continue
        earlier = before.get((replica.replica, replica.incarnation))
        base = _variant(earlier, model, variant) if earlier is not None else None
        calls += current.requests - (base.requests if base else 0)
        failures += current.failures - (base.failures if base else 0)
        for i, n in enumerate(current.counts[: len(histogram)]):
            histogram[i] += n - (base.counts[i] if base and i < len(base.counts) else 0)
    if calls <= 0:
        return 0, 0.0, 0.0
    rank, seen = 0.99 * calls, 0
    p99 = BOUNDS[-1]
    for i, n in enumerate(histogram):
        seen += n
        if seen >= rank:
            p99 = BOUNDS[min(i, len(BOUNDS) - 1)]
            break
    return calls, failures / calls, p99


def _variant(counts: store_pb2.ReplicaCounts | None, model: str, variant: str):
    if counts is None:
        return None
    return next((v for v in counts.variants if v.model == model and v.variant == variant), None)
