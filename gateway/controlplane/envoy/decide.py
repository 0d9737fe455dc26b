"""Which data plane answers each route (printed by `check-config`), derived from the declarations
of every component and every layer active on the route: nothing here names a policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.dataplane.components import COMPONENTS
from gateway.dataplane.layers.chain import route_layers, route_settings
from tensorgate.config.v1 import config_pb2


@dataclass(frozen=True)
class Decision:
    """Which data plane answers a route, and why."""

    model: str
    path: str  # "envoy" or "gateway"
    reasons: tuple[str, ...] = ()  # why the gateway (path "gateway"), or notes (path "envoy")


def identifies(callers: config_pb2.Callers) -> bool:
    """Whether a caller's credentials change how the gateway answers it (with anonymous
    callers only, Envoy and the gateway treat every call alike on a route without rules)."""
    return (
        bool(callers.jwt)
        or callers.HasField("client_cert")
        or (callers.ByteSize() > 0 and not callers.allow_anonymous)
    )


def decide(config: config_pb2.GatewayConfig) -> tuple[Decision, ...]:
    """Per route: can Envoy serve it alone? The reasons name each feature that needs Python."""
    backends = {b.name: b for b in config.backends}
    forced = set(config.envoy.gateway_routes)
    return tuple(decide_route(route, config, backends, forced) for route in config.routes)


def decide_route(route, config, backends, forced) -> Decision:
    """Derived from the declarations of every component (gateway/dataplane/components.py) and of
    every layer active on the route (each RouteLayer's `envoy`): nothing here names a policy."""
    declared = [component.envoy(route, backends) for component in COMPONENTS]
    settings = route_settings(route, config.defaults.route_policy)
    for layer in route_layers():
        layer_settings = settings[layer.name]
        if layer.active(layer_settings):
            declared.append(layer.envoy(layer_settings, route))
    reasons = ["listed in envoy.gateway_routes"] if route.model in forced else []
    if identifies(config.callers):
        # Gateway-wide, not a route's: Envoy would serve a call the gateway must identify first.
        reasons.append("callers: the gateway identifies every caller (docs/security.md)")
    reasons += [reason for d in declared for reason in d.hand_over]
    if reasons:
        return Decision(route.model, "gateway", tuple(reasons))
    return Decision(route.model, "envoy", tuple(note for d in declared for note in d.notes))
