"""The live route table as a sequence of revisions in a store (gateway/controlplane/store/).

Every accepted change is validated whole, written to the store as the next revision together
with its audit entry (compare-and-swap: it lands only on top of the revision it was made from),
then swapped in atomically. A rejected change leaves everything as it was. Every gateway
process follows the store (`follow`), so a change made through any replica or worker is served
by all of them; while the store is unreachable they keep serving the last table they had.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import grpc
import prometheus_client as prom
from google.protobuf import timestamp_pb2

from gateway.controlplane.admin import audit, declared
from gateway.controlplane.admin.view import GatewayView
from gateway.controlplane.config import ConfigError, validate
from gateway.controlplane.store.base import (
    Conflict,
    RevisionStore,
    StoredRevision,
    StoreUnavailable,
)
from gateway.errors import GatewayError, shown
from gateway.observability import logs
from tensorgate.admin.v1 import admin_pb2
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)

# A change made without expected_revision that loses a race is made again on the newer table.
_RETRIES = 5


def stale(expected: int, live: int) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"expected revision {expected}, but the live revision is {live}: re-read and retry",
    )


def rejected(err: ConfigError) -> GatewayError:
    reasons = "; ".join(str(p) for p in err.problems)
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"change rejected: {reasons}")


def unavailable(store: RevisionStore, err: StoreUnavailable) -> GatewayError:
    """UNAVAILABLE naming the store once. "Nothing was changed" only when that is known: a
    write that was sent and got no answer may still be applied (docs/admin.md)."""
    where = f"the revision store ({store.description})"
    if not err.outcome_unknown:
        reason = f"{where} is unavailable: {err.reason}; nothing was changed"
        return GatewayError(grpc.StatusCode.UNAVAILABLE, reason)
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        f"{where} did not answer the write ({err.reason}): its outcome is unknown; it may "
        "still be applied when the store recovers. Check once the store answers; repeating "
        "it is safe",
    )


class OutcomeUnknown(GatewayError):
    """A revision write was sent and got no answer: it may have landed, or land later.
    `trailers` tell a client which revision to look for (the CLI resolves it itself)."""

    TRAILER = "tensorgate-unknown-revision-bin"  # admin.v1.Revision: number, time, who, what

    def __init__(self, store: RevisionStore, err: StoreUnavailable, revision: StoredRevision,
                 live: int) -> None:  # fmt: skip
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"the revision store ({store.description}) did not answer the write of revision "
            f"{revision.number} ({err.reason}): its outcome is unknown, not failed: it may "
            "have been stored, or be stored when the store recovers. Find out once the store "
            f"answers: revision {revision.number} by {revision.author} "
            f"({revision.summary!r}) in ListRevisions (tensorgate admin revisions). A retry "
            f"with expected_revision {live} (CLI --expect {live}) is safe: it applies once, or "
            "fails with FAILED_PRECONDITION naming the revision that won",
        )
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(revision.created_at * 1e9))
        attempted = admin_pb2.Revision(
            number=revision.number, created_at=stamp, author=revision.author,
            summary=revision.summary,
        )  # fmt: skip
        self.trailers = ((self.TRAILER, attempted.SerializeToString()),)


class StoreMetrics:
    def __init__(self, registry) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.revision = prom.Gauge(
            "tensorgate_route_revision", "Route table revision this process serves.", **kwargs
        )
        self.store_up = prom.Gauge(
            "tensorgate_store_up", "1 while the revision store answers this process.", **kwargs
        )
        self.rejected = prom.Counter(
            "tensorgate_store_revisions_rejected",
            "Stored revisions this process could not apply (invalid against its config).",
            **kwargs,
        )


class RouteManager:
    def __init__(self, runtime: GatewayView, store: RevisionStore, registry=None) -> None:
        self._runtime = runtime
        self._store = store
        self._lock = asyncio.Lock()
        self.metrics = StoreMetrics(registry)
        # Called with each newly applied config (e.g. the xDS control plane pushes it to Envoys).
        self.on_change: list[Callable[[config_pb2.GatewayConfig], None]] = []
        # Called with the drained backends whenever the store's set is read.
        self.on_drains: list[Callable[[frozenset[str]], object]] = []
        self.revision: StoredRevision | None = None
        self._rejected: int = 0  # the last stored revision found invalid (logged once)
        # The store's newest revision, even one this process cannot serve: a change made here
        # goes on top of it (so an invalid head can be replaced through any replica).
        self._head: int = 0
        self._unrecorded = False  # booted from the file into an empty store, not yet written

    @property
    def store(self) -> RevisionStore:
        return self._store

    async def boot(self, *, record: bool = True, source: str = "") -> StoredRevision:
        """Serve the store's last revision if there is one (validated against this config's
        backends and defaults; a WARNING with the diff when the config file's routes differ),
        else the boot file's routes as revision 1, stored when `record` (or later, by
        `record_boot`, once start-up can no longer fail)."""
        try:
            latest = await self._store.latest()
        except StoreUnavailable as err:
            raise OSError(
                f"cannot start: the revision store ({self._store.description}) is "
                f"unavailable: {err.reason}"
            ) from None
        if latest is None:
            self.revision = StoredRevision(
                1, time.time(), "boot", "routes from the config file",
                tuple(self._runtime.config.routes),
            )  # fmt: skip
            self._unrecorded = True
            if record:
                await self.record_boot()
        else:
            file_routes = list(self._runtime.config.routes)
            # A stored table that no longer fits this config (a backend removed, say) stops
            # start-up with ConfigError naming the revision: better than serving the boot file.
            self._runtime.apply(self._validated(latest.routes, f"stored revision {latest.number}"))
            self.revision = latest
            declared.warn(file_routes, latest, source)
        self.metrics.revision.set(self.revision.number)
        self.metrics.store_up.set(1)
        return self.revision

    async def record_boot(self) -> None:
        """Store the boot file's routes as revision 1 when `boot` found the store empty. Called
        once every listener is bound: a `serve` that fails to start writes nothing."""
        if not self._unrecorded:
            return
        async with self._lock:
            first = self.revision
            entry = audit.entry(
                who="boot", method="Boot", revision=1, summary=first.summary,
                before=[], after=first.routes,
            )  # fmt: skip
            try:
                await self._store.append(first, entry)
            except Conflict:
                # Another replica booted the store first: serve its table.
                self.revision = dataclasses.replace(first, number=0)
                await self._sync_locked()
            except StoreUnavailable as err:
                raise OSError(
                    f"cannot start: the revision store ({self._store.description}) is "
                    f"unavailable: {err.reason}"
                ) from None
            self._unrecorded = False

    def _validated(self, routes, source: str) -> config_pb2.GatewayConfig:
        candidate = config_pb2.GatewayConfig()
        candidate.CopyFrom(self._runtime.config)
        del candidate.routes[:]
        candidate.routes.extend(routes)
        return validate(candidate, source=source)

    def routes(self) -> list[config_pb2.Route]:
        return list(self._runtime.config.routes)

    @property
    def live(self) -> int:
        """The revision a change would go on top of."""
        return max(self.revision.number, self._head)

    def checked(self, routes, method: str) -> list[config_pb2.Route]:
        """`routes` validated (and defaulted) against the live config as a change would be, or
        INVALID_ARGUMENT with every problem."""
        try:
            return list(self._validated(routes, method).routes)
        except ConfigError as err:
            raise rejected(err) from None

    def _swap(self, revision: StoredRevision, validated: config_pb2.GatewayConfig) -> None:
        self._runtime.apply(validated)
        self.revision = revision
        self.metrics.revision.set(revision.number)
        for notify in self.on_change:
            notify(self._runtime.config)

    async def change(
        self,
        *,
        who: str,
        method: str,
        summary: str,
        mutate: Callable[[list[config_pb2.Route]], None],
        expected_revision: int = 0,
        as_driver: str = "",
    ) -> StoredRevision:
        """`as_driver`: the rollout driver's identity; the write lands only while it holds the
        driver lease (NotDriver otherwise)."""
        async with self._lock:
            for _ in range(_RETRIES):
                live = max(self.revision.number, self._head)
                if expected_revision and expected_revision != live:
                    raise stale(expected_revision, live)
                before = self.routes()
                routes = []
                for route in before:
                    copy = config_pb2.Route()
                    copy.CopyFrom(route)
                    routes.append(copy)
                mutate(routes)
                try:
                    validated = self._validated(routes, method)
                except ConfigError as err:
                    raise rejected(err) from None
                revision = StoredRevision(
                    live + 1, time.time(), who, summary, tuple(validated.routes)
                )
                entry = audit.entry(
                    who=who, method=method, revision=revision.number, summary=summary,
                    before=before, after=validated.routes,
                )  # fmt: skip
                # Stored before swapping: if the write fails, the live table has not moved.
                try:
                    await self._store.append(revision, entry, as_driver=as_driver)
                except StoreUnavailable as err:
                    self.metrics.store_up.set(0)
                    if err.outcome_unknown:
                        # Not swapped in here: if it lands, following the store serves it.
                        log.warning("revision %d by %s: outcome unknown (%s)", revision.number,
                                    who, err.reason)  # fmt: skip
                        raise OutcomeUnknown(self._store, err, revision, live) from None
                    raise unavailable(self._store, err) from None
                except Conflict as err:
                    # Another replica wrote first: catch up, then (unless the caller named the
                    # revision it expected) make the change again on the newer table.
                    try:
                        await self._sync_locked()
                    except StoreUnavailable as down:
                        raise unavailable(self._store, down) from None
                    if expected_revision:
                        raise stale(expected_revision, err.live) from None
                    continue
                self._swap(revision, validated)
                logs.audit_log.info(
                    "revision %d by %s: %s", revision.number, who, summary,
                    extra={"fields": {"audit": {"revision": revision.number, "who": who,
                                                "method": method, "summary": summary}}},
                )  # fmt: skip
                return revision
            raise GatewayError(
                grpc.StatusCode.ABORTED,
                f"the route table kept changing under this change ({_RETRIES} attempts); retry",
            )

    async def rollback(
        self, *, who: str, to_revision: int, expected_revision: int = 0
    ) -> StoredRevision:
        try:
            target = await self._store.get(to_revision)
        except StoreUnavailable as err:
            raise unavailable(self._store, err) from None
        if target is None:
            known = ", ".join(str(r.number) for r in (await self.history())[:20])
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND, f"no stored revision {to_revision} (stored: {known})"
            )

        def restore(routes: list[config_pb2.Route]) -> None:
            del routes[:]
            routes.extend(target.routes)

        return await self.change(
            who=who,
            method="Rollback",
            summary=f"rollback to revision {to_revision}",
            mutate=restore,
            expected_revision=expected_revision,
        )

    async def history(self) -> list[StoredRevision]:
        try:
            return await self._store.history()
        except StoreUnavailable as err:
            raise unavailable(self._store, err) from None

    # --- following the store ---------------------------------------------------------------------

    async def sync(self) -> None:
        """Serve the store's latest revision if it is newer than ours (and valid here)."""
        async with self._lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        latest = await self._store.latest()
        drained = await self._store.drained()
        self.metrics.store_up.set(1)
        for notify in self.on_drains:
            result = notify(drained)
            if asyncio.iscoroutine(result):
                await result
        if latest is None:
            return
        self._head = latest.number
        if latest.number <= self.revision.number:
            return
        try:
            validated = self._validated(latest.routes, f"stored revision {latest.number}")
        except ConfigError as err:
            self.metrics.rejected.inc()
            if latest.number != self._rejected:
                self._rejected = latest.number
                log.error("not serving %s: %s (keeping revision %d)", latest.number, err,
                          self.revision.number)  # fmt: skip
            return
        self._swap(latest, validated)
        log.info("serving revision %d (%s, by %s)", latest.number, latest.summary, latest.author)

    async def follow(self) -> None:
        """Until cancelled: apply what the store says, as it changes. Store outages are
        logged once and waited out; the last table keeps being served meanwhile."""
        down_since = None
        while True:
            try:
                async for _ in self._store.changes():
                    await self.sync()
                    if down_since is not None:
                        log.info("%s is back after %.1fs", self._store.description,
                                 time.monotonic() - down_since)  # fmt: skip
                        down_since = None
            except StoreUnavailable as err:
                self.metrics.store_up.set(0)
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("the revision store (%s) is unavailable: %s; serving revision "
                                "%d until it is back", self._store.description, err.reason,
                                self.revision.number)  # fmt: skip
                await asyncio.sleep(0.5)


def find_route(routes: list[config_pb2.Route], model: str) -> config_pb2.Route:
    for route in routes:
        if route.model == model:
            return route
    raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for model {shown(model)}")
