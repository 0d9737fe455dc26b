"""The fleet's job queue: Redis Streams with one consumer group, every gateway process a consumer
(`redis` from PyPI, asyncio client). Same semantics as the embedded queue (sqlite_queue.py).

Keys, under the prefix P (jobs.redis.key_prefix; one Redis, not a cluster):
- P:stream:high, P:stream:normal: one entry per queued job (priority > 0 reads first).
- P:job:ID: the job (a hash), expiring at its result TTL once finished.
- P:idem:SHA: idempotency key -> job id; P:owner:SHA: a caller's jobs by submit time (List).
- P:usage (unfinished jobs and bytes per model: the quotas), P:queued:MODEL (depth, oldest),
  P:running (per model), P:models; P:dead: the dead-letter stream, with each job's reason.

A consumer reads new entries (XREADGROUP) and, first, entries idle past the visibility timeout
(XAUTOCLAIM: their consumer died or gave the job back); while a call runs it renews its claim
(XCLAIM to itself resets the idle time). Every state change is one Lua script that checks the
job's state and consumer before writing, so a result is written once and a job run twice is
visible once. A Redis that does not answer is QueueUnavailable: a submit is acknowledged only
after its script ran, so an acknowledgement is never one Redis did not store (with AOF; see
docs/jobs.md on appendfsync)."""

from __future__ import annotations

import hashlib
import logging
import os
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
)
from gateway.redis_client import redis_client

log = logging.getLogger(__name__)

GROUP = "tensorgate"
BLOCK_MS = 500  # an idle consumer's XREADGROUP waits this long for a new job
DEAD_LETTERS_KEPT = 10_000

