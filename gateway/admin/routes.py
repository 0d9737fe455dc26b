"""The live route table as a sequence of revisions: every accepted change is validated whole,
persisted, audited, then swapped in atomically. A rejected change leaves everything as it was."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from gateway.admin.audit import AuditLog
from gateway.admin.store import RevisionStore, StoredRevision
from gateway.config import ConfigError, validate
from gateway.errors import GatewayError, shown
from tensorgate.config.v1 import config_pb2


def stale(expected: int, live: int) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.ABORTED,
        f"expected revision {expected}, but the live revision is {live}: re-read and retry",
    )


class RouteManager:
    def __init__(self, runtime, store: RevisionStore, audit: AuditLog) -> None:
        self._runtime = runtime
        self._store = store
        self._audit = audit
        self._lock = asyncio.Lock()
        # Called with each newly applied config (e.g. the xDS control plane pushes it to Envoys).
        self.on_change: list[Callable[[config_pb2.GatewayConfig], None]] = []
        self.revision: StoredRevision = self._boot()

    def _boot(self) -> StoredRevision:
        """Serve the store's last revision if there is one (validated against this config's
        backends and defaults), else record the boot file's routes as revision 1."""
        latest = self._store.latest()
        config = self._runtime.config
        if latest is None:
            first = StoredRevision(
                1, time.time(), "boot", "routes from the config file", tuple(config.routes)
            )
            self._store.append(first)
            return first
        candidate = config_pb2.GatewayConfig()
        candidate.CopyFrom(config)
        del candidate.routes[:]
        candidate.routes.extend(latest.routes)
        # A stored table that no longer fits this config (a backend removed, say) stops start-up
        # with ConfigError naming the revision: better than silently serving the boot file.
        validated = validate(candidate, source=f"stored revision {latest.number}")
        self._runtime.apply(validated)
        return latest

    def routes(self) -> list[config_pb2.Route]:
        return list(self._runtime.config.routes)

    async def change(
        self,
        *,
        who: str,
        method: str,
        summary: str,
        mutate: Callable[[list[config_pb2.Route]], None],
        expected_revision: int = 0,
    ) -> StoredRevision:
        async with self._lock:
            live = self.revision.number
            if expected_revision and expected_revision != live:
                raise stale(expected_revision, live)
            before = self.routes()
            routes = []
            for route in before:
                copy = config_pb2.Route()
                copy.CopyFrom(route)
                routes.append(copy)
            mutate(routes)
            candidate = config_pb2.GatewayConfig()
            candidate.CopyFrom(self._runtime.config)
            del candidate.routes[:]
            candidate.routes.extend(routes)
            try:
                validated = validate(candidate, source=method)
            except ConfigError as err:
                reasons = "; ".join(str(p) for p in err.problems)
                raise GatewayError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"change rejected: {reasons}"
                ) from None
            revision = StoredRevision(live + 1, time.time(), who, summary, tuple(validated.routes))
            # Persist before swapping: if the write fails, the live table has not moved.
            self._store.append(revision)
            self._runtime.apply(validated)
            self.revision = revision
            for notify in self.on_change:
                notify(self._runtime.config)
            self._audit.record(
                who=who, method=method, revision=revision.number, summary=summary,
                before=before, after=validated.routes,
            )  # fmt: skip
            return revision

    async def rollback(
        self, *, who: str, to_revision: int, expected_revision: int = 0
    ) -> StoredRevision:
        target = self._store.get(to_revision)
        if target is None:
            known = ", ".join(str(r.number) for r in self._store.history()[:20])
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

    def history(self) -> list[StoredRevision]:
        return self._store.history()


def find_route(routes: list[config_pb2.Route], model: str) -> config_pb2.Route:
    for route in routes:
        if route.model == model:
            return route
    raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for model {shown(model)}")
