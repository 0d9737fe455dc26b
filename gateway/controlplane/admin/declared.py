"""The config file's route table against the one being served: the start-up WARNING when they
differ (the store's head wins, so an edit to the file is never served silently), and what
`ApplyRouteTable` (`tensorgate admin apply -f FILE`) would change, in a line and as a diff."""

from __future__ import annotations

import difflib
import logging

from gateway.controlplane.admin.audit import routes_text
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)


def diff(before, after, before_name: str = "served", after_name: str = "file") -> str:
    """A unified diff of two route tables (the audit log's rendering)."""
    return "\n".join(
        difflib.unified_diff(
            routes_text(before), routes_text(after), before_name, after_name, lineterm="", n=2
        )
    )


def same(before, after) -> bool:
    return routes_text(before) == routes_text(after)


def warn(file_routes, latest, source: str = "") -> bool:
    """Log a WARNING when the file's routes differ from the stored head being served. True if
    they differ."""
    if same(latest.routes, file_routes):
        return False
    where = source or "the config file"
    apply = f"tensorgate admin apply -f {source}" if source else "tensorgate admin apply -f FILE"
    log.warning(
        "config drift: the routes in %s differ from the revision store's head, revision %d "
        "(%s, by %s), and revision %d is what is served; the file's routes are NOT served. "
        "What differs: %s. To serve the file's routes: %s (--dry-run first shows the change); "
        "to keep the stored ones, update the file (tensorgate admin routes --json shows them). "
        "Diff, stored -> file:\n%s",
        where, latest.number, latest.summary, latest.author, latest.number,
        summary(latest.routes, file_routes), apply,
        diff(latest.routes, file_routes, "stored", "file"),
    )  # fmt: skip
    return True


def summary(before, after) -> str:
    """What changes from one route table to the other, in a line: routes and variants added
    and removed, weights changed, other edits named by route."""
    old = {r.model: r for r in before}
    new = {r.model: r for r in after}
    parts = [f"+route {m}" for m in new if m not in old]
    parts += [f"-route {m}" for m in old if m not in new]
    for model in (m for m in new if m in old):
        parts.extend(_route_changes(old[model], new[model]))
    return ", ".join(parts) or "no change"


def _route_changes(old: config_pb2.Route, new: config_pb2.Route) -> list[str]:
    model = new.model
    before = {v.name: v for v in old.variants}
    after = {v.name: v for v in new.variants}
    parts = [f"{model}: +variant {n}" for n in after if n not in before]
    parts += [f"{model}: -variant {n}" for n in before if n not in after]
    weights = [
        f"{n} {before[n].weight}->{v.weight}"
        for n, v in after.items()
        if n in before and before[n].weight != v.weight
    ]
    if weights:
        parts.append(f"{model}: weights {', '.join(weights)}")
    for name, variant in after.items():
        if name in before:
            a, b = config_pb2.Variant(), config_pb2.Variant()
            a.CopyFrom(before[name])
            b.CopyFrom(variant)
            a.weight = b.weight = 0
            if a != b:
                parts.append(f"{model}: variant {name} changed")
    if old.policy != new.policy:
        parts.append(f"{model}: policy changed")
    if old.schema != new.schema:
        parts.append(f"{model}: schema changed")
    return parts