# Lua helpers every script shares. settle(): the one way a job reaches a final state.
_PRELUDE = """
local p = ARGV[1]
local function settle(key, id, state, now, code, message, result, dead)
  local j = redis.call('HMGET', key, 'state', 'model', 'bytes', 'result_ttl', 'stream', 'msg',
                       'idem')
  local was, model = tonumber(j[1]), j[2]
  redis.call('HSET', key, 'state', state, 'finished', now, 'consumer', '', 'error_code', code,
             'error_message', message, 'result', result, 'dead_letter', dead,
             'expires', now + tonumber(j[4]))
  redis.call('HDEL', key, 'request')
  local ttl = math.max(1, math.floor(tonumber(j[4]) * 1000))
  redis.call('PEXPIRE', key, ttl)
  if j[7] and j[7] ~= '' then redis.call('PEXPIRE', j[7], ttl) end
  redis.call('HINCRBY', p .. ':usage', model .. ':jobs', -1)
  redis.call('HINCRBY', p .. ':usage', model .. ':bytes', -tonumber(j[3]))
  redis.call('ZREM', p .. ':queued:' .. model, id)
  if was == %(RUNNING)d then redis.call('HINCRBY', p .. ':running', model, -1) end
  if j[6] and j[6] ~= '' then
    redis.call('XACK', j[5], '%(GROUP)s', j[6])
    redis.call('XDEL', j[5], j[6])
  end
  if dead ~= '' then
    redis.call('XADD', p .. ':dead', 'MAXLEN', '~', %(KEPT)d, '*', 'id', id, 'model', model,
               'reason', dead)
  end
end
"""
_SUBMIT = """
-- ARGV: p, id, idem key ('' for none), model, bytes, max jobs, max bytes, stream, idem ttl ms,
--       owner key, submitted, then the job's fields and values
local id, idem, model = ARGV[2], ARGV[3], ARGV[4]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', p .. ':job:' .. existing) == 1 then
    return {0, existing}
  end
end
local usage = redis.call('HMGET', p .. ':usage', model .. ':jobs', model .. ':bytes')
local jobs, bytes = tonumber(usage[1] or '0'), tonumber(usage[2] or '0')
if jobs + 1 > tonumber(ARGV[6]) then return {-1, tostring(jobs)} end
if bytes + tonumber(ARGV[5]) > tonumber(ARGV[7]) then return {-2, tostring(bytes)} end
local key = p .. ':job:' .. id
redis.call('HSET', key, unpack(ARGV, 12))
redis.call('HINCRBY', p .. ':usage', model .. ':jobs', 1)
redis.call('HINCRBY', p .. ':usage', model .. ':bytes', tonumber(ARGV[5]))
redis.call('ZADD', p .. ':queued:' .. model, ARGV[11], id)
redis.call('SADD', p .. ':models', model)
redis.call('ZADD', ARGV[10], ARGV[11], id)
if idem ~= '' then redis.call('SET', idem, id, 'PX', ARGV[9]) end
local msg = redis.call('XADD', ARGV[8], '*', 'id', id)
redis.call('HSET', key, 'msg', msg, 'stream', ARGV[8], 'idem', idem)
return {1, id}
"""
_START = """
-- ARGV: p, id, stream, msg, consumer, now, max deliveries, dead-letter reason prefix
local id, now = ARGV[2], tonumber(ARGV[6])
local key = p .. ':job:' .. id
local j = redis.call('HMGET', key, 'state', 'deadline', 'deliveries', 'model', 'msg',
                     'error_code', 'error_message')
local state = tonumber(j[1] or '0')
if state ~= %(QUEUED)d and state ~= %(RUNNING)d then
  -- cancelled or finished meanwhile, or gone: the entry is spent
  redis.call('XACK', ARGV[3], '%(GROUP)s', ARGV[4])
  redis.call('XDEL', ARGV[3], ARGV[4])
  return 'gone'
end
if tonumber(j[2]) <= now then
  settle(key, id, %(EXPIRED)d, now, 4, "the job's deadline passed before it finished", '', '')
  return 'expired'
end
local deliveries = tonumber(j[3])
if deliveries >= tonumber(ARGV[7]) then
  local last = j[7]
  if last == nil or last == '' then
    last = 'its consumer stopped (killed or hung) before finishing'
  end
  local code = tonumber(j[6] or '0')
  if code == 0 then code = 14 end
  settle(key, id, %(FAILED)d, now, code, last, '',
         'dead-lettered after ' .. deliveries .. ' deliveries; last failure: ' .. last)
  return 'dead'
end
if state == %(QUEUED)d then
  redis.call('ZREM', p .. ':queued:' .. j[4], id)
  redis.call('HINCRBY', p .. ':running', j[4], 1)
end
redis.call('HSET', key, 'state', %(RUNNING)d, 'consumer', ARGV[5], 'deliveries', deliveries + 1)
if tonumber(redis.call('HGET', key, 'started') or '0') == 0 then
  redis.call('HSET', key, 'started', now)
end
return 'run'
"""
_RENEW = """
-- ARGV: p, id, consumer
local key = p .. ':job:' .. ARGV[2]
local j = redis.call('HMGET', key, 'state', 'consumer', 'stream', 'msg')
if tonumber(j[1] or '0') ~= %(RUNNING)d or j[2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', j[3], '%(GROUP)s', ARGV[3], 0, j[4], 'JUSTID')
return 1
"""
_FINISH = """
-- ARGV: p, id, consumer ('' for a cancel), state, now, code, message, result, dead letter
local key = p .. ':job:' .. ARGV[2]
local j = redis.call('HMGET', key, 'state', 'consumer')
local state = tonumber(j[1] or '0')
if ARGV[3] == '' then
  if state ~= %(QUEUED)d and state ~= %(RUNNING)d then return 0 end
elseif state ~= %(RUNNING)d or j[2] ~= ARGV[3] then
  return 0
end
settle(key, ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8],
       ARGV[9])
return 1
"""
_RELEASE = """
-- ARGV: p, id, consumer, code, message. The stream entry stays pending: XAUTOCLAIM takes it
-- again once idle past the visibility timeout.
local key = p .. ':job:' .. ARGV[2]
local j = redis.call('HMGET', key, 'state', 'consumer', 'model', 'submitted')
if tonumber(j[1] or '0') ~= %(RUNNING)d or j[2] ~= ARGV[3] then return 0 end
redis.call('HSET', key, 'state', %(QUEUED)d, 'consumer', '', 'error_code', ARGV[4],
           'error_message', ARGV[5])
redis.call('HINCRBY', p .. ':running', j[3], -1)
redis.call('ZADD', p .. ':queued:' .. j[3], j[4], ARGV[2])
return 1
"""
_CONSTANTS = {"QUEUED": QUEUED, "RUNNING": RUNNING, "FAILED": FAILED, "EXPIRED": EXPIRED,
              "GROUP": GROUP, "KEPT": DEAD_LETTERS_KEPT}  # fmt: skip


def _script(body: str) -> str:
    return (_PRELUDE + body) % _CONSTANTS


