"""How `tensorgate admin` prints replies without --json: tables and one-line summaries. Weights
are relative (a route's weights need not add up to 100), so every weight is shown beside the
share of the route's unpinned traffic it gets."""

from __future__ import annotations

import sys
import time

from google.protobuf import json_format

from tensorgate.admin.v1 import admin_pb2


def table(rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def print_json(reply, *, one_line: bool = False) -> None:
    print(
        json_format.MessageToJson(
            reply,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            indent=None if one_line else 2,
        ),
        flush=True,
    )


def share(weight: int, total: int) -> str:
    return f"{100 * weight / total:.0f}%" if total else "0%"


def shares(route) -> str:
    """'stable 90 (47%), canary 100 (53%)': each weight and its share of unpinned calls."""
    total = sum(v.weight for v in route.variants)
    return ", ".join(f"{v.name} {v.weight} ({share(v.weight, total)})" for v in route.variants)


def print_revision(reply) -> None:
    print(f"revision {reply.revision.number}: {reply.revision.summary}")
    route = getattr(reply, "route", None)
    if route is not None and route.model:
        print(f"  {route.model}: {shares(route)}  (weights are relative; % = share of calls)")


def print_routes(reply) -> None:
    r = reply.revision
    print(f"revision {r.number} by {r.author}: {r.summary}")
    rows = [["MODEL", "VARIANT", "BACKEND", "BACKEND MODEL", "VERSION", "WEIGHT", "SHARE"]]
    for route in reply.routes:
        total = sum(v.weight for v in route.variants)
        for v in route.variants:
            target = v.backend_model + (f":{v.backend_version}" if v.backend_version else "")
            rows.append(
                [route.model, v.name, v.backend, target, v.version or "-", v.weight,
                 share(v.weight, total)]
            )  # fmt: skip
        if route.policy.shadow.variant:
            rows.append(
                [route.model, f"(shadow {route.policy.shadow.variant})", "", "", "", "",
                 f"{route.policy.shadow.fraction:.0%} mirrored"]
            )  # fmt: skip
    print(table(rows))
    print("(SHARE: the variant's share of unpinned calls; weights are relative)")


def print_access(reply) -> None:
    """Who may call which model (authorization rules) and how much (rate limits)."""
    r = reply.revision
    print(f"revision {r.number} by {r.author}: {r.summary}")
    rows = [["MODEL", "RULE", "CALLERS", "GROUPS", "VERSIONS", "ROUTE KEY"]]
    limits = [["MODEL", "LIMIT", "PER", "APPLIES TO", "CALLS/S", "BURST", "BYTES/S", "IN FLIGHT"]]
    for route in reply.routes:
        rules = route.authorization.rules
        if not rules:
            rows.append([route.model, "(none)", "every identified caller", "", "any", "yes"])
        for rule in rules:
            rows.append([route.model, rule.name, ", ".join(rule.callers) or "-",
                         ", ".join(rule.groups) or "-", ", ".join(rule.versions) or "any",
                         "yes" if rule.route_key else "no"])  # fmt: skip
        for limit in route.rate_limits:
            per = "route" if limit.per == limit.PER_ROUTE else "caller"
            limits.append([route.model, limit.name, per, ", ".join(limit.callers) or "every caller",
                           f"{limit.calls_per_second:g}" if limit.calls_per_second else "-",
                           limit.burst or "-", limit.bytes_per_second or "-",
                           limit.max_concurrent or "-"])  # fmt: skip
    print(table(rows))
    if len(limits) > 1:
        print()
        print(table(limits))
    print("(a route with rules admits only callers a rule matches; docs/security.md)")


def print_revisions(reply) -> None:
    rows = [["REVISION", "WHEN (UTC)", "WHO", "WHAT"]]
    for r in reply.revisions:
        when = r.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        rows.append([r.number, when, r.author, r.summary])
    print(table(rows))


def print_backends(reply) -> None:
    rows = [["BACKEND", "HEALTHY", "BREAKER", "IN FLIGHT", "DRAINED", "CALLS/1m", "ERRORS"]]
    for b in reply.backends:
        rows.append(
            [b.name, "yes" if b.healthy else "NO", b.breaker_state, b.in_flight,
             "yes" if b.drained else "", b.recent_requests, f"{b.recent_error_ratio:.1%}"]
        )  # fmt: skip
    print(table(rows))
    if not reply.variants:
        return
    totals: dict[str, int] = {}
    for v in reply.variants:
        totals[v.model] = totals.get(v.model, 0) + v.weight
    rows = [["MODEL", "VARIANT", "BACKEND", "WEIGHT", "SHARE", "HEALTHY", "CALLS/1m", "ERRORS",
             "P99"]]  # fmt: skip
    for v in reply.variants:
        p99 = f"{v.recent_p99_seconds * 1000:.1f} ms" if v.recent_requests else "-"
        rows.append(
            [v.model, v.variant, v.backend, v.weight, share(v.weight, totals[v.model]),
             "yes" if v.healthy else "NO", v.recent_requests, f"{v.recent_error_ratio:.1%}", p99]
        )  # fmt: skip
    print()
    print(table(rows))


def print_drained(reply) -> None:
    print(f"drained: {', '.join(reply.drained) or 'none'}")


def print_apply(reply) -> None:
    if not reply.changed:
        print(f"no change: the live route table (revision {reply.revision.number}) is the file's")
        return
    if reply.dry_run:
        print(f"dry run: would make revision {reply.revision.number + 1}: {reply.summary}")
    else:
        print(f"revision {reply.revision.number}: {reply.revision.summary}")
    if reply.diff:
        print(reply.diff)


def print_rollout(rollout) -> None:
    state = admin_pb2.Rollout.State.Name(rollout.state).removeprefix("STATE_").lower()
    steps = " -> ".join(
        f"[{s}%]" if i == rollout.step and state == "running" else f"{s}%"
        for i, s in enumerate(rollout.steps)
    )
    print(f"{rollout.model}: {rollout.canary} vs {rollout.baseline}: {state}  {steps}")
    for a in rollout.analyses:
        print(
            f"  {a.percent:>3}%  canary {a.canary_requests} calls, "
            f"errors {a.canary_error_ratio:.1%}, p99 {a.canary_p99_seconds * 1000:.1f} ms | "
            f"baseline {a.baseline_requests} calls, errors {a.baseline_error_ratio:.1%}, "
            f"p99 {a.baseline_p99_seconds * 1000:.1f} ms  "
            f"{'pass' if a.passed else 'FAIL'}"
        )
    if rollout.HasField("smoke"):  # the canary's smoke examples, last run (docs/smoke.md)
        run = rollout.smoke
        failed = len(run.failures)
        verdict = f"{failed} of {run.examples} FAILED" if failed else f"{run.examples} passed"
        print(f"  smoke examples before {run.percent}%: {verdict}")
        for failure in run.failures:
            print(f"    {failure.example}: {failure.problem}")
    if rollout.reason:
        print(f"  {rollout.reason}")
    sys.stdout.flush()


def progress(rollout) -> str:
    """One line on the running step: which, the canary calls so far, and the time left."""
    n = len(rollout.steps)
    line = f"step {rollout.step + 1}/{n} at {rollout.percent}%"
    if rollout.HasField("step_started_at"):
        elapsed = max(0.0, time.time() - rollout.step_started_at.ToNanoseconds() / 1e9)
        need = rollout.min_step_duration.ToNanoseconds() / 1e9
        line += f": {rollout.step_canary_requests}"
        if rollout.min_requests:
            line += f"/{rollout.min_requests}"
        line += f" canary calls, {elapsed:.0f}s"
        if need:
            line += f" of at least {need:.0f}s (about {max(0.0, need - elapsed):.0f}s left)"
    return line
