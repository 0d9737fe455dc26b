"""The read-only status page (`GET /status` on the admin listener, same credentials as the admin
API): the route table's revision, every route's readiness, each variant's weight and share of
calls, health, and recent calls, error ratio, p50 and p99 (last minute), and rollouts in
progress. One HTML page, no scripts, refreshed by the browser every 5 s."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

from gateway.errors import GatewayError
from tensorgate.admin.v1 import admin_pb2

WINDOW_S = 60.0


@dataclass(frozen=True)
class VariantRow:
    name: str
    backend: str
    target: str
    version: str
    weight: int
    share: float
    health: str  # "ok", or why not
    calls: int
    error_ratio: float
    p50: float
    p99: float


@dataclass(frozen=True)
class RouteRow:
    model: str
    ready: bool
    variants: tuple[VariantRow, ...]
    rollout: str  # "" or a line on the rollout in progress


async def snapshot(view, routes, rollouts) -> tuple[str, bool, list[RouteRow]]:
    """(revision line, gateway ready, routes) from the running gateway."""
    readiness, recent = view.readiness, view.recent
    since = time.monotonic() - WINDOW_S
    rows = []
    for route in view.config.routes:
        total = sum(v.weight for v in route.variants)
        plan = view.table.get(route.model)
        targets = {t.variant: t for t in plan.targets} if plan is not None else {}
        variants = []
        for v in route.variants:
            target = targets.get(v.name)
            calls, ratio, p99 = recent.summary(route.model, v.name, since=since)
            variants.append(
                VariantRow(
                    v.name, v.backend,
                    v.backend_model + (f":{v.backend_version}" if v.backend_version else ""),
                    v.version or "-", v.weight, v.weight / total if total else 0.0,
                    _health(readiness, v.backend, target), calls, ratio,
                    recent.quantile(route.model, v.name, 0.5, since), p99,
                )
            )  # fmt: skip
        rows.append(
            RouteRow(route.model, readiness.route_ready(route.model), tuple(variants),
                     await _rollout(rollouts, route.model))
        )  # fmt: skip
    r = routes.revision
    revision = f"revision {r.number} by {r.author}: {r.summary}"
    return revision, readiness.ready, rows


def _health(readiness, backend: str, target) -> str:
    if backend in readiness.drained:
        return "drained"
    if not readiness.backend_up.get(backend):
        return "backend down"
    if target is not None and target.key in readiness.down:
        return "unable to answer (model not ready)"
    return "ok"


async def _rollout(rollouts, model: str) -> str:
    try:
        rollout = await rollouts.get(model)
    except GatewayError:
        return ""
    if rollout.state != admin_pb2.Rollout.STATE_RUNNING:
        return ""
    steps = " -> ".join(
        f"[{p}%]" if i == rollout.step else f"{p}%" for i, p in enumerate(rollout.steps)
    )
    return f"rollout of {rollout.canary} vs {rollout.baseline}: {steps}"


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
.meta { color: #555; margin-bottom: 12px; }
table { border-collapse: collapse; min-width: 900px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid #dde1e8; }
th { background: #f1f3f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1b7a34; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
.bar { display: inline-block; height: 10px; background: #4a78d0; vertical-align: middle; }
.rollout { margin: 4px 0; color: #7a4b00; }
"""


def render(revision: str, ready: bool, routes: list[RouteRow]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='5'><title>tensorgate status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>tensorgate status</h1>",
        f"<div class='meta'>{e(revision)} &middot; gateway "
        f"<span class='{'ok' if ready else 'bad'}'>{'ready' if ready else 'NOT ready'}</span>"
        f" &middot; calls, errors and latency over the last {WINDOW_S:.0f} s &middot; "
        "weights are relative: share = weight / sum of the route's weights</div>",
    ]
    for route in routes:
        state = "<span class='ok'>ready</span>" if route.ready else (
            "<span class='bad'>NOT ready: no variant or fallback can answer</span>"
        )  # fmt: skip
        parts.append(f"<h2>{e(route.model)} &middot; {state}</h2>")
        if route.rollout:
            parts.append(f"<div class='rollout'>{e(route.rollout)}</div>")
        parts.append(
            "<table><tr><th>variant</th><th>backend</th><th>backend model</th><th>version</th>"
            "<th>weight</th><th>share</th><th>health</th><th>calls</th><th>errors</th>"
            "<th>p50</th><th>p99</th></tr>"
        )
        for v in route.variants:
            health = f"<span class='{'ok' if v.health == 'ok' else 'bad'}'>{e(v.health)}</span>"
            bar = f"<span class='bar' style='width:{round(60 * v.share)}px'></span>"
            timing = "".join(
                f"<td class='num'>{q * 1000:.1f} ms</td>" if v.calls else "<td class='num'>-</td>"
                for q in (v.p50, v.p99)
            )
            parts.append(
                f"<tr><td>{e(v.name)}</td><td>{e(v.backend)}</td><td>{e(v.target)}</td>"
                f"<td>{e(v.version)}</td><td class='num'>{v.weight}</td>"
                f"<td>{bar} {100 * v.share:.0f}%</td><td>{health}</td>"
                f"<td class='num'>{v.calls}</td><td class='num'>{100 * v.error_ratio:.1f}%</td>"
                f"{timing}</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
