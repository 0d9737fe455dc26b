"""The embedded job queue: one SQLite file in WAL mode (the standard library's sqlite3), shared by
the processes of one host (`serve --workers`), so `scripts/demo` needs nothing new.

The same semantics as the Redis queue: a consumer takes a job with a lease (`lease_until`) it
renews while the call runs; a job whose lease runs out (its consumer was killed or hung) is taken
again by any consumer, up to max_deliveries, then dead-lettered with the reason. Every write is
one `BEGIN IMMEDIATE` transaction guarded by the job's state and consumer, so a result is
written once: a consumer that lost its lease cannot overwrite what the next one wrote. sqlite3
blocks, so every operation runs in a thread (asyncio.to_thread) on one connection, serialized
by a lock (SQLite serializes writers anyway)."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import threading
import time

from gateway.jobs.records import (
    CANCELLED,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    Job,
    QueueUnavailable,
    QuotaExceeded,
    dead_letter_reason,
)

_COLUMNS = (
    "id", "owner", "groups", "model", "version", "priority", "idempotency_key", "submitted",
    "deadline", "result_ttl", "request", "state", "started", "finished", "expires", "deliveries",
    "result", "error_code", "error_message", "dead_letter",
)  # fmt: skip
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, groups TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT NOT NULL, priority INTEGER NOT NULL, idempotency_key TEXT NOT NULL,
    submitted REAL NOT NULL, deadline REAL NOT NULL, result_ttl REAL NOT NULL,
    request BLOB NOT NULL, state INTEGER NOT NULL, started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0, expires REAL NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0, result BLOB NOT NULL DEFAULT x'',
    error_code INTEGER NOT NULL DEFAULT 0, error_message TEXT NOT NULL DEFAULT '',
    dead_letter TEXT NOT NULL DEFAULT '', consumer TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (owner, idempotency_key)
    WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, priority DESC, submitted);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, submitted DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires) WHERE expires > 0;
"""


def _job(row) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["groups"] = tuple(g for g in values["groups"].split("\n") if g)
    values["request"] = bytes(values["request"])
    values["result"] = bytes(values["result"])
    return Job(**values)


