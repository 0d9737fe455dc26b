"""Recent per-variant outcomes, for rollout analysis and the admin status RPC.

Prometheus holds the long view; this holds the last few minutes in process, so the gateway can
judge a canary against its baseline without a Prometheus server.
"""

from __future__ import annotations

import time
from collections import deque

from gateway.policy import BACKEND_FAILURES

_FAILURE_NAMES = frozenset(code.name for code in BACKEND_FAILURES)


class RecentStats:
    def __init__(self, horizon: float = 300.0, max_samples: int = 50_000) -> None:
        self._horizon = horizon
        self._max = max_samples
        # (model, variant) -> deque of (monotonic time, failed, seconds)
        self._samples: dict[tuple[str, str], deque] = {}
        self._backend_of: dict[tuple[str, str], str] = {}

    def record(self, model: str, variant: str, backend: str, code: str, seconds: float) -> None:
        key = (model, variant)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self._max)
            self._backend_of[key] = backend
        samples.append((time.monotonic(), code in _FAILURE_NAMES, seconds))

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
