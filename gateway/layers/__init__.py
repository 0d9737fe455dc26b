"""Request-path layers. Each module holds one policy and declares, in its `LAYER`, everything the
gateway needs to know about it: its settings (read from the route's effective RoutePolicy), when
it is on for a route, its long-lived state (metrics, budgets, trackers; built once per runtime)
and how it is built for one route. The per-route part of the path is compiled from
`route_layers()` when a route is first called: a layer that is off for a route is not in that
route's chain at all, so it costs nothing there.

Each layer also declares what the Envoy data plane does with it (`envoy`): either the Envoy
compiler translates it (no reasons), or the reasons a route using it must be answered by the
Python data plane; `gateway/envoy/compile.py` decides each route from these declarations alone.
And each names the config fields it owns (`fields`): tests/test_policy_coverage.py fails for a
field of Route, Variant, RoutePolicy or Backend that no layer or component owns, so a new field
cannot be silently ignored by a path.

Adding a layer touches three files: its module, the config proto (its policy message), and the
list in `route_layers()`. See docs/architecture.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from tensorgate.config.v1 import config_pb2

if TYPE_CHECKING:
    import prometheus_client as prom

    from adapters.base import Adapter
    from gateway.pipeline import InferService, Layer
    from gateway.routing import RoutePlan, RouteTable


@dataclass(slots=True)
class LayerEnv:
    """What a layer's state may use from the running gateway (all read per call, so a route
    table or adapter swap takes effect at once)."""

    registry: prom.CollectorRegistry
    table: Callable[[], RouteTable] = lambda: None
    adapters: Callable[[], Mapping[str, Adapter]] = dict
    backend_call: Callable[[], InferService] = lambda: None  # breaker, bulkhead, dispatch
    per_try_timeout: Callable[[str], float] = lambda backend: 30.0
    specs: Any = None  # gateway.layers.validation.SpecCache: model descriptions, shared
    drift: Any = None  # gateway.drift.DriftMonitor: shared with the shadow layer
    # The variants health checks and drains put down, as the routing layer reads them.
    down: Callable[[], frozenset] = frozenset
    # Another route's own compiled chain (compiled on first use and kept on the route).
    route_service: Callable[[RoutePlan], InferService] = lambda plan: None


def _no_problems(policy, at, route, models) -> Iterator[tuple[str, str]]:
    return iter(())


class OnEnvoy(NamedTuple):
    """What Envoy mode does with a layer that is on for a route."""

    # Why the route must be answered by the Python data plane (shown by check-config); empty
    # when the Envoy compiler translates the layer into Envoy resources.
    hand_over: tuple[str, ...] = ()
    # How Envoy serves it where its semantics differ from the Python path.
    notes: tuple[str, ...] = ()


def hands_over(reason: str) -> Callable[[Any, config_pb2.Route], OnEnvoy]:
    """The `envoy` declaration of a layer Envoy cannot express at all."""

    def declared(settings, route) -> OnEnvoy:
        return OnEnvoy(hand_over=(reason,))

    declared.__doc__ = f"hands the route to the gateway ({reason})"
    return declared


def translated(settings, route) -> OnEnvoy:
    """translated into Envoy resources"""
    return OnEnvoy()


NOT_ON_DECOUPLED = "not applied: defined over one answer, a decoupled model sends 0..N"


@dataclass(frozen=True, slots=True)
class RouteLayer:
    name: str  # its settings' attribute on RouteSettings, and its label in docs and errors
    # (effective policy, the route's config) -> settings, always (also when off)
    settings: Callable[[config_pb2.RoutePolicy, config_pb2.Route], Any]
    active: Callable[[Any], bool]  # is the layer in a route's chain with these settings?
    state: Callable[[LayerEnv], Any]  # built once per runtime
    build: Callable[[Any, Any, RoutePlan], Layer]  # (settings, state, route) -> layer
    # Envoy mode, for a route on which the layer is active: (settings, route) -> OnEnvoy
    envoy: Callable[[Any, config_pb2.Route], OnEnvoy]
    # The config fields it owns, as "Message.field" (RoutePolicy.retry, Variant.batching)
    fields: tuple[str, ...]
    # What ModelStreamInfer does with it for a decoupled model (0..N answers, relayed on a
    # backend stream; every other model's stream requests take this chain itself).
    decoupled: str
    # (policy, field path, route or None for defaults, known models) -> problems in its part
    check: Callable[..., Iterator[tuple[str, str]]] = _no_problems
    # Its settings read the route's config (per-variant settings), not only the policy: they
    # are then computed per route rather than once per distinct policy.
    reads_route: bool = False


@functools.cache
def route_layers() -> tuple[RouteLayer, ...]:
    """The per-route part of the ModelInfer path, outermost first; why this order:
    docs/architecture.md. (Imported here, not at module level: layers import the pipeline.)"""
    from gateway.layers import (
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
