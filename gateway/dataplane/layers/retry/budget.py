"""Retry budget: retries may add at most a fraction of the load (Finagle's RetryBudget, Envoy's
retry_budget), plus a small floor so low-traffic routes can still retry.

Without it, N callers each retrying M times turn a sick backend's trouble into N*M load exactly
when it can least take it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.dataplane.layers.breaker.window import WindowCounter

_REQUESTS, _RETRIES = 0, 1


class RetryBudget:
    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self._floor = min_per_second * window
        self._counts = WindowCounter(window, fields=2, clock=clock)

    def record_request(self) -> None:
        self._counts.add(_REQUESTS)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the budget is used up."""
        allowed = self._floor + self.ratio * self._counts.total(_REQUESTS)
        if self._counts.total(_RETRIES) + 1 > allowed:
            return False
        self._counts.add(_RETRIES)
        return True
