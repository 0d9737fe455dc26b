"""What every request-path layer declares (one `RouteLayer` per layer module): its settings, its
state, how it is built for one route, which config fields it owns, and what each request path
does with it (ModelInfer applies it; `decoupled` says what ModelStreamInfer does for models that
answer 0..N times; `envoy` whether Envoy mode translates it or hands the route to the Python data
plane). Layers import only this module from here; the order of the chain is `chain.py`'s."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from tensorgate.config.v1 import config_pb2

if TYPE_CHECKING:
    import prometheus_client as prom

    from adapters.base import Adapter
    from gateway.dataplane.pipeline import InferService, Layer
    from gateway.dataplane.routing import RoutePlan, RouteTable


@dataclass(slots=True)
class LayerEnv:
    """What a layer's state may use from the running gateway (all read per call, so a route
    table or adapter swap takes effect at once)."""

    registry: prom.CollectorRegistry
    table: Callable[[], RouteTable] = lambda: None
    adapters: Callable[[], Mapping[str, Adapter]] = dict
    backend_call: Callable[[], InferService] = lambda: None  # breaker, bulkhead, dispatch
    per_try_timeout: Callable[[str], float] = lambda backend: 30.0
    specs: Any = None  # validation.specs.SpecCache: model descriptions, shared
    drift: Any = (
        None  # gateway.dataplane.layers.drift.monitor.DriftMonitor: shared with the shadow layer
    )
    # The variants health checks and drains put down, as the routing layer reads them.
    down: Callable[[], frozenset] = frozenset
    # Another route's own compiled chain (compiled on first use and kept on the route).
    route_service: Callable[[RoutePlan], InferService] = lambda plan: None
    # Whether the call's caller may call that route (its authorization rules; layers/access).
    may_call: Callable[[RoutePlan, Any], bool] = lambda plan, call: True


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
