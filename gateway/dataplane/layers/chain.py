"""The per-route part of the ModelInfer chain: which layers, in which order (declared once here),
and each route's settings per layer, computed from its policy merged over the defaults."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from gateway.dataplane.layers import (
    batching,
    cache,
    deadline,
    drift,
    fallback,
    hedge,
    retry,
    shadow,
    validation,
)
from gateway.dataplane.layers.contract import RouteLayer
from tensorgate.config.v1 import config_pb2


@functools.cache
def route_layers() -> tuple[RouteLayer, ...]:
    """The per-route part of the ModelInfer path, outermost first; why this order:
    docs/architecture.md."""
    return (
        validation.SCHEMA,
        drift.LAYER,
        deadline.LAYER,
        cache.LAYER,
        shadow.LAYER,
        fallback.LAYER,
        hedge.LAYER,
        retry.LAYER,
        batching.LAYER,
    )


class RouteSettings:
    """A route's settings per layer, by layer name (`settings.retry`), computed once per route
    table from the route's policy merged over defaults.route_policy."""

    __slots__ = ("_by_layer",)

    def __init__(self, by_layer: dict[str, Any]) -> None:
        self._by_layer = by_layer

    def __getattr__(self, name: str) -> Any:
        try:
            return self._by_layer[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._by_layer[name]


def effective_policy(
    route: config_pb2.RoutePolicy, defaults: config_pb2.RoutePolicy
) -> config_pb2.RoutePolicy:
    """Each RoutePolicy field from the route when it sets it, else from the defaults (a set
    message or non-empty list replaces the default whole; it is not merged field by field)."""
    merged = config_pb2.RoutePolicy()
    merged.CopyFrom(defaults)
    for descriptor, value in route.ListFields():
        merged.ClearField(descriptor.name)
        if descriptor.is_repeated:
            getattr(merged, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(merged, descriptor.name).CopyFrom(value)
        else:
            setattr(merged, descriptor.name, value)
    return merged


def route_settings(
    route: config_pb2.Route, defaults: config_pb2.RoutePolicy, memo: dict | None = None
) -> RouteSettings:
    """`memo` (one per route table) shares the work between routes with the same policy: a
    table of 10,000 routes usually has a handful of distinct policies."""
    key = route.policy.SerializeToString(deterministic=True)
    shared = memo.get(key) if memo is not None else None
    if shared is None:
        policy = effective_policy(route.policy, defaults)
        shared = (
            policy,
            {x.name: x.settings(policy, None) for x in route_layers() if not x.reads_route},
        )
        if memo is not None:
            memo[key] = shared
    policy, by_layer = shared
    by_layer = dict(by_layer)
    for layer in route_layers():
        if layer.reads_route:
            by_layer[layer.name] = layer.settings(policy, route)
    return RouteSettings(by_layer)


def check_policy(
    policy: config_pb2.RoutePolicy, at: str, route: config_pb2.Route | None, models: set[str]
) -> Iterator[tuple[str, str]]:
    """(field path, problem) in a route's policy (route given) or defaults.route_policy."""
    for layer in route_layers():
        yield from layer.check(policy, at, route, models)
