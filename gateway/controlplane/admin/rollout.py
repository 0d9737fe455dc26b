"""Progressive canary rollouts with automatic analysis, durable in the revision store.

Each step moves the canary's share of the (canary + baseline) traffic up, as a normal revision,
holds it for a minimum time and number of canary calls, then compares the canary with the
baseline over that step: error ratio (backend-side failures) and p99 latency. Before each step
moves traffic, the canary's smoke examples (config: Route.smoke, Variant.smoke) are sent to it
(rollout_smoke.py). A canary that fails an example, or does worse by more than the configured
factors, is rolled back to the weights it started from, by itself, with the reason recorded
(in the rollout and in the audit log); one that passes every step is promoted to 100%.

A rollout's state (step, when it started, the analyses so far, the weights to restore) lives in
the store as a RolloutRecord, rewritten after every step. Any replica answers Start, Get and
Abort; one replica, the holder of the store's driver lease, drives every running rollout. If it
dies, another takes the lease within its TTL and resumes each rollout from its persisted step
(the step's analysis window included). The driver's writes are conditional on still holding
the lease, checked in the same etcd transaction as the write (route revisions included), so a
deposed driver cannot write over its successor. The driver's identity is unique per process
(the replica name plus a random suffix), so two processes given the same `store.etcd.replica`
cannot both hold the lease. A promoted rollout is never undone. A rollback or abort is recorded
with `restore_pending` in the same write that ends it, and cleared once the weights are back: a
driver that dies or loses the store between the two leaves the mark, and the next driver writes
the weights back (docs/reliability.md, Findings 3). The analysis sums the counts every replica
publishes to the store (gateway/observability/stats.py `window`), not one replica's traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from google.protobuf import timestamp_pb2

from gateway.controlplane.admin.rollout_analysis import analyse
from gateway.controlplane.admin.rollout_request import checked_steps, step_progress
from gateway.controlplane.admin.rollout_restore import Deposed, clear_pending, restore_weights
from gateway.controlplane.admin.rollout_smoke import SmokeGate, failure_reason
from gateway.controlplane.admin.routes import RouteManager, find_route, unavailable
from gateway.controlplane.store.base import (
    Conflict,
    NotDriver,
    RevisionStore,
    StoreUnavailable,
    now,
)
from gateway.durations import seconds
from gateway.errors import GatewayError, shown
from gateway.observability.stats import RecentStats, window
from tensorgate.admin.v1 import admin_pb2
from tensorgate.store.v1 import store_pb2

log = logging.getLogger(__name__)
IDLE_PUBLISH_S = 30.0
Rollout = admin_pb2.Rollout


def _age(stamp: timestamp_pb2.Timestamp) -> float:
    return max(0.0, time.time() - stamp.ToNanoseconds() / 1e9)


class Stopped(Exception):
    """The rollout left RUNNING elsewhere (aborted through another replica)."""


class RolloutController:
    def __init__(
        self,
        routes: RouteManager,
        store: RevisionStore,
        stats: RecentStats,
        replica: str,
        incarnation: str,
        *,
        poll: float = 0.2,
        lease_ttl: float = 10.0,
        metrics=None,
        smoke: SmokeGate | None = None,
    ) -> None:
        """`smoke`: runs the canary's smoke examples before each weight step (None: none run)."""
        self._routes = routes
        self._smoke = smoke
        self._store = store
        self._stats = stats
        self.replica = replica
        self._incarnation = incarnation
        # Who this process is in the store (the driver key, its counts): unique per process
        # whatever the config says, since two processes may be given one `store.etcd.replica`.
        self.identity = f"{replica}.{incarnation[:6]}"
        self._poll = poll
        self._lease_ttl = lease_ttl
        self._tasks: dict[str, asyncio.Task] = {}
        self._loops: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self.driving = False
        self._metrics = metrics

    def _show(self, rollout: admin_pb2.Rollout) -> None:
        if self._metrics is not None:
            self._metrics.rollout(rollout, Rollout.State.items())

    # --- the admin RPCs (any replica) --------------------------------------------------------

    async def _records(self) -> dict[str, store_pb2.RolloutRecord]:
        try:
            return await self._store.rollouts()
        except StoreUnavailable as err:
            raise unavailable(self._store, err) from None

    async def get(self, model: str) -> admin_pb2.Rollout:
        record = (await self._records()).get(model)
        if record is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no rollout for model {shown(model)}")
        if record.rollout.state == Rollout.STATE_RUNNING and record.HasField("step_started_at"):
            with contextlib.suppress(StoreUnavailable):  # progress: for `rollout --watch`
                step_progress(record, await self._all_counts())
        return record.rollout

    async def start(self, request: admin_pb2.StartRolloutRequest, who: str) -> admin_pb2.Rollout:
        running = (await self._records()).get(request.model)
        if running is not None and running.rollout.state == Rollout.STATE_RUNNING:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a rollout of {shown(running.rollout.canary)} for model {shown(request.model)} "
                "is already running",
            )
        if running is not None and running.restore_pending:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the last rollout of {shown(request.model)} ended but its weights are not "
                "written back yet (the driver does it within seconds): retry",
            )
        route = find_route(self._routes.routes(), request.model)
        steps = checked_steps(request, route)
        rollout = Rollout(
            model=request.model,
            canary=request.canary,
            baseline=request.baseline,
            state=Rollout.STATE_RUNNING,
            steps=steps,
            percent=0,
            started_at=now(),
        )
        record = store_pb2.RolloutRecord(
            rollout=rollout,
            request=request,
            original_weights={v.name: v.weight for v in route.variants},
            started_by=who,
        )
        try:
            await self._store.put_rollout(record)
        except StoreUnavailable as err:
            raise unavailable(self._store, err) from None
        self._show(rollout)
        self._wake.set()
        return rollout

    async def abort(self, model: str, reason: str, who: str) -> admin_pb2.Rollout:
        record = (await self._records()).get(model)
        if record is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no rollout for model {shown(model)}")
        if record.rollout.state != Rollout.STATE_RUNNING:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION, f"the rollout of {shown(model)} is not running"
            )
        task = self._tasks.pop(model, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # The driver (maybe another replica) sees the record leave RUNNING and stops.
        self._end(record, Rollout.STATE_ABORTED, f"aborted by {who}: {reason or 'no reason given'}")
        record.restore_pending = True
        try:
            await self._store.put_rollout(record)
        except StoreUnavailable as err:
            raise unavailable(self._store, err) from None
        self._show(record.rollout)
        await restore_weights(self._routes, record, who)
        await clear_pending(self._store, record, as_driver="")
        return record.rollout

    # --- driving (the lease holder) ------------------------------------------------------------

    def run(self, *, drive: bool, publish: bool) -> None:
        """Start the background work: with `publish`, publish this replica's counts (every
        replica's traffic counts in an analysis); with `drive`, drive rollouts while holding
        the lease."""
        self._loops = []
        if publish:
            self._loops.append(asyncio.create_task(self._publish_counts(), name="rollout-counts"))
        if drive:
            self._loops.append(asyncio.create_task(self._lead(), name="rollout-driver"))

    async def close(self) -> None:
        for task in [*self._loops, *self._tasks.values()]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def _publish_counts(self) -> None:
        """Every second while a rollout runs (its analysis needs them), every 30 s otherwise
        (each publish is a write: an idle fleet should not keep etcd busy)."""
        last = 0.0
        while True:
            try:
                records = await self._store.rollouts()
                running = any(r.rollout.state == Rollout.STATE_RUNNING for r in records.values())
                if running or time.monotonic() - last >= IDLE_PUBLISH_S:
                    await self._store.publish_counts(
                        self._stats.counts(self.identity, self._incarnation)
                    )
                    last = time.monotonic()
            except StoreUnavailable:
                pass  # the driver sees this replica's counts again when the store is back
            except Exception:
                log.exception("rollouts: cannot publish counts")
            await asyncio.sleep(min(1.0, self._poll * 5))

    async def _lead(self) -> None:
        renew = max(0.2, self._lease_ttl / 3)
        while True:
            try:
                holds = await self._store.try_drive(self.identity)
            except StoreUnavailable:
                holds = False
            except Exception:
                log.exception("rollouts: driver election failed")
                holds = False
            if holds != self.driving:
                log.info("rollouts: %s %s the driver", self.identity, "is" if holds else "is not")
                self.driving = holds
            if holds:
                await self._adopt()
            else:
                for model in list(self._tasks):
                    self._tasks.pop(model).cancel()
            await self._show_stored()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), renew)
            except TimeoutError:
                pass

    async def _show_stored(self) -> None:
        """Every replica's rollout gauges follow the store, not only the driver's."""
        try:
            records = await self._store.rollouts()
        except StoreUnavailable:
            return
        for record in records.values():
            self._show(record.rollout)

    async def _adopt(self) -> None:
        """Drive every running rollout that has no task here (new, or left by a dead driver)."""
        try:
            records = await self._store.rollouts()
        except StoreUnavailable:
            return
        for model, record in records.items():
            task = self._tasks.get(model)
            if task is not None and task.done():
                del self._tasks[model]
                task = None
            if task is not None:
                continue
            if record.rollout.state == Rollout.STATE_RUNNING:
                log.info("rollouts: %s drives %s/%s from step %d", self.identity, model,
                         record.rollout.canary, record.rollout.step)  # fmt: skip
                work = self._drive(model)
            elif record.restore_pending:
                log.warning("rollouts: %s writes back the weights of %s/%s (%s)", self.identity,
                            model, record.rollout.canary, record.rollout.reason)  # fmt: skip
                work = self._complete_restore(record)
            else:
                continue
            self._tasks[model] = asyncio.create_task(work, name=f"rollout-{model}")

    async def _save(self, record: store_pb2.RolloutRecord) -> None:
        """Persist progress, only while this replica is still the driver and the rollout is
        still running (an abort from any replica wins)."""
        await self._still_running(record)
        record.driver = self.identity
        try:
            await self._store.put_rollout(record, as_driver=self.identity)
        except (NotDriver, Conflict):
            raise Deposed from None
        self._show(record.rollout)

    async def _all_counts(self) -> list[store_pb2.ReplicaCounts]:
        """Every replica's published counts, this one's read live."""
        others = await self._store.replica_counts()
        mine = self._stats.counts(self.identity, self._incarnation)
        return [c for c in others if c.replica != self.identity] + [mine]

    async def _still_running(self, record: store_pb2.RolloutRecord) -> None:
        current = (await self._store.rollouts()).get(record.rollout.model)
        if (
            current is None
            or current.rollout.state != Rollout.STATE_RUNNING
            or current.rollout.started_at != record.rollout.started_at  # replaced by another
        ):
            raise Stopped

    async def _set_percent(self, record: store_pb2.RolloutRecord, percent: int) -> None:
        rollout = record.rollout
        route = find_route(self._routes.routes(), rollout.model)
        weights = {v.name: v.weight for v in route.variants}
        if (weights.get(rollout.canary), weights.get(rollout.baseline)) != (
            percent,
            100 - percent,
        ):

            def mutate(routes) -> None:
                route = find_route(routes, rollout.model)
                for variant in route.variants:
                    if variant.name == rollout.canary:
                        variant.weight = percent
                    elif variant.name == rollout.baseline:
                        variant.weight = 100 - percent

            try:
                await self._routes.change(
                    who=f"rollout:{record.started_by}",
                    method="Rollout",
                    summary=f"rollout {rollout.model}: {rollout.canary} {percent}%, "
                    f"{rollout.baseline} {100 - percent}%",
                    mutate=mutate,
                    as_driver=self.identity,
                )
            except NotDriver:
                raise Deposed from None
        rollout.percent = percent

    def _end(self, record: store_pb2.RolloutRecord, state, reason: str) -> None:
        rollout = record.rollout
        rollout.state = state
        rollout.reason = reason
        rollout.ended_at.CopyFrom(now())
        level = logging.INFO if state == Rollout.STATE_PROMOTED else logging.WARNING
        log.log(level, "rollout of %s/%s: %s (%s)", rollout.model, rollout.canary,
                Rollout.State.Name(state), reason)  # fmt: skip

    async def _finish(self, record, state, reason: str, *, restore: bool, why: str = "") -> None:
        # Recorded first: once the record has left RUNNING no driver moves it a step again; a
        # restore still to do is marked in the same write (finished by the next driver).
        self._end(record, state, reason)
        record.restore_pending = restore
        await self._save(record)
        if restore:
            await restore_weights(
                self._routes, record, record.started_by, as_driver=self.identity, why=why
            )
            await clear_pending(self._store, record, as_driver=self.identity)

    async def _complete_restore(self, record: store_pb2.RolloutRecord) -> None:
        try:
            await restore_weights(self._routes, record, record.started_by, as_driver=self.identity)
            await clear_pending(self._store, record, as_driver=self.identity)
        except (Deposed, StoreUnavailable, GatewayError) as err:
            log.warning("rollouts: weights of %s not written back yet (%s); retrying",
                        record.rollout.model, type(err).__name__)  # fmt: skip
        finally:
            if self._tasks.get(record.rollout.model) is asyncio.current_task():
                del self._tasks[record.rollout.model]

    async def _smoke_passes(self, record: store_pb2.RolloutRecord, percent: int) -> bool:
        """The canary's smoke examples before a step: False (rolled back) when one fails."""
        rollout = record.rollout
        run = None
        if self._smoke is not None:
            run = await self._smoke.run(rollout.model, rollout.canary, percent)
        if run is None:
            return True
        rollout.smoke.CopyFrom(run)
        if not run.failures:
            return True
        reason = failure_reason(run)
        why = reason.removesuffix("; rolled back")  # the revision's summary says "rolled back"
        await self._finish(record, Rollout.STATE_ROLLED_BACK, reason, restore=True, why=why)
        return False

    async def _drive(self, model: str) -> None:
        try:
            record = (await self._store.rollouts())[model]
            await self._steps(record)
        except (Deposed, StoreUnavailable) as err:
            log.warning("rollouts: stopped driving %s (%s); the next driver resumes it",
                        model, type(err).__name__)  # fmt: skip
        except Stopped:
            await self._after_stop(model, record)
        except asyncio.CancelledError:
            raise
        except GatewayError as err:
            if err.code == grpc.StatusCode.UNAVAILABLE:  # the store, not the rollout
                log.warning("rollouts: stopped driving %s (%s); the next driver resumes it",
                            model, err.message)  # fmt: skip
                return
            # the table changed under us in a way that broke the rollout
            try:
                await self._finish(
                    record, Rollout.STATE_ABORTED, f"stopped: {err.message}", restore=False
                )
            except (Stopped, Deposed, StoreUnavailable):
                pass
        finally:
            if self._tasks.get(model) is asyncio.current_task():
                del self._tasks[model]

    async def _after_stop(self, model: str, record: store_pb2.RolloutRecord) -> None:
        """The rollout left RUNNING elsewhere. Aborted: its weights were restored by the replica
        that aborted; again here (as the driver) in case this driver's step landed after that
        restore, a no-op otherwise. Promoted or rolled back (by another driver), or replaced by
        a newer rollout: finished, never undone."""
        try:
            current = (await self._store.rollouts()).get(model)
            if (
                current is None
                or current.rollout.state != Rollout.STATE_ABORTED
                or current.rollout.started_at != record.rollout.started_at
            ):
                return
            await restore_weights(
                self._routes, current, current.started_by, as_driver=self.identity
            )
        except (Deposed, StoreUnavailable, GatewayError) as err:
            log.warning("rollouts: %s: not restoring %s after its abort (%s)", self.identity,
                        model, type(err).__name__)  # fmt: skip

    async def _steps(self, record: store_pb2.RolloutRecord) -> None:
        rollout, request = record.rollout, record.request
        min_duration = seconds(request.min_step_duration, 30.0)
        max_duration = seconds(request.max_step_duration, 10 * min_duration)
        min_requests = request.min_requests or 100
        first = rollout.step
        for index in range(first, len(rollout.steps)):
            percent = rollout.steps[index]
            resumed = index == first and record.HasField("step_started_at")
            if not resumed:
                if not await self._smoke_passes(record, percent):
                    return
                if index == 0:
                    # Idle replicas publish counts every 30 s; they see the rollout and publish
                    # every second within one: then the window's start is current everywhere.
                    await asyncio.sleep(min(1.5, self._poll * 7.5))
                rollout.step = index
                rollout.percent = percent
                record.step_started_at.CopyFrom(now())
                del record.step_start_counts[:]
                record.step_start_counts.extend(await self._all_counts())
                await self._save(record)  # the step and its window start, before traffic moves
            await self._set_percent(record, percent)
            while True:
                await asyncio.sleep(self._poll)
                await self._still_running(record)
                elapsed = _age(record.step_started_at)
                counts = await self._all_counts()
                start = list(record.step_start_counts)
                canary = window(start, counts, rollout.model, rollout.canary)
                if elapsed >= min_duration and canary[0] >= min_requests:
                    break
                if elapsed >= max_duration:
                    await self._finish(
                        record,
                        Rollout.STATE_ROLLED_BACK,
                        f"step {percent}%: only {canary[0]} canary calls in {elapsed:.0f}s "
                        f"(needs {min_requests}); rolled back",
                        restore=True,
                    )
                    return
            baseline = window(start, counts, rollout.model, rollout.baseline)
            failed = analyse(record, percent, canary, baseline)
            if failed:
                await self._finish(
                    record,
                    Rollout.STATE_ROLLED_BACK,
                    f"step {percent}%: " + "; ".join(failed),
                    restore=True,
                )
                return
            rollout.reason = f"step {percent}% passed"
            record.ClearField("step_started_at")
            if index + 1 < len(rollout.steps):
                rollout.step = index + 1
            await self._save(record)
        await self._finish(
            record, Rollout.STATE_PROMOTED, f"{rollout.canary} promoted to 100%", restore=False
        )