class SqliteQueue:
    def __init__(self, path: str, name: str) -> None:
        self.name = name  # "job queue (sqlite PATH)": how errors name it
        try:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE takes the write lock
            # at once, so two processes never both read "free" and then both write).
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                       check_same_thread=False)  # fmt: skip
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise OSError(f"jobs: cannot open the embedded job queue {path}: {err}") from None
        self._lock = threading.Lock()

    async def _run(self, fn, *args):
        try:
            return await asyncio.to_thread(self._locked, fn, *args)
        except sqlite3.Error as err:
            raise QueueUnavailable(f"{self.name}: {err}") from None

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def _write(self, fn, *args):
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    def _one(self, db, job_id: str) -> Job | None:
        row = db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _job(row)
        return None if job.expires and job.expires <= time.time() else job

    # --- the API's operations -------------------------------------------------------------

    async def submit(self, job: Job, max_jobs: int, max_bytes: int) -> tuple[Job, bool]:
        return await self._run(self._write, self._submit, job, max_jobs, max_bytes)

    def _submit(self, db, job: Job, max_jobs: int, max_bytes: int) -> tuple[Job, bool]:
        if job.idempotency_key:
            row = db.execute(
                f"{_SELECT} WHERE owner = ? AND idempotency_key = ?",
                (job.owner, job.idempotency_key),
            ).fetchone()
            if row is not None:
                found = _job(row)
                if not (found.expires and found.expires <= time.time()):
                    return found, False
                db.execute("DELETE FROM jobs WHERE id = ?", (found.id,))
        count, used = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(request)), 0) FROM jobs "
            "WHERE model = ? AND state IN (?, ?)",
            (job.model, QUEUED, RUNNING),
        ).fetchone()
        if count + 1 > max_jobs:
            raise QuotaExceeded("jobs.max_queued_jobs_per_model", max_jobs, count)
        if used + job.payload_bytes > max_bytes:
            raise QuotaExceeded("jobs.max_queued_bytes_per_model", max_bytes, used)
        db.execute(
            "INSERT INTO jobs (id, owner, groups, model, version, priority, idempotency_key, "
            "submitted, deadline, result_ttl, request, state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (job.id, job.owner, "\n".join(job.groups), job.model, job.version, job.priority,
             job.idempotency_key, job.submitted, job.deadline, job.result_ttl, job.request,
             QUEUED),
        )  # fmt: skip
        return job, True

    async def get(self, job_id: str) -> Job | None:
        return await self._run(self._one, self._db, job_id)

    async def cancel(self, job_id: str) -> Job | None:
        return await self._run(self._write, self._cancel, job_id)

    def _cancel(self, db, job_id: str) -> Job | None:
        now = time.time()
        db.execute(
            "UPDATE jobs SET state = ?, finished = ?, expires = ? + result_ttl, consumer = '', "
            "error_message = 'cancelled by the caller', error_code = 1 "
            "WHERE id = ? AND state IN (?, ?)",
            (CANCELLED, now, now, job_id, QUEUED, RUNNING),
        )
        return self._one(db, job_id)

    async def list(
        self, owner: str, model: str, state: int, after: tuple[float, str] | None, limit: int
    ) -> list[Job]:
        where, args = ["owner = ?", "(expires = 0 OR expires > ?)"], [owner, time.time()]
        if model:
            where.append("model = ?")
            args.append(model)
        if state:
            where.append("state = ?")
            args.append(state)
        if after is not None:
            where.append("(submitted < ? OR (submitted = ? AND id < ?))")
            args += [after[0], after[0], after[1]]
        sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY submitted DESC, id DESC LIMIT ?"
        rows = await self._run(lambda: self._db.execute(sql, (*args, limit)).fetchall())
        return [_job(r) for r in rows]

    # --- the consumers' operations --------------------------------------------------------

    async def claim(self, consumer: str, visibility: float, max_deliveries: int):
        """The next job to run, as ("run", job); or a job that was due and is now settled, as
        ("expired", job) or ("dead", job); or None when nothing is due."""
        return await self._run(self._write, self._claim, consumer, visibility, max_deliveries)

    def _claim(self, db, consumer: str, visibility: float, max_deliveries: int):
        now = time.time()
        row = db.execute(
            f"{_SELECT} WHERE (state = ? OR state = ?) AND lease_until <= ? "
            "ORDER BY priority DESC, submitted LIMIT 1",
            (QUEUED, RUNNING, now),
        ).fetchone()
        if row is None:
            return None
        job = _job(row)
        if job.deadline <= now:
            self._settle(db, job.id, EXPIRED, now, code=4,
                         message="the job's deadline passed before it finished")  # fmt: skip
            return "expired", self._one(db, job.id)
        if job.deliveries >= max_deliveries:
            self._settle(db, job.id, FAILED, now, code=job.error_code or 14,
                         message=job.error_message or "its consumer stopped before finishing",
                         dead_letter=dead_letter_reason(job))  # fmt: skip
            return "dead", self._one(db, job.id)
        db.execute(
            "UPDATE jobs SET state = ?, consumer = ?, lease_until = ?, deliveries = deliveries + 1,"
            " started = CASE WHEN started = 0 THEN ? ELSE started END WHERE id = ?",
            (RUNNING, consumer, now + visibility, now, job.id),
        )
        return "run", self._one(db, job.id)

    def _settle(self, db, job_id, state, now, *, code=0, message="", result=b"", dead_letter=""):
        db.execute(
            "UPDATE jobs SET state = ?, finished = ?, expires = ? + result_ttl, consumer = '', "
            "result = ?, error_code = ?, error_message = ?, dead_letter = ?, request = x'' "
            "WHERE id = ?",
            (state, now, now, result, code, message, dead_letter, job_id),
        )

    async def renew(self, job_id: str, consumer: str, visibility: float) -> bool:
        """Extend the lease; False when the job is no longer this consumer's (cancelled, or
        taken by another after the lease ran out)."""

        def renew(db):
            cursor = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND consumer = ? AND state = ?",
                (time.time() + visibility, job_id, consumer, RUNNING),
            )
            return cursor.rowcount == 1

        return await self._run(self._write, renew)

    async def finish(self, job_id: str, consumer: str, state: int, **outcome) -> Job | None:
        """Write the outcome once: only while the job is still this consumer's. The settled job,
        or None when it was not (cancelled meanwhile, or run by another consumer)."""

        def finish(db):
            owned = db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND consumer = ? AND state = ?",
                (job_id, consumer, RUNNING),
            ).fetchone()
            if owned is None:
                return None
            self._settle(db, job_id, state, time.time(), **outcome)
            return self._one(db, job_id)

        return await self._run(self._write, finish)

    async def release(self, job_id: str, consumer: str, code: int, message: str,
                      delay: float) -> bool:  # fmt: skip
        """Give the job back after a failure worth another try, visible again after `delay`
        (the visibility timeout: the same pause a dead consumer's job gets)."""

        def release(db):
            cursor = db.execute(
                "UPDATE jobs SET state = ?, consumer = '', lease_until = ?, error_code = ?, "
                "error_message = ? WHERE id = ? AND consumer = ? AND state = ?",
                (QUEUED, time.time() + delay, code, message, job_id, consumer, RUNNING),
            )
            return cursor.rowcount == 1

        return await self._run(self._write, release)

    async def stats(self) -> dict[str, tuple[int, float, int]]:
        """Per model: (queued jobs, submit time of the oldest queued, running jobs)."""
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT model, state, COUNT(*), MIN(submitted) FROM jobs "
                "WHERE state IN (?, ?) GROUP BY model, state",
                (QUEUED, RUNNING),
            ).fetchall()
        )
        out: dict[str, list] = {}
        for model, state, count, oldest in rows:
            entry = out.setdefault(model, [0, 0.0, 0])
            if state == QUEUED:
                entry[0], entry[1] = count, oldest
            else:
                entry[2] = count
        return {m: tuple(v) for m, v in out.items()}

    async def sweep(self) -> int:
        """Delete finished jobs past their TTL; the number deleted."""

        def sweep(db):
            return db.execute(
                "DELETE FROM jobs WHERE expires > 0 AND expires <= ?", (time.time(),)
            ).rowcount

        return await self._run(self._write, sweep)

    async def close(self) -> None:
        await asyncio.to_thread(self._locked, self._db.close)
