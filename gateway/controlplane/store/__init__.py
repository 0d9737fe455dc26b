"""Revision stores: where the route table's revisions, audit entries, drains and rollouts live.

`file` (gateway/controlplane/store/file.py) is the embedded default for one host; `etcd`
(gateway/controlplane/store/etcd.py) shares one table between every replica. Both keep the messages
of tensorgate.store.v1 and implement gateway/controlplane/store/base.py's RevisionStore.
"""

from __future__ import annotations

from gateway.controlplane.store.base import (
    Conflict,
    NotDriver,
    RevisionStore,
    StoredRevision,
    StoreUnavailable,
)
from tensorgate.config.v1 import config_pb2


def open_store(config: config_pb2.GatewayConfig, state_dir: str, replica: str) -> RevisionStore:
    """The store `config.store` names (validated and defaulted)."""
    keep = config.admin.history or 100
    if config.store.HasField("etcd"):
        from gateway.controlplane.store.etcd import EtcdStore

        return EtcdStore(config.store.etcd, replica=replica, keep=keep)
    from gateway.controlplane.store.file import FileStore

    return FileStore(state_dir, keep=keep)


__all__ = [
    "Conflict",
    "NotDriver",
    "RevisionStore",
    "StoreUnavailable",
    "StoredRevision",
    "open_store",
]
