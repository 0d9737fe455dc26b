"""Counters over a sliding time window, in one-second buckets.

Cheap enough for the hot path: recording is an index and an add; reading sums at most
`seconds` buckets. Single-threaded (asyncio) use only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class WindowCounter:
    def __init__(
        self, seconds: float, fields: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._size = max(1, math.ceil(seconds))
        self._clock = clock
        self._stamps = [-1] * self._size
        self._counts = [[0] * fields for _ in range(self._size)]

    def add(self, field: int = 0, amount: int = 1) -> None:
        now = int(self._clock())
        slot = now % self._size
        if self._stamps[slot] != now:
            self._stamps[slot] = now
            counts = self._counts[slot]
            for i in range(len(counts)):
                counts[i] = 0
        self._counts[slot][field] += amount

    def total(self, field: int = 0) -> int:
        now = int(self._clock())
        oldest = now - self._size
        return sum(
            counts[field]
            for stamp, counts in zip(self._stamps, self._counts, strict=True)
            if stamp > oldest
        )