_FIELDS = ("owner", "groups", "model", "version", "priority", "idempotency_key", "submitted",
           "deadline", "result_ttl", "request", "state", "started", "finished", "expires",
           "deliveries", "result", "error_code", "error_message", "dead_letter")  # fmt: skip
_NUMBERS = {"priority": int, "submitted": float, "deadline": float, "result_ttl": float,
            "state": int, "started": float, "finished": float, "expires": float,
            "deliveries": int, "error_code": int}  # fmt: skip


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class RedisQueue:
    def __init__(self, settings) -> None:
        from redis import exceptions

        self.name = settings.queue_name
        self._errors = (exceptions.ConnectionError, exceptions.TimeoutError, OSError)
        self._response_error = exceptions.ResponseError
        password = (
            os.environ.get(settings.redis_password_env) if settings.redis_password_env else None
        )
        tls = (
            {"ssl": True, "ssl_ca_certs": settings.redis_tls_ca_file or None}
            if settings.redis_tls
            else {}
        )
        self._client = redis_client(
            settings.redis_address, connect_timeout=settings.redis_timeout,
            socket_timeout=settings.redis_timeout + BLOCK_MS / 1000, password=password, **tls,
        )  # fmt: skip
        self._p = settings.redis_prefix
        self._streams = (f"{self._p}:stream:high", f"{self._p}:stream:normal")
        self._max_ttl = settings.max_result_ttl + settings.max_job_deadline
        self._scripts = {
            name: self._client.register_script(_script(body))
            for name, body in (("submit", _SUBMIT), ("start", _START), ("renew", _RENEW),
                               ("finish", _FINISH), ("release", _RELEASE))
        }  # fmt: skip
        self._groups_ready = False

    async def _call(self, operation, *args):
        """Run one Redis operation; QueueUnavailable when Redis does not answer."""
        try:
            if not self._groups_ready:
                await self._create_groups()
            return await operation(*args)
        except self._response_error as err:
            if "NOGROUP" in str(err):  # Redis lost the group (restarted without its data)
                self._groups_ready = False
            if "LOADING" in str(err) or "NOGROUP" in str(err):
                raise QueueUnavailable(f"{self.name}: {err}") from None
            raise
        except self._errors as err:
            raise QueueUnavailable(f"{self.name}: {type(err).__name__}") from None

    async def _create_groups(self) -> None:
        for stream in self._streams:
            try:
                await self._client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except self._response_error as err:
                if "BUSYGROUP" not in str(err):
                    raise
        self._groups_ready = True

    def _key(self, job_id: str) -> str:
        return f"{self._p}:job:{job_id}"

    def _job(self, job_id: str, raw: dict) -> Job | None:
        if not raw or b"state" not in raw:
            return None
        values = {}
        for name in _FIELDS:
            value = raw.get(name.encode(), b"")
            if name in ("request", "result"):
                values[name] = value
            elif name in _NUMBERS:
                values[name] = _NUMBERS[name](float(value or 0))
            else:
                values[name] = value.decode()
        values["groups"] = tuple(g for g in values["groups"].split("\n") if g)
        return Job(id=job_id, **values)

    # --- the API's operations -------------------------------------------------------------

    async def submit(self, job: Job, max_jobs: int, max_bytes: int) -> tuple[Job, bool]:
        idem = (
            f"{self._p}:idem:{_digest(job.owner, job.idempotency_key)}"
            if job.idempotency_key
            else ""
        )
        fields = []
        for name in _FIELDS:
            value = getattr(job, name)
            fields += [name, "\n".join(value) if name == "groups" else value]
        fields += ["bytes", job.payload_bytes, "consumer", ""]
        ttl_ms = int((job.deadline - job.submitted + job.result_ttl) * 1000) + 1000
        stream = self._streams[0 if job.priority > 0 else 1]
        args = [self._p, job.id, idem, job.model, job.payload_bytes, max_jobs, max_bytes, stream,
                ttl_ms, self._owner_key(job.owner), job.submitted, *fields]  # fmt: skip
        code, value = await self._call(self._scripts["submit"], [], args)
        if code == -1:
            raise QuotaExceeded("jobs.max_queued_jobs_per_model", max_jobs, int(value))
        if code == -2:
            raise QuotaExceeded("jobs.max_queued_bytes_per_model", max_bytes, int(value))
        if code == 0:
            found = await self.get(value.decode())
            if found is not None:
                return found, False
        return job, True

    def _owner_key(self, owner: str) -> str:
        return f"{self._p}:owner:{_digest(owner)}"

    async def get(self, job_id: str) -> Job | None:
        return self._job(job_id, await self._call(self._client.hgetall, self._key(job_id)))

    async def cancel(self, job_id: str) -> Job | None:
        await self._call(self._scripts["finish"], [], [self._p, job_id, "", CANCELLED, time.time(),
                         1, "cancelled by the caller", "", ""])  # fmt: skip
        return await self.get(job_id)

    async def list(self, owner, model, state, after, limit) -> list[Job]:
        key, now = self._owner_key(owner), time.time()
        await self._call(self._client.zremrangebyscore, key, 0, now - self._max_ttl)
        top = after[0] if after is not None else "+inf"
        out: list[Job] = []
        offset = 0
        while len(out) < limit:
            ids = await self._call(self._client.zrevrangebyscore, key, top, "-inf", offset, 200,
                                   True)  # fmt: skip
            if not ids:
                break
            offset += len(ids)
            # A job submitted in the same instant as the page's last one: ordered by id too.
            for raw_id, score in ids:
                job_id = raw_id.decode()
                if after is not None and score == after[0] and job_id >= after[1]:
                    continue
                job = await self.get(job_id)
                if job is None:
                    await self._call(self._client.zrem, key, job_id)
                    offset -= 1
                    continue
                if (model and job.model != model) or (state and job.state != state):
                    continue
                out.append(job)
                if len(out) == limit:
                    break
        return out

    # --- the consumers' operations --------------------------------------------------------

    async def claim(self, consumer: str, visibility: float, max_deliveries: int):
        entry = await self._call(self._next_entry, consumer, visibility)
        if entry is None:
            return None
        stream, msg, job_id = entry
        now = time.time()
        kind = await self._call(self._scripts["start"], [], [self._p, job_id, stream, msg,
                                consumer, now, max_deliveries])  # fmt: skip
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "gone":
            return "gone", None
        return kind, await self.get(job_id)

    async def _next_entry(self, consumer: str, visibility: float):
        """(stream, entry id, job id): an entry idle past the visibility timeout first, then a
        new one (high priority first, then normal, waiting up to BLOCK_MS)."""
        idle_ms = int(visibility * 1000)
        for stream in self._streams:
            reply = await self._client.xautoclaim(stream, GROUP, consumer, idle_ms, "0-0", count=1)
            for msg, fields in reply[1]:
                if fields:  # a deleted entry comes back without its fields
                    return stream, msg, fields[b"id"].decode()
                await self._client.xack(stream, GROUP, msg)
        for stream, block in ((self._streams[0], None), (self._streams[1], BLOCK_MS)):
            read = await self._client.xreadgroup(GROUP, consumer, {stream: ">"}, count=1,
                                                 block=block)  # fmt: skip
            for _, entries in read or ():
                for msg, fields in entries:
                    return stream, msg, fields[b"id"].decode()
        return None

    async def renew(self, job_id: str, consumer: str, visibility: float) -> bool:
        return bool(await self._call(self._scripts["renew"], [], [self._p, job_id, consumer]))

    async def finish(self, job_id: str, consumer: str, state: int, *, result=b"", code=0,
                     message="", dead_letter="") -> Job | None:  # fmt: skip
        done = await self._call(self._scripts["finish"], [], [self._p, job_id, consumer, state,
                                time.time(), code, message, result, dead_letter])  # fmt: skip
        return await self.get(job_id) if done else None

    async def release(self, job_id, consumer, code, message, delay) -> bool:
        return bool(await self._call(self._scripts["release"], [],
                                     [self._p, job_id, consumer, code, message]))  # fmt: skip

    async def stats(self) -> dict[str, tuple[int, float, int]]:
        models = await self._call(self._client.smembers, f"{self._p}:models")
        running = await self._call(self._client.hgetall, f"{self._p}:running")
        out = {}
        for raw in sorted(models):
            model = raw.decode()
            key = f"{self._p}:queued:{model}"
            queued = await self._call(self._client.zcard, key)
            oldest = await self._call(self._oldest, key)
            out[model] = (int(queued), oldest[0][1] if oldest else 0.0,
                          int(running.get(raw, 0) or 0))  # fmt: skip
        return out

    async def _oldest(self, key: str) -> list:
        return await self._client.zrange(key, 0, 0, withscores=True)

    async def sweep(self) -> int:
        return 0  # finished jobs expire in Redis itself (PEXPIRE at their result TTL)

    async def close(self) -> None:
        await self._client.aclose()
