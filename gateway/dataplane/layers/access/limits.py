"""Rate limits' counters: token buckets for calls/s and bytes/s, in this process or in a Redis
the fleet shares (one atomic Lua script per check), and in-flight counts (always per process).

Memory is bounded whatever callers send: at most MAX_BUCKETS buckets per process (the least
recently used is dropped: its next call starts from a full bucket, so a flood of distinct caller
ids can only ever lose a caller some of its own history, never grow memory)."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

from gateway.redis_client import redis_client

log = logging.getLogger(__name__)

MAX_BUCKETS = 10_000

# KEYS[1]: the bucket. ARGV: rate (tokens/s), capacity, cost. Redis's own clock, so every
# gateway process reads the same time. Returns {allowed (1/0), milliseconds until it would be}.
REDIS_BUCKET = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate, capacity, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate / 1000)
local allowed, wait = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity * 1000 / rate) + 1000)
return {allowed, wait}
"""


class LimiterUnavailable(Exception):
    """The shared limiter did not answer in time."""


class LocalBuckets:
    """Token buckets in this process."""

    def __init__(self) -> None:
        self._buckets: collections.OrderedDict[tuple, list[float]] = collections.OrderedDict()

    async def take(self, key: tuple, rate: float, capacity: float, cost: float) -> float:
        """0 when `cost` tokens were taken; else seconds until they would be (nothing taken)."""
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [capacity, now]
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(capacity, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return 0.0
        return (cost - bucket[0]) / rate

    def __len__(self) -> int:
        return len(self._buckets)

    async def close(self) -> None:
        pass


class RedisBuckets:
    """The same buckets in Redis, shared by every process that names the same key prefix."""

    def __init__(self, address: str, prefix: str, timeout: float) -> None:
        self._client = redis_client(address, connect_timeout=timeout, socket_timeout=timeout)
        self._script = self._client.register_script(REDIS_BUCKET)
        self._prefix = prefix
        self._timeout = timeout

    async def take(self, key: tuple, rate: float, capacity: float, cost: float) -> float:
        name = self._prefix + ":" + ":".join(str(part).replace(":", "%3A") for part in key)
        try:
            allowed, wait_ms = await asyncio.wait_for(
                self._script(keys=[name], args=[rate, capacity, cost]), self._timeout
            )
        except Exception as err:  # every failure of the shared limiter is the same outcome
            raise LimiterUnavailable(type(err).__name__) from None
        return 0.0 if allowed else max(int(wait_ms), 1) / 1000

    async def close(self) -> None:
        await self._client.aclose()


class InFlight:
    """Calls in flight per key, in this process (an entry lives while its count is above 0)."""

    def __init__(self) -> None:
        self._counts: dict[tuple, int] = {}

    def enter(self, key: tuple, limit: int) -> bool:
        count = self._counts.get(key, 0)
        if count >= limit:
            return False
        self._counts[key] = count + 1
        return True

    def leave(self, key: tuple) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)


def capacity(rate: float, burst: int) -> float:
    """A calls/s bucket holds `burst` calls (at least one, and at least one second's worth when
    no burst is set)."""
    return float(burst) if burst else float(max(1, math.ceil(rate)))
