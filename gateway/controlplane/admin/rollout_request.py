"""A StartRollout request checked against the route it names, before anything is stored."""

from __future__ import annotations

import math

from gateway.errors import invalid, shown
from tensorgate.admin.v1 import admin_pb2
from tensorgate.config.v1 import config_pb2

DEFAULT_STEPS = (5, 25, 50, 100)


def checked_steps(request: admin_pb2.StartRolloutRequest, route: config_pb2.Route) -> list[int]:
    """The rollout's steps (DEFAULT_STEPS when none are given); INVALID_ARGUMENT naming the
    field for a variant the route lacks, equal canary and baseline, steps that do not rise to
    100, or factors that are not finite and >= 0."""
    names = {v.name for v in route.variants}
    for field in ("canary", "baseline"):
        if getattr(request, field) not in names:
            raise invalid(
                f"{field}: model {shown(request.model)} has no variant "
                f"{shown(getattr(request, field))}"
            )
    if request.canary == request.baseline:
        raise invalid("canary and baseline must be different variants")
    steps = list(request.steps) or list(DEFAULT_STEPS)
    if any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
        raise invalid(f"steps must increase within 1..100 and end at 100, got {steps}")
    for field in ("max_error_ratio_factor", "max_p99_factor", "error_ratio_slack"):
        value = getattr(request, field)
        if not math.isfinite(value) or value < 0:  # NaN would pass every comparison
            raise invalid(f"{field} must be a finite number >= 0, got {value}")
    return steps


def step_progress(record, counts) -> None:
    """Fill the running step's progress into `record.rollout`: when the step started, the
    canary calls counted in it so far (every replica's), and what it must reach to end."""
    from gateway.durations import seconds
    from gateway.observability.stats import window

    rollout = record.rollout
    rollout.step_started_at.CopyFrom(record.step_started_at)
    minimum = seconds(record.request.min_step_duration, 30.0)
    rollout.min_step_duration.FromMilliseconds(int(minimum * 1000))
    rollout.min_requests = record.request.min_requests or 100
    start = list(record.step_start_counts)
    rollout.step_canary_requests = window(start, counts, rollout.model, rollout.canary)[0]
