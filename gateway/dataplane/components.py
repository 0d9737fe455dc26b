"""The parts of a route's config that are not a layer's policy (routing, renames, the backend
adapters, breakers, bulkheads), declared the way layers declare theirs (gateway/dataplane/layers/):
the config fields each owns and what Envoy mode does with it. The Envoy compiler decides each route
from the layers' and these declarations alone; tests/test_policy_coverage.py fails for a field
of Route, Variant, RoutePolicy or Backend that nobody owns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.dataplane.layers.chain import route_layers
from gateway.dataplane.layers.contract import OnEnvoy
from tensorgate.config.v1 import config_pb2

Backends = Mapping[str, config_pb2.Backend]


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    fields: tuple[str, ...]  # "Message.field"
    # Envoy mode, for every route: (route, backends by name) -> OnEnvoy (its docstring says
    # what it does, for docs/architecture.md)
    envoy: Callable[[config_pb2.Route, Backends], OnEnvoy]
    decoupled: str  # what ModelStreamInfer does with it for a decoupled model


def _renames(route: config_pb2.Route, backends: Backends) -> OnEnvoy:
    """hands the route to the gateway when tensors are renamed"""
    if any(v.input_names or v.output_names for v in route.variants):
        return OnEnvoy(hand_over=("input_names/output_names: tensors are renamed",))
    return OnEnvoy()


def _adapters(route: config_pb2.Route, backends: Backends) -> OnEnvoy:
    """Triton: forwarded as is; another kind hands the route to the gateway"""
    kinds = {backends[v.backend].kind for v in route.variants if v.backend in backends}
    reasons = []
    for kind in sorted(kinds - {config_pb2.BACKEND_KIND_TRITON}):
        if kind == config_pb2.BACKEND_KIND_OIP:
            reasons.append(
                "an OIP backend: the gateway enforces its parameter list and output handling"
            )
        else:
            name = config_pb2.BackendKind.Name(kind).removeprefix("BACKEND_KIND_")
            reasons.append(f"a {name} backend: the gateway translates the protocol")
    return OnEnvoy(hand_over=tuple(reasons))


def _access(route: config_pb2.Route, backends: Backends) -> OnEnvoy:
    """hands the route to the gateway when it declares authorization rules or rate limits (the
    gateway identifies callers and applies both; docs/security.md)"""
    if route.authorization.rules or route.rate_limits:
        return OnEnvoy(hand_over=("authorization/rate_limits: the gateway applies them",))
    return OnEnvoy()


def _rest_address(route: config_pb2.Route, backends: Backends) -> OnEnvoy:
    """gRPC: not used. REST (envoy.rest_listen): Envoy calls a variant's backend at its
    rest_address; a route with a variant whose backend has none is handed to the gateway's REST
    listener"""
    return OnEnvoy()


def _off_the_path(route: config_pb2.Route, backends: Backends) -> OnEnvoy:
    """not used: run by the control plane (tensorgate smoke, rollouts before each weight step),
    never on the request path"""
    return OnEnvoy()


def _translated(how: str) -> Callable[[config_pb2.Route, Backends], OnEnvoy]:
    def declared(route: config_pb2.Route, backends: Backends) -> OnEnvoy:
        return OnEnvoy()

    declared.__doc__ = f"translated: {how}"
    return declared


COMPONENTS = (
    # Weights, version pins, sticky keys, public names, drains: the route table itself
    # (gateway/dataplane/routing.py; Envoy: weighted clusters, the match table, the RTDS
    # weights layer).
    Component(
        "routing",
        (
            "Route.model",
            "Route.variants",
            "Route.policy",
            "Variant.name",
            "Variant.backend",
            "Variant.backend_model",
            "Variant.backend_version",
            "Variant.version",
            "Variant.weight",
            "Backend.name",
            "Backend.address",
        ),
        _translated("weighted clusters, the match table, the RTDS weights layer"),
        "applied: weights, pins, sticky keys, drains, health",
    ),
    Component(
        "renames",
        ("Variant.input_names", "Variant.output_names"),
        _renames,
        "inputs renamed; answers keep the backend's output names",
    ),
    # Protocol translation and per-kind options (adapters/; Envoy: Triton-shaped gRPC only).
    Component(
        "adapters",
        (
            "Backend.kind",
            "Backend.connection",
            "Backend.per_try_timeout",
            "Backend.torchserve",
            "Variant.tfserving",
            "Variant.torchserve",
        ),
        _adapters,
        "Triton only: other kinds' models answer once and take the chain",
    ),
    Component(
        "breaker",
        ("Backend.circuit_breaker",),
        _translated("outlier detection on the variant's cluster"),
        "an open breaker refuses new requests",
    ),
    Component(
        "bulkhead",
        ("Backend.bulkhead",),
        _translated("the cluster's circuit_breakers"),
        "not applied: the stream's own bounds hold (docs/streaming.md)",
    ),
    # Where a backend serves KServe v2 REST: only Envoy mode's REST listener calls it there (the
    # Python REST listener calls every backend through its adapter, as gRPC does).
    Component(
        "rest_address",
        ("Backend.rest_address",),
        _rest_address,
        "not used (streams are gRPC only)",
    ),
    # Known requests and answers (docs/smoke.md): `tensorgate smoke` and rollouts send them as
    # calls of their own; nothing on the request path reads them, so no path hands over.
    Component(
        "smoke",
        ("Route.smoke", "Variant.smoke"),
        _off_the_path,
        "not used (run by the control plane, not on the request path)",
    ),
    # Who may call, and how much (layers/access, before routing).
    Component(
        "access",
        ("Route.authorization", "Route.rate_limits"),
        _access,
        "applied: each request authorized, calls/s and bytes/s counted; max_concurrent not (the "
        "stream's own bounds hold)",
    ),
)


def _said(declaration: Callable) -> str:
    return " ".join((declaration.__doc__ or "").split())


def path_matrix() -> str:
    """docs/architecture.md's table of what each request path does with each part of a route's
    config, from the declarations (tests/test_policy_coverage.py checks the doc carries it)."""
    rows = [
        "| part | config fields | ModelInfer | REST infer (KServe v2) | ModelStreamInfer, "
        "decoupled model | Envoy mode |",
        "|---|---|---|---|---|---|",
    ]
    for layer in route_layers():
        rows.append(
            f"| {layer.name} (layer) | {', '.join(layer.fields)} | applied | applied | "
            f"{layer.decoupled} | {_said(layer.envoy)} |"
        )
    for component in COMPONENTS:
        rows.append(
            f"| {component.name} | {', '.join(component.fields)} | applied | applied | "
            f"{component.decoupled} | {_said(component.envoy)} |"
        )
    return "\n".join(rows) + "\n"
