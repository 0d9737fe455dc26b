"""The shared store: etcd v3, one route table for every replica.

Keys under the configured prefix P (values are tensorgate.store.v1 messages):

    P/state/head               number of the live revision (ASCII): the compare-and-swap key
    P/state/drains/<backend>   present while the backend is drained
    P/revisions/<n, 20 digits> Revision n (the newest `keep` are kept)
    P/audit/<n, 20 digits>     AuditEntry of revision n (written in the same transaction)
    P/rollouts/<model>         RolloutRecord
    P/driver                   name of the replica driving rollouts (attached to its lease)
    P/counts/<replica>         ReplicaCounts (attached to its lease)

A revision is appended by one transaction: if head is still what the writer read, put head,
the revision and its audit entry (and drop the oldest kept revision); else nothing is written
and the writer gets Conflict with the live number. Followers watch P/state/ from the revision
they last read; after an outage or a compaction they read the latest state again, which is all
a level-triggered follower needs. Each process holds one lease (TTL store.etcd.lease_ttl),
renewed every third of it; its driver key and counts disappear when it stops renewing.

The client is aetcd (asyncio, etcd's own API protos), with the channel made here: aetcd
connects in plaintext to one host, and this store also needs TLS with client certificates and
several endpoints (gRPC's pick_first over an address list fails over between members).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator

import aetcd
import grpc
from aetcd import exceptions as etcd_errors
from aetcd import rpc, watcher

from gateway.controlplane.store.base import Conflict, StoredRevision, StoreUnavailable
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2
from tensorgate.store.v1 import store_pb2

log = logging.getLogger(__name__)

# A follower re-reads at least this often even if the watch stays quiet: a watch stream that
# died without an error (a half-open connection) cannot leave a replica behind for long.
RESYNC_S = 5.0
# Audit entries kept (the newest); revisions kept: admin.history.
AUDIT_KEPT = 10_000


def _target(endpoints: list[str]) -> str:
    """One gRPC target for the endpoints: a host name as is, several IPs as an address list."""
    if len(endpoints) == 1:
        return endpoints[0]
    hosts = []
    for endpoint in endpoints:
        host = endpoint.rpartition(":")[0].strip("[]")
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            raise ValueError(
                f"store.etcd.endpoints: several endpoints must be IP addresses ({endpoint!r} "
                "is not); give one host name (a Service, a load balancer) instead"
            ) from None
        hosts.append((version, endpoint))
    scheme = "ipv6" if any(v == 6 for v, _ in hosts) else "ipv4"
    return f"{scheme}:" + ",".join(e for _, e in hosts)


class _Client(aetcd.Client):
    """aetcd's client on a channel that can be TLS and span several endpoints."""

    def __init__(self, target: str, credentials, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._target = target
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = [
            # Notice a hung etcd under a quiet watch stream (else it stays silent forever); etcd
            # answers pings more often than every 5 s with GOAWAY "too_many_pings".
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 3_000),
            ("grpc.http2.ping_timeout_ms", 3_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # Back within a second of etcd (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1_000),
            # A call made while the connection is down waits for it (up to the store's
            # deadline) instead of failing at once: right after etcd comes back, writes work.
            (
                "grpc.service_config",
                json.dumps({"methodConfig": [{"name": [{}], "waitForReady": True}]}),
            ),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        if self._credentials is not None:
            self.channel = grpc.aio.secure_channel(self._target, self._credentials, options)
        else:
            self.channel = grpc.aio.insecure_channel(self._target, options)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout)
        self._connected.set()


def _credentials(etcd: config_pb2.EtcdStore):
    if not etcd.ca_file:
        return None

    def read(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise OSError(f"store.etcd: cannot read {path}: {err.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(etcd.ca_file),
        private_key=read(etcd.key_file) if etcd.key_file else None,
        certificate_chain=read(etcd.cert_file) if etcd.cert_file else None,
    )


def _number_key(number: int) -> str:
    return f"{number:020d}"


class EtcdStore:
    def __init__(self, etcd: config_pb2.EtcdStore, *, replica: str, keep: int = 100) -> None:
        self._prefix = etcd.prefix
        self._keep = max(2, keep)
        self._ttl = max(2, round(seconds(etcd.lease_ttl)))
        self._timeout = seconds(etcd.timeout)
        self.replica = replica
        self.description = f"etcd {','.join(etcd.endpoints)} {etcd.prefix}"
        self._client = _Client(_target(list(etcd.endpoints)), _credentials(etcd), self._timeout)
        self._lease: aetcd.leases.Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._renewer: asyncio.Task | None = None

    def _key(self, *parts: str) -> bytes:
        return "/".join((self._prefix, *parts)).encode()

    async def _call(self, coroutine):
        """Run one etcd call with the store's deadline; outages become StoreUnavailable."""
        try:
            return await asyncio.wait_for(coroutine, self._timeout)
        except (TimeoutError, etcd_errors.ClientError, grpc.aio.AioRpcError) as err:
            # Down, hung, full (NOSPACE), a request over its size limit, no permission: the
            # write did not happen, and the message says why.
            raise StoreUnavailable(f"{self.description}: {_reason(err)}") from None

    # --- revisions -------------------------------------------------------------------------------

    async def latest(self) -> StoredRevision | None:
        head = await self._call(self._client.get(self._key("state", "head")))
        if head is None:
            return None
        return await self.get(int(head.value))

    async def get(self, number: int) -> StoredRevision | None:
        found = await self._call(self._client.get(self._key("revisions", _number_key(number))))
        if found is None:
            return None
        return StoredRevision.from_proto(store_pb2.Revision.FromString(found.value))

    async def history(self, limit: int = 100) -> list[StoredRevision]:
        found = await self._call(
            self._client.get_prefix(self._key("revisions", ""), sort_order="descend")
        )
        return [
            StoredRevision.from_proto(store_pb2.Revision.FromString(kv.value))
            for kv in list(found)[:limit]
        ]

    async def append(self, revision: StoredRevision, audit: store_pb2.AuditEntry) -> None:
        tx = self._client.transactions
        head = self._key("state", "head")
        live = revision.number - 1
        compare = [tx.version(head) == 0] if live == 0 else [tx.value(head) == str(live)]
        success = [
            tx.put(head, str(revision.number).encode()),
            tx.put(
                self._key("revisions", _number_key(revision.number)),
                revision.to_proto().SerializeToString(),
            ),
            tx.put(self._key("audit", _number_key(revision.number)), audit.SerializeToString()),
        ]
        if revision.number > self._keep:
            dropped = _number_key(revision.number - self._keep)
            success.append(tx.delete(self._key("revisions", dropped)))
        if revision.number > AUDIT_KEPT:  # the audit trail outlives revisions, but not forever
            dropped = _number_key(revision.number - AUDIT_KEPT)
            success.append(tx.delete(self._key("audit", dropped)))
        succeeded, responses = await self._call(
            self._client.transaction(compare=compare, success=success, failure=[tx.get(head)])
        )
        if not succeeded:
            current = responses[0] if responses else []
            raise Conflict(int(current[0][0]) if current else 0)

    async def audit(self, limit: int = 100) -> list[store_pb2.AuditEntry]:
        prefix = self._key("audit", "")
        found = await self._call(self._client.get_prefix(prefix, sort_order="descend"))
        return [store_pb2.AuditEntry.FromString(kv.value) for kv in list(found)[:limit]]

    # --- drains and rollouts ---------------------------------------------------------------------

    async def drained(self) -> frozenset[str]:
        prefix = self._key("state", "drains", "")
        found = await self._call(self._client.get_prefix(prefix))
        return frozenset(kv.key[len(prefix) :].decode() for kv in found)

    async def set_drained(self, backend: str, drained: bool) -> None:
        key = self._key("state", "drains", backend)
        if drained:
            await self._call(self._client.put(key, b"1"))
        else:
            await self._call(self._client.delete(key))

    async def rollouts(self) -> dict[str, store_pb2.RolloutRecord]:
        found = await self._call(self._client.get_prefix(self._key("rollouts", "")))
        records = (store_pb2.RolloutRecord.FromString(kv.value) for kv in found)
        return {r.rollout.model: r for r in records}

    async def put_rollout(self, record: store_pb2.RolloutRecord, *, as_driver: str = "") -> None:
        key = self._key("rollouts", record.rollout.model)
        value = record.SerializeToString()
        if not as_driver:
            await self._call(self._client.put(key, value))
            return
        tx = self._client.transactions
        succeeded, _ = await self._call(
            self._client.transaction(
                compare=[tx.value(self._key("driver")) == as_driver],
                success=[tx.put(key, value)],
                failure=[],
            )
        )
        if not succeeded:
            raise Conflict(0)  # the driver lease is someone else's now

    # --- leases: driver and counts ---------------------------------------------------------------

    async def _lease_id(self) -> int:
        async with self._lease_lock:
            if self._lease is None:
                self._lease = await self._call(self._client.lease(self._ttl))
                if self._renewer is None or self._renewer.done():
                    self._renewer = asyncio.create_task(self._renew(), name="etcd-lease")
            return self._lease.id

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            lease = self._lease
            if lease is None:
                continue
            try:
                reply = await self._call(self._client.refresh_lease(lease.id))
            except StoreUnavailable:
                continue
            if reply is None or reply.TTL <= 0:
                # Expired (the store was away longer than the TTL): what hung on it is gone;
                # the next publish or election attaches to a new lease.
                log.warning("%s: lease of %s expired; taking a new one", self.description,
                            self.replica)  # fmt: skip
                self._lease = None

    async def publish_counts(self, counts: store_pb2.ReplicaCounts) -> None:
        lease = await self._lease_id()
        await self._call(
            self._client.put(
                self._key("counts", counts.replica), counts.SerializeToString(), lease=lease
            )
        )

    async def replica_counts(self) -> list[store_pb2.ReplicaCounts]:
        found = await self._call(self._client.get_prefix(self._key("counts", "")))
        return [store_pb2.ReplicaCounts.FromString(kv.value) for kv in found]

    async def try_drive(self, replica: str) -> bool:
        lease = await self._lease_id()
        tx = self._client.transactions
        key = self._key("driver")
        succeeded, responses = await self._call(
            self._client.transaction(
                compare=[tx.version(key) == 0],
                success=[tx.put(key, replica.encode(), lease)],
                failure=[tx.get(key)],
            )
        )
        if succeeded:
            return True
        current = responses[0] if responses else []
        return bool(current) and current[0][0] == replica.encode()

    # --- following -------------------------------------------------------------------------------

    async def changes(self) -> AsyncIterator[None]:
        prefix = self._key("state", "")
        state = await self._call(self._client.get_prefix(prefix, keys_only=True))
        revision = state.header.revision
        changed = asyncio.Event()
        failure: list[BaseException] = []

        watches = []

        async def pump(start: int) -> None:
            nonlocal revision
            try:
                watch = await self._client.watch_prefix(prefix, start_revision=start)
                watches.append(watch)
                async for event in watch:
                    revision = max(revision, event.kv.mod_revision)
                    changed.set()
            except Exception as err:  # the caller turns it into StoreUnavailable
                failure.append(err)
                changed.set()

        yield  # the caller reads the state once: everything up to `revision` is in it
        task = asyncio.create_task(pump(revision + 1), name="etcd-watch")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), RESYNC_S)
                changed.clear()
                if failure:
                    err = failure[0]
                    if isinstance(err, etcd_errors.RevisionCompactedError):
                        # Missed events were compacted away: read everything again, then watch
                        # from now.
                        log.info("%s: watch compacted at %d; re-reading", self.description,
                                 err.compacted_revision)  # fmt: skip
                    raise StoreUnavailable(f"{self.description}: {_reason(err)}")
                yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            for watch in watches:  # leaving the loop does not end the watch on the server
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(watch.cancel(), 1.0)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        lease, self._lease = self._lease, None
        if lease is not None:
            # Give up the driver lease and the counts now rather than after the TTL.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(lease.id), 1.0)
        with contextlib.suppress(Exception):
            await self._client.close()


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "no answer in time"
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err) or type(err).__name__
