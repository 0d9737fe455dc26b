"""Writing a rollout's original weights back (a rollback or an abort) and clearing its
`restore_pending` mark once they are (docs/reliability.md, Findings 3)."""

from __future__ import annotations

import contextlib

from gateway.controlplane.admin.routes import RouteManager, find_route
from gateway.controlplane.store.base import Conflict, NotDriver, RevisionStore, StoreUnavailable
from tensorgate.store.v1 import store_pb2


class Deposed(Exception):
    """This replica no longer holds the driver lease."""


async def restore_weights(
    routes: RouteManager,
    record: store_pb2.RolloutRecord,
    who: str,
    *,
    as_driver: str = "",
    why: str = "",
) -> None:
    """The weights from before the rollout, as a new revision; with `as_driver` only while
    this process holds the lease (Deposed otherwise). With `why`, the revision is written
    (with it in its summary) even when the weights are already restored, so the audit log
    says why a rollout ended before traffic moved."""
    original = dict(record.original_weights)
    route = find_route(routes.routes(), record.rollout.model)
    if not why and all(original.get(v.name, v.weight) == v.weight for v in route.variants):
        record.rollout.percent = 0
        return  # already restored (by the replica that aborted, or a previous driver)

    def mutate(routes) -> None:
        route = find_route(routes, record.rollout.model)
        for variant in route.variants:
            if variant.name in original:
                variant.weight = original[variant.name]

    try:
        await routes.change(
            who=f"rollout:{who}",
            method="Rollout",
            summary=f"rollout {record.rollout.model}: {record.rollout.canary} rolled back"
            + (f": {why}" if why else ""),
            mutate=mutate,
            as_driver=as_driver,
        )
    except NotDriver:
        raise Deposed from None
    record.rollout.percent = 0


async def clear_pending(
    store: RevisionStore, record: store_pb2.RolloutRecord, *, as_driver: str
) -> None:
    """Clears restore_pending. Best effort: left set, the next driver's restore finds the
    weights back (no new revision) and clears it then."""
    record.restore_pending = False
    with contextlib.suppress(NotDriver, Conflict, StoreUnavailable):
        await store.put_rollout(record, as_driver=as_driver)
