"""The Jobs API without its transport: submit, get, watch, cancel, list, for the gRPC servicer
(servicer.py) and the REST listener (rest.py); and the lifecycle of this process's consumers
(worker.py) and queue gauges. Raises GatewayError with the status either front door answers."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

import grpc

from gateway.dataplane.identity import Caller
from gateway.dataplane.layers.validation import check_name
from gateway.durations import seconds
from gateway.errors import GatewayError, invalid, shown
from gateway.jobs import records
from gateway.jobs.metrics import JobMetrics
from gateway.jobs.records import Job, QueueUnavailable, QuotaExceeded
from gateway.jobs.settings import JobSettings, job_settings
from tensorgate.jobs.v1 import jobs_pb2

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_PRIORITY = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# How often Watch reads the job: state changes reach the caller this fast; after the first
# WATCH_FAST_S, once a second (a job that runs for an hour costs its watcher 3,600 reads).
WATCH_POLL_S = 0.2
WATCH_FAST_S = 10.0
WATCH_SLOW_POLL_S = 1.0
STATS_INTERVAL_S = 2.0  # how often the queue gauges are refreshed and expired results swept


def open_queue(settings: JobSettings):
    if settings.kind == "redis":
        from gateway.jobs.redis_queue import RedisQueue

        return RedisQueue(settings)
    from gateway.jobs.sqlite_queue import SqliteQueue

    return SqliteQueue(settings.path, settings.queue_name)


class JobsService:
    """Asynchronous inference for one gateway process: the API, its consumers, its gauges."""

    # The gRPC service's full name, for the data-plane listener's reflection list.
    SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobsService"].full_name

    def __init__(self, settings, plane, registry, state_dir: str) -> None:
        """`settings`: the config's tensorgate.config.v1.Jobs. `plane`: the DataPlane whose
        `answer` runs a job exactly as a unary call."""
        self.settings = job_settings(settings, state_dir)
        self.plane = plane
        self.metrics = JobMetrics(registry)
        self.queue = open_queue(self.settings)
        # Unique per process (a fleet shares the queue): who holds a job's lease.
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._tasks: list[asyncio.Task] = []
        self._worker = None

    def register(self, server) -> None:
        from gateway.jobs.servicer import JobsServicer
        from tensorgate.jobs.v1 import jobs_pb2_grpc

        jobs_pb2_grpc.add_JobsServiceServicer_to_server(JobsServicer(self), server)

    async def start(self) -> None:
        from gateway.jobs.worker import Worker

        self._worker = Worker(self)
        self._tasks = [asyncio.create_task(self._refresh(), name="jobs-gauges")]
        self._worker.start()
        log.info("jobs: %s, %d consumers in this process", self.settings.queue_name,
                 self.settings.concurrency)  # fmt: skip

    async def close(self, grace: float) -> None:
        """Take no more jobs; give the running ones `grace` seconds, then leave them: their
        lease runs out and another consumer takes them again."""
        if self._worker is not None:
            await self._worker.close(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.close()

    async def _refresh(self) -> None:
        while True:
            try:
                self.metrics.show_queue(await self.queue.stats(), time.time())
                await self.queue.sweep()
            except QueueUnavailable:
                self.metrics.queue_errors.labels("stats").inc()
            except Exception:
                log.exception("jobs: reading the queue's stats failed")
            await asyncio.sleep(STATS_INTERVAL_S)

    def _unavailable(self, operation: str) -> GatewayError:
        self.metrics.queue_errors.labels(operation).inc()
        return GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            f"the {self.settings.queue_name} is unavailable; nothing was changed, try again",
        )

    # --- the API --------------------------------------------------------------------------

    async def submit(self, request: jobs_pb2.SubmitRequest, caller: Caller):
        """(the job, created): the job is stored before this returns, or an error is raised."""
        s = self.settings
        payload = request.request.SerializeToString()
        if len(payload) > s.max_payload_bytes:
            raise invalid(
                f"the job's request is {len(payload)} bytes, over jobs.max_payload_bytes "
                f"({s.max_payload_bytes})"
            )
        model, version = request.request.model_name, request.request.model_version
        if not model:
            raise invalid("request.model_name is required: the public model name")
        check_name("model_name", model)
        # A job for a model the caller could not call is refused now, as the unary call would
        # be (NOT_FOUND naming the known models, or PERMISSION_DENIED), so the queue only ever
        # holds routed models (the metrics' label values stay bounded).
        self.plane.statistics(model, "", caller)
        key = request.idempotency_key
        if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise invalid(f"idempotency_key is over {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        if abs(request.priority) > MAX_PRIORITY:
            raise invalid(f"priority must be within [-{MAX_PRIORITY}, {MAX_PRIORITY}]")
        deadline = self._bounded(request, "deadline", s.job_deadline, s.max_job_deadline,
                                 "jobs.max_job_deadline")  # fmt: skip
        ttl = self._bounded(request, "result_ttl", s.result_ttl, s.max_result_ttl,
                            "jobs.max_result_ttl")  # fmt: skip
        now = time.time()
        job = Job(
            id=secrets.token_urlsafe(16), owner=caller.id, groups=tuple(sorted(caller.groups)),
            model=model, version=version, priority=request.priority, idempotency_key=key,
            submitted=now, deadline=now + deadline, result_ttl=ttl, request=payload,
        )  # fmt: skip
        try:
            stored, created = await self.queue.submit(job, s.max_queued_jobs, s.max_queued_bytes)
        except QueueUnavailable:
            raise self._unavailable("submit") from None
        except QuotaExceeded as quota:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {shown(model)} is at its job quota {quota.quota} = {quota.limit} "
                f"(unfinished jobs use {quota.used}); wait for jobs to finish",
            ) from None
        if created:
            self.metrics.submitted.labels(model).inc()
            if self._worker is not None:
                self._worker.wake()
        return records.to_proto(stored), created

    @staticmethod
    def _bounded(request, field: str, default: float, limit: float, named: str) -> float:
        if not request.HasField(field):
            return default
        value = seconds(getattr(request, field))
        if value <= 0:
            raise invalid(f"{field} must be positive")
        if value > limit:
            raise invalid(f"{field} {value:g}s is over {named} ({limit:g}s)")
        return value

    async def _owned(self, job_id: str, caller: Caller, operation: str) -> Job:
        """The caller's job; NOT_FOUND for a missing one and for another caller's alike, so an
        id that exists is never confirmed to someone else."""
        if not job_id or len(job_id) > 64:
            raise invalid("id is required: the job id Submit returned")
        try:
            job = await self.queue.get(job_id)
        except QueueUnavailable:
            raise self._unavailable(operation) from None
        if job is None or job.owner != caller.id:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no job {shown(job_id)}")
        return job

    async def get(self, job_id: str, caller: Caller) -> jobs_pb2.Job:
        return records.to_proto(await self._owned(job_id, caller, "get"))

    async def cancel(self, job_id: str, caller: Caller) -> jobs_pb2.Job:
        job = await self._owned(job_id, caller, "cancel")
        if not job.finished_state:
            try:
                settled = await self.queue.cancel(job_id)
            except QueueUnavailable:
                raise self._unavailable("cancel") from None
            if settled is not None:
                if settled.state == records.CANCELLED:
                    self.finished(settled)
                job = settled
        return records.to_proto(job)

    def finished(self, job: Job) -> None:
        """Count a job this process settled (or saw settled at its claim)."""
        state = records.STATE_NAMES.get(job.state, "unknown")
        self.metrics.finished.labels(job.model, state).inc()
        if job.finished:
            self.metrics.total_time.labels(job.model, state).observe(
                max(0.0, job.finished - job.submitted)
            )

    async def watch(self, job_id: str, caller: Caller):
        """Yields the job now, then at each change (state, deliveries), ending with a final
        state. Reads the queue, so it follows a job whichever process runs it."""
        job = await self._owned(job_id, caller, "watch")
        last = None
        slow_after = time.monotonic() + WATCH_FAST_S
        while True:
            seen = (job.state, job.deliveries)
            if seen != last:
                last = seen
                yield records.to_proto(job)
            if job.finished_state:
                return
            fast = time.monotonic() < slow_after
            await asyncio.sleep(WATCH_POLL_S if fast else WATCH_SLOW_POLL_S)
            try:
                again = await self.queue.get(job_id)
            except QueueUnavailable:
                continue  # the queue comes back; the caller's deadline bounds the wait
            if again is None:
                raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no job {shown(job_id)}")
            job = again

    async def list(self, request: jobs_pb2.ListRequest, caller: Caller) -> jobs_pb2.ListResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise invalid(f"page_size must be at most {MAX_PAGE_SIZE}")
        if request.state not in records.STATE_NAMES and request.state != 0:
            raise invalid(f"state {request.state} is not a job state")
        after = None
        if request.page_token:
            after = records.read_page_token(request.page_token)
            if after is None:
                raise invalid("page_token is not one List returned")
        try:
            jobs = await self.queue.list(caller.id, request.model, request.state, after, size + 1)
        except QueueUnavailable:
            raise self._unavailable("list") from None
        reply = jobs_pb2.ListResponse()
        for job in jobs[:size]:
            reply.jobs.append(records.to_proto(job, with_result=False))
        if len(jobs) > size:
            reply.next_page_token = records.page_token(jobs[size - 1])
        return reply
