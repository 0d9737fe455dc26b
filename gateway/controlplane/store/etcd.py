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
import json
import logging
import time
from collections.abc import AsyncIterator

import aetcd
import grpc
from aetcd import exceptions as etcd_errors
from aetcd import rpc, watcher

from gateway.controlplane.store.base import (
    Conflict,
    NotDriver,
    StoredRevision,
    StoreUnavailable,
)
from gateway.controlplane.store.endpoints import grpc_target
from gateway.durations import seconds
from tensorgate.config.v1 import config_pb2
from tensorgate.store.v1 import store_pb2

log = logging.getLogger(__name__)

# A follower re-reads at least this often even if the watch stays quiet: a watch stream that
# died without an error (a half-open connection) cannot leave a replica behind for long.
RESYNC_S = 5.0
# Audit entries kept (the newest); revisions kept: admin.history.
AUDIT_KEPT = 10_000


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

    def read(path: str, field: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise OSError(f"{field}: cannot read {path}: {err.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(etcd.ca_file, "store.etcd.ca_file"),
        private_key=read(etcd.key_file, "store.etcd.key_file") if etcd.key_file else None,
        certificate_chain=read(etcd.cert_file, "store.etcd.cert_file") if etcd.cert_file else None,
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
        try:
            target = grpc_target(list(etcd.endpoints))
        except ValueError as err:  # check-config refuses these first; never a traceback
            raise OSError(str(err)) from None
        self._client = _Client(target, _credentials(etcd), self._timeout)
        self._lease: aetcd.leases.Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._renewer: asyncio.Task | None = None

    def _key(self, *parts: str) -> bytes:
        return "/".join((self._prefix, *parts)).encode()

    async def _call(self, coroutine):
        """Run one etcd read with the store's deadline; outages become StoreUnavailable."""
        try:
            return await asyncio.wait_for(coroutine, self._timeout)
        except (TimeoutError, etcd_errors.ClientError, grpc.aio.AioRpcError) as err:
            raise StoreUnavailable(_reason(err)) from None

    async def _write(self, make):
        """Run one etcd write (`make()` returns its coroutine) with the store's deadline.

        The write is only sent once the channel is connected: a store that cannot be reached
        within the deadline has been sent nothing (StoreUnavailable, outcome known). Once sent,
        only an answer from etcd settles it: a timeout or a dropped connection leaves the
        outcome unknown (measured with 3 members, the gateway on the leader and both followers
        killed: the transaction timed out after 2 s, and was committed when the followers came
        back), and StoreUnavailable says so (`outcome_unknown`). Refusals etcd answers with
        (request too large, NOSPACE, permission) change nothing."""
        deadline = time.monotonic() + self._timeout
        try:
            await asyncio.wait_for(self._connected(), self._timeout)
        except (TimeoutError, etcd_errors.ClientError, grpc.aio.AioRpcError) as err:
            raise StoreUnavailable(_reason(err)) from None
        remaining = max(0.05, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(make(), remaining)
        except (TimeoutError, etcd_errors.ClientError, grpc.aio.AioRpcError) as err:
            raise StoreUnavailable(_reason(err), outcome_unknown=not _refused(err)) from None

    async def _connected(self) -> None:
        """Until the channel is READY (gRPC sends nothing before that)."""
        await self._client.connect()
        channel = self._client.channel
        if channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            await channel.channel_ready()

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
        # A fence first: etcd applies its log in order, so once this put is applied every write
        # its leader accepted before (one whose sender timed out, say) has been applied too, or
        # is gone for good. A read alone is not enough: a leader serves a linearizable read at
        # its commit index, which need not include a write it accepted but had not committed.
        # So the history read by ListRevisions settles an unknown outcome (the CLI relies on it).
        await self._write(lambda: self._client.put(self._key("fence"), b""))
        found = await self._call(
            self._client.get_prefix(self._key("revisions", ""), sort_order="descend")
        )
        return [
            StoredRevision.from_proto(store_pb2.Revision.FromString(kv.value))
            for kv in list(found)[:limit]
        ]

    async def append(
        self, revision: StoredRevision, audit: store_pb2.AuditEntry, *, as_driver: str = ""
    ) -> None:
        tx = self._client.transactions
        head = self._key("state", "head")
        driver = self._key("driver")
        live = revision.number - 1
        compare = [tx.version(head) == 0] if live == 0 else [tx.value(head) == str(live)]
        if as_driver:
            # A driver's step lands only while it holds the lease, in the same transaction: a
            # deposed driver (or a second process that thinks it drives) cannot move weights.
            compare.append(tx.value(driver) == as_driver)
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
        succeeded, responses = await self._write(
            lambda: self._client.transaction(
                compare=compare, success=success, failure=[tx.get(head), tx.get(driver)]
            )
        )
        if not succeeded:
            current = responses[0] if responses else []
            holder = responses[1] if len(responses) > 1 else []
            live_now = int(current[0][0]) if current else 0
            deposed = not holder or holder[0][0] != as_driver.encode()
            if as_driver and live_now == live and deposed:
                raise NotDriver(as_driver)
            raise Conflict(live_now)

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
            await self._write(lambda: self._client.put(key, b"1"))
        else:
            await self._write(lambda: self._client.delete(key))

    async def rollouts(self) -> dict[str, store_pb2.RolloutRecord]:
        found = await self._call(self._client.get_prefix(self._key("rollouts", "")))
        records = (store_pb2.RolloutRecord.FromString(kv.value) for kv in found)
        return {r.rollout.model: r for r in records}

    async def put_rollout(self, record: store_pb2.RolloutRecord, *, as_driver: str = "") -> None:
        key = self._key("rollouts", record.rollout.model)
        value = record.SerializeToString()
        if not as_driver:
            await self._write(lambda: self._client.put(key, value))
            return
        tx = self._client.transactions
        succeeded, _ = await self._write(
            lambda: self._client.transaction(
                compare=[tx.value(self._key("driver")) == as_driver],
                success=[tx.put(key, value)],
                failure=[],
            )
        )
        if not succeeded:
            raise NotDriver(as_driver)  # the driver lease is someone else's now

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
                    raise StoreUnavailable(_reason(err))
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
    if isinstance(err, TimeoutError | etcd_errors.ConnectionTimeoutError):
        return "no answer in time"
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err) or type(err).__name__


# etcd's answers that mean "not applied" (the request never became a proposal): too large,
# out of space (NOSPACE), no permission, invalid. Anything else after sending (a deadline, a
# dropped connection, "request timed out", "leader changed") may still be applied.
_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


def _refused(err: BaseException) -> bool:
    cause = err if isinstance(err, grpc.aio.AioRpcError) else err.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() in _REFUSALS
