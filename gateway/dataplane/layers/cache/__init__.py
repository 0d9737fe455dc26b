"""Response cache per route, for models the route declares deterministic
(gateway/dataplane/layers/cache/store.py holds
the key, the LRU and single-flight).

Placed after validation (a refused request never reaches it) and routing (the key names the
variant that was chosen), above shadow, fallback and retry: a hit costs no backend call at all,
and identical concurrent misses share one trip down the path. Only a normal answer from the
chosen variant is kept: never an error, never a degraded (fallback) one. The key includes a
digest of the route's config, so any change to the route (an admin weight change, a new variant)
stops old answers from being used; they age out of the LRU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.dataplane.layers.cache.store import ResponseCache, cacheable, request_key
from gateway.dataplane.layers.contract import NOT_ON_DECOUPLED, RouteLayer, hands_over
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2

# The trailer a caller reads to tell a cached answer (README.md, "Response cache").
CACHE_HIT = (("x-tensorgate-cache", "hit"),)

if TYPE_CHECKING:
    from gateway.dataplane.routing import RoutePlan

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_TTL_S = 60.0


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_bytes: int
    ttl: float


def settings(policy: config_pb2.RoutePolicy, route=None) -> CacheSettings | None:
    c = policy.response_cache
    if not (policy.HasField("response_cache") and c.deterministic):
        return None
    return CacheSettings(
        max_bytes=c.max_bytes or DEFAULT_MAX_BYTES,
        ttl=seconds(c.ttl) if c.HasField("ttl") else DEFAULT_TTL_S,
    )


def check(policy: config_pb2.RoutePolicy, at: str, route, models) -> Iterator[tuple[str, str]]:
    if not policy.HasField("response_cache"):
        return
    c, cat = policy.response_cache, f"{at}.response_cache"
    if not c.deterministic:
        yield (
            f"{cat}.deterministic",
            "must be true: caching answers is only right when the model's answer depends on "
            "the request alone",
        )
    if c.max_bytes < 0:
        yield f"{cat}.max_bytes", "must not be negative"
    if c.HasField("ttl") and seconds(c.ttl) <= 0:
        yield f"{cat}.ttl", "must be positive"


class _NotKept(Exception):
    """A degraded answer: returned to the caller (and to callers who joined the load), not
    stored."""

    def __init__(self, result: InferResult) -> None:
        super().__init__("degraded answer, not cached")
        self.result = result


class CacheState:
    """The caches of all routes (kept across route-table swaps while a route's cache settings
    stay the same), and their numbers as metrics, read at scrape time."""

    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self._caches: dict[str, tuple[CacheSettings, ResponseCache]] = {}
        registry.register(self)

    def for_route(self, model: str, settings: CacheSettings) -> ResponseCache:
        entry = self._caches.get(model)
        if entry is None or entry[0] != settings:
            entry = self._caches[model] = (
                settings,
                ResponseCache(settings.max_bytes, settings.ttl),
            )
        return entry[1]

    def describe(self):
        return []

    def collect(self):
        requests = CounterMetricFamily(
            "tensorgate_cache_requests",
            "Response cache lookups by result: hit, miss, coalesced (joined a miss in flight).",
            labels=("model", "result"),
        )
        evictions = CounterMetricFamily(
            "tensorgate_cache_evictions",
            "Answers dropped from the cache to stay within max_bytes.",
            labels=("model",),
        )
        size = GaugeMetricFamily(
            "tensorgate_cache_bytes", "Bytes of answers held in the cache.", labels=("model",)
        )
        entries = GaugeMetricFamily(
            "tensorgate_cache_entries", "Answers held in the cache.", labels=("model",)
        )
        for model, (_, cache) in sorted(self._caches.items()):
            requests.add_metric((model, "hit"), cache.hits)
            requests.add_metric((model, "miss"), cache.misses)
            requests.add_metric((model, "coalesced"), cache.coalesced)
            evictions.add_metric((model,), cache.evictions)
            size.add_metric((model,), cache.bytes)
            entries.add_metric((model,), cache.entries)
        yield from (requests, evictions, size, entries)


def response_cache(config: CacheSettings, shared: CacheState, plan: RoutePlan) -> Layer:
    cache = shared.for_route(plan.model, config)
    revision = hashlib.sha256(plan.route.SerializeToString(deterministic=True)).hexdigest()

    def layer(inner: InferService) -> InferService:
        async def cached(call: InferCall) -> InferResult:
            request = call.request
            if not cacheable(request):  # stateful (sequence) calls
                return await inner(call)
            target = call.target
            started: list[InferResult] = []
            loaded_here = False

            async def load():
                nonlocal loaded_here
                loaded_here = True
                result = await inner(call)
                if result.degraded or result.target != target:
                    raise _NotKept(result)
                started.append(result)
                return result.response

            try:
                response, _ = await cache.get_or_load(
                    request_key(revision, target.variant, request), load
                )
            except _NotKept as skipped:
                result = skipped.result
                if loaded_here:
                    return result
                copy = type(result.response)()  # joined a load: a response of its own
                copy.CopyFrom(result.response)
                copy.id = request.id
                return InferResult(copy, result.target, result.degraded, 1, result.primary_failure)
            if started:  # this caller's own load
                return started[0]
            response.id = request.id
            return InferResult(response, target, attempts=0, cached=True, trailers=CACHE_HIT)

        return cached

    return layer


LAYER = RouteLayer(
    "response_cache",
    settings=settings,
    active=lambda s: s is not None,
    state=lambda env: CacheState(env.registry),
    build=response_cache,
    envoy=hands_over("response_cache: the gateway answers repeated requests from its cache"),
    fields=("RoutePolicy.response_cache",),
    decoupled=NOT_ON_DECOUPLED,
    check=check,
)
