"""This process's consumers: each takes a job from the queue, runs it through the data plane
exactly as a unary ModelInfer call (DataPlane.answer, protocol "jobs": same route table, retries,
fallback, breakers, cache, metrics, access log), renews its lease while the call runs, and
writes the outcome once.

What an answer makes of the job:
- OK: succeeded with the response (failed RESOURCE_EXHAUSTED if over jobs.max_result_bytes).
- A backend failure (UNAVAILABLE, INTERNAL, ...: gateway.errors.BACKEND_FAILURES) with
  deliveries left: given back, visible again after the visibility timeout; on the last delivery
  dead-lettered, failed with that status and the reason.
- The job's own deadline passed: expired.
- Anything else (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...): failed at once with the
  status and message the unary call gave: another try would give the same."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from gateway.dataplane.identity import Caller
from gateway.errors import BACKEND_FAILURES
from gateway.jobs import records
from gateway.jobs.records import Job, QueueUnavailable, dead_letter_reason, infer_request

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.25  # an idle consumer looks at the queue this often (a local submit wakes it)
ERROR_PAUSE_S = 1.0  # after the queue's store failed to answer


class Worker:
    def __init__(self, service) -> None:
        self._service = service
        self._settings = service.settings
        self._queue = service.queue
        self._metrics = service.metrics
        self._closing = False
        self._wake = asyncio.Event()
        self._consumers: list[asyncio.Task] = []
        self._calls: set[asyncio.Task] = set()
        self._last_error_log = 0.0

    def start(self) -> None:
        self._consumers = [
            asyncio.create_task(self._consume(), name=f"jobs-consumer-{i}")
            for i in range(self._settings.concurrency)
        ]

    def wake(self) -> None:
        self._wake.set()

    async def close(self, grace: float) -> None:
        self._closing = True
        self._wake.set()
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=max(grace, 0.0))
        for call in self._calls:
            call.cancel()  # its lease runs out and another consumer takes the job again
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)

    async def _consume(self) -> None:
        while not self._closing:
            try:
                await self._take_one()
            except asyncio.CancelledError:
                raise
            except QueueUnavailable as err:
                self._metrics.queue_errors.labels("claim").inc()
                self._log_error(err)
                await asyncio.sleep(ERROR_PAUSE_S)
            except Exception:
                # A bug of ours must not end this consumer: the job's lease runs out and it is
                # delivered again (and dead-lettered if it keeps failing this way).
                log.exception("jobs: a consumer failed")
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _take_one(self) -> None:
        s = self._settings
        claimed = await self._queue.claim(
            self._service.consumer, s.visibility_timeout, s.max_deliveries
        )
        if claimed is None:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            return
        kind, job = claimed
        if job is None:
            return
        if kind == "dead":
            self._dead(job)
        elif kind == "expired":
            self._service.finished(job)
        elif not self._closing:  # closing: the lease runs out and another consumer takes it
            call = asyncio.create_task(self._run(job))
            self._calls.add(call)
            try:
                await asyncio.shield(call)
            finally:
                self._calls.discard(call)

    def _log_error(self, err: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 10:
            self._last_error_log = now
            log.warning("jobs: %s", err)

    def _dead(self, job: Job) -> None:
        self._metrics.dead_lettered.labels(job.model).inc()
        self._service.finished(job)
        log.warning("jobs: a job of model %r dead-lettered: %s", job.model, job.dead_letter)

    async def _run(self, job: Job) -> None:
        if job.deliveries > 1:
            self._metrics.redeliveries.labels(job.model).inc()
        else:
            self._metrics.time_in_queue.labels(job.model).observe(
                max(0.0, time.time() - job.submitted)
            )
        caller = Caller(job.owner, frozenset(job.groups), "job")
        deadline = time.monotonic() + (job.deadline - time.time())
        call = asyncio.create_task(
            self._service.plane.answer(
                infer_request(job), job.model, job.version, (), deadline,
                lambda: caller, protocol="jobs",
            )
        )  # fmt: skip
        lease = asyncio.create_task(self._keep_lease(job, call))
        try:
            answer = await call
        except asyncio.CancelledError:
            if not call.cancelled() or self._closing:
                raise
            return  # the job was cancelled, or taken by another consumer: nothing to write
        finally:
            lease.cancel()
        try:
            await self._settle(job, answer)
        except QueueUnavailable as err:
            # The lease runs out and the job is delivered again: its outcome is not lost.
            self._metrics.queue_errors.labels("finish").inc()
            self._log_error(err)

    async def _keep_lease(self, job: Job, call: asyncio.Task) -> None:
        s = self._settings
        while True:
            await asyncio.sleep(s.visibility_timeout / 3)
            try:
                still = await self._queue.renew(job.id, self._service.consumer,
                                                s.visibility_timeout)  # fmt: skip
            except QueueUnavailable:
                self._metrics.queue_errors.labels("renew").inc()
                continue
            if not still:
                call.cancel()
                return

    async def _settle(self, job: Job, answer) -> None:
        s, queue, me = self._settings, self._queue, self._service.consumer
        code, message = answer.code, answer.message
        if answer.result is not None:
            result = answer.result.response.SerializeToString()
            if len(result) <= s.max_result_bytes:
                settled = await queue.finish(job.id, me, records.SUCCEEDED, result=result)
            else:
                settled = await queue.finish(
                    job.id, me, records.FAILED,
                    code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                    message=f"the result is {len(result)} bytes, over jobs.max_result_bytes "
                    f"({s.max_result_bytes})",
                )  # fmt: skip
        elif time.time() >= job.deadline or (
            # The call was cut by the job's own deadline (the deadline layer may end it a
            # moment early, and the wall clock is not the monotonic one the call used).
            code == grpc.StatusCode.DEADLINE_EXCEEDED and job.deadline - time.time() < 1.0
        ):
            settled = await queue.finish(
                job.id, me, records.EXPIRED, code=code.value[0],
                message=f"the job's deadline passed before it finished ({message})",
            )  # fmt: skip
        elif code in BACKEND_FAILURES and job.deliveries < s.max_deliveries:
            await queue.release(job.id, me, code.value[0], message, s.visibility_timeout)
            return
        elif code in BACKEND_FAILURES:
            job.error_message = f"{code.name}: {message}"
            settled = await queue.finish(
                job.id, me, records.FAILED, code=code.value[0], message=message,
                dead_letter=dead_letter_reason(job),
            )  # fmt: skip
            if settled is not None:
                self._dead(settled)
            return
        else:
            settled = await queue.finish(job.id, me, records.FAILED, code=code.value[0],
                                         message=message)  # fmt: skip
        if settled is not None:
            self._service.finished(settled)
