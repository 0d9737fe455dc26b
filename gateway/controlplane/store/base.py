"""What every revision store offers, and the records it keeps.

A store holds the route table's revisions (with their audit entries), the drained backends and
the rollouts, as the protobuf messages of tensorgate.store.v1. Writes of a revision are
compare-and-swap: `append` succeeds only on top of the revision the writer read, so two writers
(two tasks, two workers, two replicas) can never both win. Readers follow changes through
`changes()`, a level-triggered signal: each item means "re-read", so a follower that was away
(a store outage, a compacted watch) only has to read the latest state again to catch up.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import timestamp_pb2

from tensorgate.config.v1 import config_pb2
from tensorgate.store.v1 import store_pb2


class StoreUnavailable(Exception):
    """The store did not answer. `reason` says why (never credentials); callers name the store
    (its `description`) themselves, once.

    `outcome_unknown`: a write was sent and then got no answer (a timeout, a dropped
    connection). It may still have been applied, or be applied when the store recovers (etcd
    commits a proposal its leader accepted once a quorum is back): the caller must not say
    "nothing was changed". False means the store refused the write, or it was never sent."""

    def __init__(self, reason: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome_unknown = outcome_unknown


class NotDriver(Exception):
    """A driver's write was refused: this process no longer holds the driver lease."""


class Conflict(Exception):
    """Another writer got there first: the live revision is `live`."""

    def __init__(self, live: int) -> None:
        super().__init__(f"the live revision is {live}")
        self.live = live


@dataclass(frozen=True)
class StoredRevision:
    number: int
    created_at: float  # unix seconds
    author: str
    summary: str
    routes: tuple[config_pb2.Route, ...]

    def to_proto(self) -> store_pb2.Revision:
        message = store_pb2.Revision(
            number=self.number, author=self.author, summary=self.summary, routes=self.routes
        )
        message.created_at.FromNanoseconds(int(self.created_at * 1e9))
        return message

    @classmethod
    def from_proto(cls, message: store_pb2.Revision) -> StoredRevision:
        return cls(
            number=message.number,
            created_at=message.created_at.ToNanoseconds() / 1e9,
            author=message.author,
            summary=message.summary,
            routes=tuple(message.routes),
        )


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


class RevisionStore(Protocol):
    """Async, so a network store (etcd) and the file store look the same to the gateway."""

    description: str  # for messages and logs: kind and where, never credentials

    async def latest(self) -> StoredRevision | None: ...

    async def get(self, number: int) -> StoredRevision | None: ...

    async def history(self, limit: int = 100) -> list[StoredRevision]:
        """Newest first."""
        ...

    async def append(
        self, revision: StoredRevision, audit: store_pb2.AuditEntry, *, as_driver: str = ""
    ) -> None:
        """Store `revision` (number = live + 1) and its audit entry together; Conflict when the
        live revision is not revision.number - 1. With `as_driver`, only while that identity
        holds the driver lease, checked in the same transaction (NotDriver otherwise)."""
        ...

    async def audit(self, limit: int = 100) -> list[store_pb2.AuditEntry]:
        """Newest first."""
        ...

    async def drained(self) -> frozenset[str]: ...

    async def set_drained(self, backend: str, drained: bool) -> None: ...

    async def rollouts(self) -> dict[str, store_pb2.RolloutRecord]: ...

    async def put_rollout(self, record: store_pb2.RolloutRecord, *, as_driver: str = "") -> None:
        """Write a rollout record; with `as_driver`, only while that replica still holds the
        driver lease (StoreUnavailable or NotDriver otherwise), so a deposed driver cannot
        overwrite its successor's progress."""
        ...

    async def publish_counts(self, counts: store_pb2.ReplicaCounts) -> None:
        """This replica's per-variant counters, kept while it lives (lease or file age)."""
        ...

    async def replica_counts(self) -> list[store_pb2.ReplicaCounts]: ...

    async def try_drive(self, replica: str) -> bool:
        """Become, or stay, the one replica that drives rollouts; False while another live one
        is. Called periodically: holding it needs renewing within the lease TTL (etcd), or the
        process alive (file lock)."""
        ...

    def changes(self) -> AsyncIterator[None]:
        """Yields once at start and then whenever something may have changed (revisions, drains,
        rollouts), including after the store comes back from an outage."""
        ...

    async def close(self) -> None: ...
