"""Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").

Full jitter spreads retries of many callers uniformly over the whole interval, so a backend that
recovers is not hit by synchronised waves of retries.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def full_jitter(
    retry: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry number `retry` (1 = the first retry)."""
    return rand() * min(cap, base * (2 ** (retry - 1)))
