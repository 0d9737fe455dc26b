"""Which data plane answers each route (printed by `check-config`), derived from the declarations
of every component and every layer active on the route: nothing here names a policy.

REST (envoy.rest_listen) takes the gRPC decision and adds what only the REST listener needs
(`decide_rest_route`): every variant's backend serves REST (Backend.rest_address), and the
backend's answer already shows the public names, because Envoy passes REST answers on unread.
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


# gRPC codes a route may retry -> what the REST listener retries for them: Envoy's retry_on words
# and the HTTP statuses Triton's HTTP endpoint answers for the same failure (INTERNAL 500,
# UNAVAILABLE 503). A per-try timeout is Envoy's own 504 (a read timeout: "reset"). The codes
# the gRPC listener maps (layers/retry ENVOY_RETRY_ON) less CANCELLED, which config checks refuse;
# a code mapped for gRPC but not here would hand the route to the gateway.
REST_RETRY_ON: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "UNAVAILABLE": (("reset", "connect-failure", "refused-stream"), (503,)),
    "DEADLINE_EXCEEDED": (("reset",), (504,)),
    "INTERNAL": ((), (500,)),
    "RESOURCE_EXHAUSTED": ((), (429,)),
}


def rest_on(config: config_pb2.GatewayConfig) -> bool:
    return config.listeners.xds != "off" and config.envoy.rest_listen not in ("", "off")


def decide_rest(config: config_pb2.GatewayConfig) -> tuple[Decision, ...]:
    """Per route, for Envoy's REST listener: can Envoy serve its KServe v2 REST calls alone?
    Empty when envoy.rest_listen is off."""
    if not rest_on(config):
        return ()
    backends = {b.name: b for b in config.backends}
    forced = set(config.envoy.gateway_routes)
    return tuple(
        decide_rest_route(route, config, backends, decide_route(route, config, backends, forced))
        for route in config.routes
    )


def answering(route: config_pb2.Route, settings) -> list[config_pb2.Variant]:
    """The variants whose answers a caller can see: those that take unpinned calls (a weight),
    pinned calls (a version) or fallbacks. A shadow alone is not among them: its answers are
    dropped."""
    fallback = {s.variant for s in settings.fallback if s.WhichOneof("step") == "variant"}
    return [v for v in route.variants if v.weight > 0 or v.version or v.name in fallback]


def decide_rest_route(route, config, backends, grpc: Decision) -> Decision:
    """The gRPC decision (`grpc`: every layer's and component's declaration), then REST's own
    conditions: the `rest_address` component (gateway/dataplane/components.py) and answers that
    need no rewrite. Envoy forwards a REST answer unread, and its body names the model and the
    version that ran (`model_name`, `model_version`), where the gateway's names the public ones:
    so Envoy serves only variants the backend knows by their public name and public version."""
    if grpc.path != "envoy":
        return grpc
    settings = route_settings(route, config.defaults.route_policy)
    reasons = []
    for variant in route.variants:
        backend = backends[variant.backend]
        if not backend.rest_address:
            reasons.append(
                f"variant {variant.name!r}: backend {backend.name!r} has no rest_address (the "
                "gateway calls it over gRPC)"
            )
    for variant in answering(route, settings):
        if variant.backend_model != route.model:
            reasons.append(
                f"variant {variant.name!r} is renamed (backend_model {variant.backend_model!r}): "
                "a REST answer names the model in its body, which Envoy does not rewrite"
            )
        elif not variant.version:
            reasons.append(
                f"variant {variant.name!r} has no version: the backend's answer names the "
                "version it ran, the gateway's none"
            )
        elif variant.backend_version != variant.version or str(int(variant.version)) != (
            variant.version
        ):
            reasons.append(
                f"variant {variant.name!r}: version {variant.version!r} is not the backend's "
                f"({variant.backend_version or 'its default'!r}), which its answer names"
            )
    unmatched = sorted({c.name for c in settings.retry.retry_on} - REST_RETRY_ON.keys())
    if settings.retry.max_attempts > 1 and unmatched:
        reasons.append(f"retry.retry_on {unmatched}: no HTTP status to retry them on")
    if reasons:
        return Decision(route.model, "gateway", tuple(reasons))
    return grpc
