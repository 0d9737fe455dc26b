"""Dynamic batching: queue compatible calls to one variant, send them as one backend call.

One `Batcher` per variant. `submit` queues a request with the others sharing its `batch_key`
(adapters/codecs/batch.py) in an open batch; the batch is sent, through the injected `send`, when
the sum of its batch sizes reaches `max_batch_size` or one of the preferred sizes, when the next
request would not fit, or `max_queue_delay` after its first request was queued, whichever comes
first. The answer is split back, and each caller gets its own slice.

With `max_in_flight` (adaptive dispatch) the batcher also knows how busy the backend is: a call
that finds fewer than `max_in_flight` of this variant's backend calls running and none queued is
sent at once, alone, so an idle caller pays nothing for batching; calls that find the backend
busy (or others queued) wait for company by the rules above. Sending a queued batch the moment
the backend returns was tried and measured worse: batches then hold only what arrived during
one execution, so under load the backend runs many small batches at ~85% utilisation and the
p99 climbs (the realistic MLP held 183 calls/s at p99 <= 50 ms that way, 199-235 waiting for
the delay; docs/benchmarks.md). Without `max_in_flight` (Triton's rule) every call waits.

What each caller keeps to itself:
- Its deadline: a request whose deadline passes while queued leaves the batch at once with
  DEADLINE_EXCEEDED; the batch carries on without it.
- Its cancellation: the batch is sent from a task of its own, so cancelling one caller never
  reaches the backend call. The call is cancelled only when no member waits for it any more.
- Its error: when the batch fails, every member gets the backend's status (code and message) as
  an exception instance of its own, so no traceback or mutable `target` is shared.

Timers: one per open batch, armed for the earliest of its send time and its members' deadlines;
no polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable

import grpc
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs.batch import batch_key, merge, split
from gateway.errors import GatewayError

log = logging.getLogger(__name__)
# send(request, deadline) -> the backend's response. `deadline` (time.monotonic(), or None when
# some member set none) is the latest deadline among the batch's members: past it nobody waits.
Send = Callable[[oip.ModelInferRequest, float | None], Awaitable[oip.ModelInferResponse]]
# on_batch(size, queue_delays): the batch's total batch size and each member's seconds queued.
OnBatch = Callable[[int, list[float]], None]


class _Member:
    __slots__ = ("deadline", "future", "queued_at", "request", "size")

    def __init__(self, request, size, deadline, queued_at, future) -> None:
        self.request = request
        self.size = size
        self.deadline = deadline
        self.queued_at = queued_at
        self.future = future


class _Batch:
    __slots__ = ("key", "members", "send_at", "task", "timer", "timer_at", "total", "waiting")

    def __init__(self, key: Hashable, send_at: float) -> None:
        self.key = key
        self.members: list[_Member] = []
        self.total = 0  # sum of the members' batch sizes
        self.send_at = send_at  # first member's queue time + max_queue_delay
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.task: asyncio.Task | None = None  # set once sent
        self.waiting = 0  # members still waiting for the sent batch's answer


def _copy_error(err: BaseException) -> GatewayError:
    """A fresh exception per member: same status, no shared traceback or mutable fields."""
    if isinstance(err, GatewayError):
        copy = GatewayError(err.code, err.message)
        copy.budget_ran_out = err.budget_ran_out
        copy.fail_fast = err.fail_fast
        copy.target = err.target
        return copy
    copy = GatewayError(grpc.StatusCode.INTERNAL, f"batched call failed: {type(err).__name__}")
    copy.__cause__ = err
    return copy


class Batcher:
    """Batches one variant's calls. See the module docstring for the rules.

    send: called with a merged request (or a lone one) and the latest member deadline.
    max_batch_size: most rows (sum of first dimensions) in one backend call; a request with more
        goes alone, unqueued.
    max_queue_delay: seconds a batch waits for company after its first request was queued.
    preferred_sizes: totals at which a batch is sent at once (sizes above max_batch_size never
        occur and are ignored).
    max_queued: requests waiting in this batcher's queues at most; one more gets
        RESOURCE_EXHAUSTED at once (memory stays bounded whatever callers do).
    max_in_flight: adaptive dispatch (module docstring): this many backend calls of this
        batcher at once before calls wait for company. None: every batch waits for its delay.
    on_batch: called as each batch is sent, with its total size and its members' queue delays.
    """

    def __init__(
        self,
        send: Send,
        *,
        max_batch_size: int,
        max_queue_delay: float,
        preferred_sizes: Iterable[int] = (),
        max_queued: int = 1024,
        max_in_flight: int | None = None,
        on_batch: OnBatch | None = None,
        key: Callable[[oip.ModelInferRequest], Hashable | None] = batch_key,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must not be negative, got {max_queue_delay}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._send = send
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.preferred_sizes = frozenset(s for s in preferred_sizes if 0 < s <= max_batch_size)
        self.max_queued = max_queued
        self.max_in_flight = max_in_flight
        self._in_flight = 0  # this batcher's backend calls running (batches and lone calls)
        self._on_batch = on_batch
        self._key = key
        self._open: dict[Hashable, _Batch] = {}  # key -> the batch still taking members
        self._queued = 0  # members of open batches
        self._sending: set[asyncio.Task] = set()  # strong references until each batch is done

    @property
    def queued(self) -> int:
        """Requests waiting in open batches (not yet sent)."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """This batcher's backend calls running now."""
        return self._in_flight

    async def submit(
        self, request: oip.ModelInferRequest, deadline: float | None = None
    ) -> oip.ModelInferResponse:
        """The backend's answer to `request` (its own slice of a batch's answer), or the
        GatewayError its batch failed with. `deadline` is time.monotonic() based."""
        key = self._key(request)
        if key is None:  # no batch dimension, or not mergeable: as if there were no batcher
            return await self._alone(request, deadline)
        size = request.inputs[0].shape[0]
        if size > self.max_batch_size:  # too big to share a call: alone, unqueued
            return await self._alone(request, deadline)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise _deadline_error(0.0)
        if (
            self.max_in_flight is not None
            and self._in_flight < self.max_in_flight
            and key not in self._open
        ):
            # The backend has room and nobody is queued: waiting could only add delay.
            if self._on_batch is not None:
                self._report(size, [0.0])
            return await self._alone(request, deadline)
        if self._queued >= self.max_queued:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the batching queue is full ({self._queued} requests waiting): try again later",
            )
        batch = self._open.get(key)
        if batch is not None and batch.total + size > self.max_batch_size:
            self._dispatch(batch)  # it cannot take this request: send it as it is
            batch = None
        if batch is None:
            batch = _Batch(key, now + self.max_queue_delay)
            self._open[key] = batch
        member = _Member(request, size, deadline, now, asyncio.get_running_loop().create_future())
        batch.members.append(member)
        batch.total += size
        self._queued += 1
        if batch.total >= self.max_batch_size or batch.total in self.preferred_sizes:
            self._dispatch(batch)
        else:
            due = batch.send_at if deadline is None else min(deadline, batch.send_at)
            if batch.timer is None or due < batch.timer_at:
                self._arm(batch, due, now)
        try:
            # Awaiting the member's own future: cancelling this caller cancels only that future.
            return await member.future
        finally:
            if member.future.cancelled():
                self._leave(batch, member)

    async def _alone(
        self, request: oip.ModelInferRequest, deadline: float | None
    ) -> oip.ModelInferResponse:
        """One request sent as it is, from the caller's own task (its cancellation is the
        call's), counted as a backend call in flight."""
        self._in_flight += 1
        try:
            return await self._send(request, deadline)
        finally:
            self._in_flight -= 1

    def _report(self, total: int, delays: list[float]) -> None:
        try:
            self._on_batch(total, delays)
        except Exception:  # a metrics hook must not strand a batch already on its way
            log.exception("batching: on_batch hook failed")

    def _arm(self, batch: _Batch, when: float, now: float) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        batch.timer_at = when
        # call_later from time.monotonic(): deadlines are time.monotonic() values, and a loop's
        # own clock (uvloop's) need not share its origin.
        batch.timer = asyncio.get_running_loop().call_later(
            max(0.0, when - now), self._on_timer, batch
        )

    def _on_timer(self, batch: _Batch) -> None:
        batch.timer = None
        if batch.task is not None or self._open.get(batch.key) is not batch:
            return
        now = time.monotonic()
        self._expire(batch, now)
        if not batch.members:
            return
        if now >= batch.send_at:
            self._dispatch(batch)
            return
        due = batch.send_at
        for member in batch.members:
            if member.deadline is not None and member.deadline < due:
                due = member.deadline
        self._arm(batch, due, now)

    def _expire(self, batch: _Batch, now: float) -> None:
        """Members whose deadline passed leave the open batch with DEADLINE_EXCEEDED."""
        members = batch.members
        if all(m.deadline is None or m.deadline > now for m in members):
            return
        kept = []
        for member in members:
            if member.deadline is not None and member.deadline <= now:
                batch.total -= member.size
                self._queued -= 1
                if not member.future.done():
                    member.future.set_exception(_deadline_error(now - member.queued_at))
            else:
                kept.append(member)
        batch.members = kept
        if not kept:
            self._close(batch)

    def _close(self, batch: _Batch) -> None:
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None

    def _leave(self, batch: _Batch, member: _Member) -> None:
        """A cancelled caller: out of the open batch, or one fewer waiting for a sent one."""
        if batch.task is None:
            if member in batch.members:
                batch.members.remove(member)
                batch.total -= member.size
                self._queued -= 1
                if not batch.members:
                    self._close(batch)
            return
        batch.waiting -= 1
        if batch.waiting == 0 and not batch.task.done():
            batch.task.cancel()  # nobody waits for this answer any more

    def _dispatch(self, batch: _Batch) -> None:
        """Send `batch` now: it stops taking members, its timer goes."""
        self._close(batch)
        now = time.monotonic()
        self._expire(batch, now)
        members = batch.members
        if not members:
            return
        self._queued -= len(members)
        batch.waiting = len(members)
        deadline = 0.0
        for member in members:
            if member.deadline is None:
                deadline = None
                break
            deadline = max(deadline, member.deadline)
        task = asyncio.get_running_loop().create_task(self._run(members, deadline))
        batch.task = task
        self._in_flight += 1
        self._sending.add(task)
        task.add_done_callback(self._sent)
        if self._on_batch is not None:
            self._report(batch.total, [now - m.queued_at for m in members])

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.discard(task)
        self._in_flight -= 1

    async def _run(self, members: list[_Member], deadline: float | None) -> None:
        try:
            if len(members) == 1:  # a lone request goes as it is: its answer needs no split
                responses = [await self._send(members[0].request, deadline)]
            else:
                merged, sizes = merge([m.request for m in members])
                response = await self._send(merged, deadline)
                responses = split(response, sizes, [m.request.id for m in members])
        except asyncio.CancelledError:  # every member had gone (or the loop is closing)
            for member in members:
                member.future.cancel()
            raise
        except Exception as err:
            if not isinstance(err, GatewayError):
                # A bug of ours: the members get INTERNAL, and it is logged once per batch (the
                # servicer only logs what it sees as an unexpected exception).
                log.error("batching: a batch of %d calls failed", len(members), exc_info=err)
            for member in members:
                if not member.future.done():
                    member.future.set_exception(_copy_error(err))
            return
        for member, response in zip(members, responses, strict=True):
            if not member.future.done():
                member.future.set_result(response)

    def flush(self) -> None:
        """Send every open batch now (e.g. before draining)."""
        for batch in list(self._open.values()):
            self._dispatch(batch)


def _deadline_error(queued: float) -> GatewayError:
    err = GatewayError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"deadline exceeded while queued for a batch ({queued * 1000:.1f} ms in the queue)",
    )
    err.budget_ran_out = True  # the caller's own deadline ran out: no sign of a slow backend
    return err
