"""The embedded store: files in one directory, for one host.

routes.json holds the recent revisions (JSON of tensorgate.store.v1.Revision), rewritten with an
atomic replace (temp file, fsync, rename, fsync of the directory) so a crash leaves the old or
the new history, never half of one; audit.jsonl gets one line per change. Processes sharing the
directory (`serve --workers`) serialize writes with an exclusive lock on routes.lock, re-reading
the file inside it (compare-and-swap), and follow each other by polling the files' identity
(inode, size, mtime) every 0.2 s. The rollout driver is whoever holds driver.lock; the kernel
releases it when that process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator

from google.protobuf import json_format

from gateway.controlplane.store.base import Conflict, NotDriver, StoredRevision
from tensorgate.config.v1 import config_pb2
from tensorgate.store.v1 import store_pb2

POLL_S = 0.2
COUNTS_MAX_AGE_S = 15.0


def _encode(revision: StoredRevision) -> dict:
    return {
        "number": revision.number,
        "created_at": revision.created_at,
        "author": revision.author,
        "summary": revision.summary,
        "routes": [
            json_format.MessageToDict(r, preserving_proto_field_name=True) for r in revision.routes
        ],
    }


def _decode(data: dict) -> StoredRevision:
    return StoredRevision(
        number=int(data["number"]),
        created_at=float(data["created_at"]),
        author=str(data["author"]),
        summary=str(data["summary"]),
        routes=tuple(json_format.ParseDict(r, config_pb2.Route()) for r in data["routes"]),
    )


def write_atomically(path: pathlib.Path, payload: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def audit_line(entry: store_pb2.AuditEntry) -> dict:
    """An audit entry as one JSON line for log collectors (revision as a number)."""
    return {
        "time": entry.time.ToJsonString(),
        "who": entry.who,
        "method": entry.method,
        "revision": entry.revision,
        "summary": entry.summary,
        "diff": entry.diff,
    }


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _identity(path: pathlib.Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FileStore:
    def __init__(self, directory: str | pathlib.Path, keep: int = 100) -> None:
        self.directory = pathlib.Path(directory)
        self.path = self.directory / "routes.json"
        self.description = f"file store {self.directory}"
        self._keep = max(2, keep)
        self._driver_lock = None  # the open file whose flock makes this process the driver

    # --- revisions -----------------------------------------------------------------------------

    def _read(self) -> list[StoredRevision]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        return [_decode(r) for r in data["revisions"]]

    async def latest(self) -> StoredRevision | None:
        revisions = self._read()
        return revisions[0] if revisions else None

    async def get(self, number: int) -> StoredRevision | None:
        return next((r for r in self._read() if r.number == number), None)

    async def history(self, limit: int = 100) -> list[StoredRevision]:
        return self._read()[:limit]

    async def append(
        self, revision: StoredRevision, audit: store_pb2.AuditEntry, *, as_driver: str = ""
    ) -> None:
        if as_driver and self._driver_lock is None:
            raise NotDriver(as_driver)  # this process does not hold driver.lock
        await asyncio.to_thread(self._append, revision, audit)

    def _append(self, revision: StoredRevision, audit: store_pb2.AuditEntry) -> None:
        with _locked(self.directory / "routes.lock"):
            revisions = self._read()
            live = revisions[0].number if revisions else 0
            if revision.number != live + 1:
                raise Conflict(live)
            revisions = [revision, *revisions][: self._keep]
            payload = json.dumps({"revisions": [_encode(r) for r in revisions]}, indent=1)
            write_atomically(self.path, payload)
            line = audit_line(audit)
            with open(self.directory / "audit.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())

    async def audit(self, limit: int = 100) -> list[store_pb2.AuditEntry]:
        try:
            lines = (self.directory / "audit.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in reversed(lines[-limit:]):
            entries.append(json_format.ParseDict(json.loads(line), store_pb2.AuditEntry(), True))
        return entries

    # --- drains and rollouts ---------------------------------------------------------------------

    async def drained(self) -> frozenset[str]:
        try:
            data = json.loads((self.directory / "drains.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return frozenset()
        return frozenset(data["drained"])

    async def set_drained(self, backend: str, drained: bool) -> None:
        with _locked(self.directory / "drains.lock"):
            names = set(await self.drained())
            names.add(backend) if drained else names.discard(backend)
            write_atomically(self.directory / "drains.json", json.dumps({"drained": sorted(names)}))

    async def rollouts(self) -> dict[str, store_pb2.RolloutRecord]:
        try:
            data = json.loads((self.directory / "rollouts.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {
            model: json_format.ParseDict(record, store_pb2.RolloutRecord())
            for model, record in data.items()
        }

    async def put_rollout(self, record: store_pb2.RolloutRecord, *, as_driver: str = "") -> None:
        if as_driver and self._driver_lock is None:
            raise NotDriver(as_driver)  # this process does not hold driver.lock
        with _locked(self.directory / "rollouts.lock"):
            records = await self.rollouts()
            records[record.rollout.model] = record
            payload = {
                model: json_format.MessageToDict(r, preserving_proto_field_name=True)
                for model, r in records.items()
            }
            write_atomically(self.directory / "rollouts.json", json.dumps(payload, indent=1))

    # --- coordination ----------------------------------------------------------------------------

    async def publish_counts(self, counts: store_pb2.ReplicaCounts) -> None:
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in counts.replica)
        path = self.directory / "counts" / f"{name}.pb"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(counts.SerializeToString())
        os.replace(tmp, path)  # no fsync: counts are rebuilt within a second after a crash

    async def replica_counts(self) -> list[store_pb2.ReplicaCounts]:
        out = []
        cutoff = time.time() - COUNTS_MAX_AGE_S
        for path in sorted((self.directory / "counts").glob("*.pb")):
            try:
                if path.stat().st_mtime < cutoff:
                    continue  # a process that stopped publishing: gone
                out.append(store_pb2.ReplicaCounts.FromString(path.read_bytes()))
            except (FileNotFoundError, ValueError):
                continue
        return out

    async def try_drive(self, replica: str) -> bool:
        if self._driver_lock is not None:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "driver.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._driver_lock = fd  # held (open, locked) while this process drives
        return True

    async def changes(self) -> AsyncIterator[None]:
        names = ("routes.json", "drains.json", "rollouts.json")
        seen = None
        while True:
            current = tuple(_identity(self.directory / n) for n in names)
            if current != seen:
                seen = current
                yield
            await asyncio.sleep(POLL_S)

    async def close(self) -> None:
        if self._driver_lock is not None:
            os.close(self._driver_lock)
            self._driver_lock = None
