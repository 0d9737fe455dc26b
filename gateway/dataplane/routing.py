"""The compiled route table: public model (and version) -> the variant that answers.

Compiled once per config revision into plain dicts and tuples, so resolving a request is one dict
lookup plus a bisect over that route's few variants: the cost does not grow with the number of
routes. A compiled table is immutable; a config change builds a new one and swaps it whole.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field

from uhashring import HashRing

from adapters.registry import variant_options
from gateway.dataplane.layers.chain import route_settings
from gateway.dataplane.target import Target
from gateway.errors import not_found, shown
from tensorgate.config.v1 import config_pb2

VARIANT_TRAILER = "x-tensorgate-variant"
BACKEND_TRAILER = "x-tensorgate-backend"
# uhashring places vnodes * weight points per variant; weights are scaled to about this many
# units per route so a ring stays small however large the configured weights are.
_RING_UNITS = 100
_RING_VNODES = 40


@dataclass(slots=True)
class _Picker:
    """Chooses among a fixed set of targets: weighted random, or sticky by key."""

    targets: tuple[Target, ...]
    weights: tuple[int, ...]
    _cumulative: list[int] = field(init=False)
    _total: int = field(init=False)
    _ring: HashRing | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._cumulative = list(itertools.accumulate(self.weights))
        self._total = self._cumulative[-1]

    def pick(self) -> Target:
        if len(self.targets) == 1:
            return self.targets[0]
        return self.targets[bisect.bisect_right(self._cumulative, random.random() * self._total)]

    def pick_healthy(self, down: frozenset[tuple[str, str, str]]) -> Target | None:
        """Weighted pick among targets not in `down`; None when all are down."""
        pairs = zip(self.targets, self.weights, strict=True)
        healthy = [(t, w) for t, w in pairs if t.key not in down]
        if not healthy:
            return None
        total = sum(w for _, w in healthy)
        point = random.random() * total
        for target, weight in healthy:
            point -= weight
            if point < 0:
                return target
        return healthy[-1][0]

    def pick_keyed(self, key: str) -> Target:
        if len(self.targets) == 1:
            return self.targets[0]
        if self._ring is None:
            # Built on first keyed use: most routes never see a route key, and building rings for
            # 10,000 routes up front would make every config change slow.
            scale = _RING_UNITS / self._total
            nodes = {
                t.variant: {
                    "instance": t,
                    "weight": max(1, round(w * scale)),
                    "vnodes": _RING_VNODES,
                }
                for t, w in zip(self.targets, self.weights, strict=True)
                if w > 0
            }
            self._ring = HashRing(nodes=nodes)
        return self._ring[key]


@dataclass(slots=True)
class RoutePlan:
    model: str
    targets: tuple[Target, ...]
    versions: tuple[str, ...]  # public versions, sorted numerically
    unpinned: _Picker
    by_version: dict[str, _Picker]
    settings: object  # gateway.dataplane.layers.RouteSettings: per layer, by name
    by_name: dict[str, Target]
    route: config_pb2.Route  # its config, for layers configured per variant
    # This route's compiled chain of layers (gateway.dataplane.pipeline.InferService), built on its
    # first call: a table of 10,000 routes does not compile 10,000 chains up front.
    service: object = None
    # Its authorization rules and rate limits (layers/access), compiled on first use likewise.
    access: object = None

    def variant(self, name: str) -> Target | None:
        return self.by_name.get(name)

    def alternative(self, version: str, exclude) -> Target | None:
        """Another variant for the same request (same pinned version), for retries and hedges."""
        others = [t for t in self.candidates(version) if t not in exclude]
        return max(others, key=lambda t: t.weight) if others else None

    def resolve(
        self,
        version: str,
        route_key: str | None,
        down: frozenset[tuple[str, str, str]] = frozenset(),
    ) -> Target:
        if version:
            picker = self.by_version.get(version)
            if picker is None:
                listed = ", ".join(self.versions) or "none; omit model_version"
                raise not_found(
                    f"model {shown(self.model)} has no version {shown(version)} "
                    f"(versions: {listed})"
                )
        else:
            picker = self.unpinned
        target = picker.pick_keyed(route_key) if route_key else picker.pick()
        if down and target.key in down:
            # Health checks say this variant cannot answer: send the call elsewhere while any
            # sibling is healthy (stickiness yields to availability). With none, keep it and let
            # breakers and fallback decide.
            target = picker.pick_healthy(down) or target
        return target

    def primary(self, version: str = "") -> Target:
        """The variant with the largest weight: a stable answer for metadata requests."""
        candidates = self.candidates(version)
        if not candidates:
            self.resolve(version, None)  # raises NOT_FOUND with the versions listed
        return max(candidates, key=lambda t: t.weight)

    def candidates(self, version: str = "") -> tuple[Target, ...]:
        """The variants that may answer a request for `version` ("" = unpinned)."""
        if version:
            return self.by_version[version].targets if version in self.by_version else ()
        return self.unpinned.targets


def _plan(route: config_pb2.Route, defaults: config_pb2.RoutePolicy, memo: dict) -> RoutePlan:
    targets = tuple(
        Target(
            model=route.model,
            variant=v.name,
            backend=v.backend,
            backend_model=v.backend_model or route.model,
            backend_version=v.backend_version,
            version=v.version,
            weight=v.weight,
            options=variant_options(v),
            options_key=_serialized(variant_options(v)),
            schema=route.schema if route.HasField("schema") else None,
            input_names=tuple(sorted(v.input_names.items())),
            output_names=tuple(sorted(v.output_names.items())),
            trailers=((VARIANT_TRAILER, v.name), (BACKEND_TRAILER, v.backend)),
        )
        for v in route.variants
    )
    weighted = tuple(t for t in targets if t.weight > 0)
    unpinned = _Picker(weighted, tuple(t.weight for t in weighted))
    by_version: dict[str, _Picker] = {}
    for version in {t.version for t in targets if t.version}:
        group = tuple(t for t in targets if t.version == version)
        weights = tuple(t.weight for t in group)
        # A pinned version is served even when its variants take no unpinned traffic.
        if not any(weights):
            weights = (1,) * len(group)
        by_version[version] = _Picker(group, weights)
    versions = tuple(sorted(by_version, key=int))
    return RoutePlan(
        route.model,
        targets,
        versions,
        unpinned,
        by_version,
        route_settings(route, defaults, memo),
        {t.variant: t for t in targets},
        route,
    )


def _serialized(options) -> bytes:
    return options.SerializeToString(deterministic=True) if options is not None else b""


class RouteTable:
    """All routes of one config revision."""

    def __init__(
        self, routes: list[config_pb2.Route], defaults: config_pb2.RoutePolicy | None = None
    ) -> None:
        defaults = defaults or config_pb2.RoutePolicy()
        memo: dict = {}  # settings shared by routes with the same policy
        self._plans = {route.model: _plan(route, defaults, memo) for route in routes}

    def __len__(self) -> int:
        return len(self._plans)

    def __iter__(self):
        return iter(self._plans.values())

    def plan(self, model: str) -> RoutePlan:
        plan = self._plans.get(model)
        if plan is None:
            raise not_found(f"unknown model {shown(model)}: no route for it in the gateway")
        return plan

    def get(self, model: str) -> RoutePlan | None:
        return self._plans.get(model)

    def resolve(
        self,
        model: str,
        version: str = "",
        route_key: str | None = None,
        down: frozenset[tuple[str, str, str]] = frozenset(),
    ) -> Target:
        return self.plan(model).resolve(version, route_key, down)
