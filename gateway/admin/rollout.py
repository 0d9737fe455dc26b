"""Progressive canary rollouts with automatic analysis.

Each step moves the canary's share of the (canary + baseline) traffic up, as a normal revision,
holds it for a minimum time and number of canary calls, then compares the canary with the
baseline over that step: error ratio (backend-side failures) and p99 latency. A canary that does
worse by more than the configured factors is rolled back to the weights it started from, by
itself, with the reason recorded; one that passes every step is promoted to 100%.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc
from google.protobuf import timestamp_pb2

from gateway.admin.routes import RouteManager, find_route
from gateway.errors import GatewayError, invalid, shown
from gateway.stats import RecentStats
from tensorgate.admin.v1 import admin_pb2

log = logging.getLogger(__name__)
DEFAULT_STEPS = (5, 25, 50, 100)
Rollout = admin_pb2.Rollout


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _seconds(duration, default: float) -> float:
    value = duration.seconds + duration.nanos / 1e9
    return value if value > 0 else default


class RolloutController:
    def __init__(self, routes: RouteManager, stats: RecentStats, poll: float = 0.2) -> None:
        self._routes = routes
        self._stats = stats
        self._poll = poll
        self._rollouts: dict[str, admin_pb2.Rollout] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._original: dict[str, dict[str, int]] = {}  # weights before each model's rollout

    def get(self, model: str) -> admin_pb2.Rollout:
        rollout = self._rollouts.get(model)
        if rollout is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no rollout for model {shown(model)}")
        return rollout

    def start(self, request: admin_pb2.StartRolloutRequest, who: str) -> admin_pb2.Rollout:
        running = self._rollouts.get(request.model)
        if running is not None and running.state == Rollout.STATE_RUNNING:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a rollout of {shown(running.canary)} for model {shown(request.model)} is "
                "already running",
            )
        route = find_route(self._routes.routes(), request.model)
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
        rollout = Rollout(
            model=request.model,
            canary=request.canary,
            baseline=request.baseline,
            state=Rollout.STATE_RUNNING,
            steps=steps,
            percent=0,
            started_at=_now(),
        )
        self._rollouts[request.model] = rollout
        self._original[request.model] = {v.name: v.weight for v in route.variants}
        task = asyncio.create_task(
            self._run(rollout, request, who), name=f"rollout-{request.model}"
        )
        self._tasks[request.model] = task
        return rollout

    async def abort(self, model: str, reason: str, who: str) -> admin_pb2.Rollout:
        rollout = self.get(model)
        if rollout.state != Rollout.STATE_RUNNING:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION, f"the rollout of {shown(model)} is not running"
            )
        task = self._tasks.get(model)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._restore(rollout, who)
        self._end(
            rollout, Rollout.STATE_ABORTED, f"aborted by {who}: {reason or 'no reason given'}"
        )
        return rollout

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _set_percent(self, rollout, percent: int, who: str) -> None:
        def mutate(routes) -> None:
            route = find_route(routes, rollout.model)
            for variant in route.variants:
                if variant.name == rollout.canary:
                    variant.weight = percent
                elif variant.name == rollout.baseline:
                    variant.weight = 100 - percent

        await self._routes.change(
            who=f"rollout:{who}",
            method="Rollout",
            summary=f"rollout {rollout.model}: {rollout.canary} {percent}%, "
            f"{rollout.baseline} {100 - percent}%",
            mutate=mutate,
        )
        rollout.percent = percent

    async def _restore(self, rollout, who: str) -> None:
        original = self._original.get(rollout.model, {})

        def mutate(routes) -> None:
            route = find_route(routes, rollout.model)
            for variant in route.variants:
                if variant.name in original:
                    variant.weight = original[variant.name]

        await self._routes.change(
            who=f"rollout:{who}",
            method="Rollout",
            summary=f"rollout {rollout.model}: {rollout.canary} rolled back",
            mutate=mutate,
        )
        rollout.percent = 0

    def _end(self, rollout, state, reason: str) -> None:
        rollout.state = state
        rollout.reason = reason
        rollout.ended_at.CopyFrom(_now())
        log.info(
            "rollout of %s/%s: %s (%s)",
            rollout.model,
            rollout.canary,
            Rollout.State.Name(state),
            reason,
        )

    async def _run(self, rollout, request, who: str) -> None:
        min_duration = _seconds(request.min_step_duration, 30.0)
        max_duration = _seconds(request.max_step_duration, 10 * min_duration)
        min_requests = request.min_requests or 100
        error_factor = request.max_error_ratio_factor or 2.0
        slack = request.error_ratio_slack or 0.01
        p99_factor = request.max_p99_factor or 2.0
        last_baseline: tuple[int, float, float] | None = None
        try:
            for index, percent in enumerate(rollout.steps):
                rollout.step = index
                await self._set_percent(rollout, percent, who)
                started = time.monotonic()
                while True:
                    await asyncio.sleep(self._poll)
                    elapsed = time.monotonic() - started
                    canary = self._stats.summary(rollout.model, rollout.canary, since=started)
                    if elapsed >= min_duration and canary[0] >= min_requests:
                        break
                    if elapsed >= max_duration:
                        await self._restore(rollout, who)
                        self._end(
                            rollout,
                            Rollout.STATE_ROLLED_BACK,
                            f"step {percent}%: only {canary[0]} canary calls in {elapsed:.0f}s "
                            f"(needs {min_requests}); rolled back",
                        )
                        return
                baseline = self._stats.summary(rollout.model, rollout.baseline, since=started)
                if baseline[0] == 0 and last_baseline is not None:
                    baseline = (
                        last_baseline  # at 100% the baseline gets no calls: use the last step's
                    )
                last_baseline = baseline if baseline[0] else last_baseline
                failed = []
                if canary[1] > baseline[1] * error_factor + slack:
                    failed.append(
                        f"error ratio {canary[1]:.3f} > {error_factor:g} x baseline "
                        f"{baseline[1]:.3f} + {slack:g}"
                    )
                if baseline[0] and canary[2] > baseline[2] * p99_factor:
                    failed.append(
                        f"p99 {canary[2] * 1000:.1f} ms > {p99_factor:g} x baseline "
                        f"{baseline[2] * 1000:.1f} ms"
                    )
                rollout.analyses.add(
                    percent=percent,
                    canary_requests=canary[0],
                    canary_error_ratio=canary[1],
                    canary_p99_seconds=canary[2],
                    baseline_requests=baseline[0],
                    baseline_error_ratio=baseline[1],
                    baseline_p99_seconds=baseline[2],
                    passed=not failed,
                )
                if failed:
                    await self._restore(rollout, who)
                    self._end(
                        rollout, Rollout.STATE_ROLLED_BACK, f"step {percent}%: " + "; ".join(failed)
                    )
                    return
                rollout.reason = f"step {percent}% passed"
            self._end(rollout, Rollout.STATE_PROMOTED, f"{rollout.canary} promoted to 100%")
        except asyncio.CancelledError:
            raise
        except GatewayError as err:  # the table changed under us in a way that broke the rollout
            self._end(rollout, Rollout.STATE_ABORTED, f"stopped: {err.message}")
