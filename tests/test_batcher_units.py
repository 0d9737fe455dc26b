"""The dynamic batcher's own logic (gateway/dataplane/layers/batching/batcher.py) against a fake backend: what gets merged,
when batches leave, and what each caller gets back (its slice, its deadline, its cancellation, its
own copy of the batch's error). Timings are asserted as bounds with generous slack.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from gateway.dataplane.layers.batching.batcher import Batcher
from gateway.errors import GatewayError

SLACK = 0.15  # seconds a timer may run late on a busy test machine


def request(batch: int = 1, start: float = 0.0, width: int = 4, id: str = "", raw: bool = True):
    r = oip.ModelInferRequest(model_name="m", id=id)
    value = (np.arange(batch * width, dtype=np.float32) + start).reshape(batch, width)
    if raw:
        oip_codec.add_input(r, "X", value)
    else:
        tensor = r.inputs.add(name="X", datatype="FP32", shape=[batch, width])
        tensor.contents.fp32_contents.extend(value.reshape(-1).tolist())
    return r


def model(r: oip.ModelInferRequest) -> oip.ModelInferResponse:
    """Y = 2X + 1, row by row, answered raw with the request's id."""
    response = oip.ModelInferResponse(model_name="m", model_version="1", id=r.id)
    oip_codec.add_output(response, "Y", oip_codec.input_array(r, 0) * 2 + 1)
    return response


class Backend:
    """A fake `send`: records each call (request, batch size, deadline), answers with `model`
    after `delay`, or raises `fail` (an exception, or a callable making the response)."""

    def __init__(self, delay: float = 0.0, fail: BaseException | None = None, answer=model):
        self.delay = delay
        self.fail = fail
        self.answer = answer
        self.requests: list[oip.ModelInferRequest] = []
        self.deadlines: list[float | None] = []
        self.finished = 0
        self.cancelled = 0

    @property
    def sizes(self) -> list[int]:
        return [r.inputs[0].shape[0] if r.inputs[0].shape else 0 for r in self.requests]

    async def __call__(self, r, deadline):
        self.requests.append(r)
        self.deadlines.append(deadline)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.fail is not None:
            raise self.fail
        return self.answer(r)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[int, list[float]]] = []

    def __call__(self, size: int, delays: list[float]) -> None:
        self.batches.append((size, delays))


def same(a: oip.ModelInferResponse, b: oip.ModelInferResponse) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


async def test_concurrent_submits_share_backend_calls_and_get_their_own_slices():
    backend, recorder = Backend(delay=0.01), Recorder()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=0.5, on_batch=recorder)
    requests = [request(1, start=10 * i, id=f"call-{i}") for i in range(16)]
    started = time.monotonic()
    answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
    assert time.monotonic() - started < 0.5  # full batches leave at once, not after the delay
    assert backend.sizes == [8, 8]
    assert [size for size, _ in recorder.batches] == [8, 8]
    assert all(len(delays) == 8 for _, delays in recorder.batches)
    for r, answer in zip(requests, answers, strict=True):
        assert same(answer, model(r))  # its own rows, its own id
    assert batcher.queued == 0


async def test_mixed_batch_sizes_fill_up_to_max_and_split_exactly():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=6, max_queue_delay=0.05)
    requests = [request(b, start=100 * i, id=str(i)) for i, b in enumerate([2, 3, 1, 4, 2])]
    answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
    # 2+3+1 = 6 fills the first batch; 4+2 the second
    assert backend.sizes == [6, 6]
    for r, answer in zip(requests, answers, strict=True):
        assert same(answer, model(r))


async def test_a_batch_leaves_after_max_queue_delay_from_its_first_request():
    backend, recorder = Backend(), Recorder()
    batcher = Batcher(backend, max_batch_size=100, max_queue_delay=0.2, on_batch=recorder)
    started = time.monotonic()
    first = asyncio.ensure_future(batcher.submit(request(1, id="a")))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(batcher.submit(request(1, id="b")))
    await first
    first_done = time.monotonic() - started
    await second
    assert 0.2 <= first_done < 0.2 + SLACK
    assert time.monotonic() - started < 0.2 + SLACK  # the second did not restart the clock
    assert backend.sizes == [2]
    [(size, delays)] = recorder.batches
    assert size == 2
    assert 0.2 <= delays[0] < 0.2 + SLACK
    assert 0.1 - 0.02 <= delays[1] < 0.1 + SLACK


async def test_zero_delay_batches_what_arrived_in_the_same_loop_iteration():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=0.0)
    await asyncio.gather(*(batcher.submit(request(1, start=i)) for i in range(5)))
    assert backend.sizes == [5]


async def test_a_lone_request_is_sent_as_it_is():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=0.01)
    r = request(3, id="alone")
    answer = await batcher.submit(r)
    assert backend.requests[0] is r  # no merge, no copy, no split
    assert same(answer, model(r))


async def test_a_request_over_max_batch_size_goes_alone_at_once():
    backend, recorder = Backend(), Recorder()
    batcher = Batcher(backend, max_batch_size=4, max_queue_delay=1.0, on_batch=recorder)
    r = request(5)
    started = time.monotonic()
    await batcher.submit(r, deadline=started + 5)
    assert time.monotonic() - started < 0.5
    assert backend.requests == [r] and backend.deadlines == [started + 5]
    assert recorder.batches == [] and batcher.queued == 0


async def test_a_request_that_does_not_fit_sends_the_open_batch():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=0.3)
    started = time.monotonic()
    a = asyncio.ensure_future(batcher.submit(request(5)))
    await asyncio.sleep(0.01)
    b = asyncio.ensure_future(batcher.submit(request(4)))
    await a
    assert time.monotonic() - started < 0.2  # 5 + 4 > 8: the first left when the second came
    await b
    assert backend.sizes == [5, 4]


async def test_preferred_size_sends_at_once():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=16, max_queue_delay=1.0, preferred_sizes=[4, 32])
    started = time.monotonic()
    await asyncio.gather(*(batcher.submit(request(1, start=i)) for i in range(4)))
    assert time.monotonic() - started < 0.5
    assert backend.sizes == [4]
    assert batcher.preferred_sizes == {4}  # 32 can never be reached


async def test_preferred_sizes_with_larger_requests():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=16, max_queue_delay=0.1, preferred_sizes=[6])
    await asyncio.gather(*(batcher.submit(request(b)) for b in [2, 3, 1, 2]))
    assert backend.sizes == [6, 2]  # 2+3+1 hit 6; the last waited out the delay


async def test_incompatible_requests_go_in_separate_batches():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=16, max_queue_delay=0.05)
    requests = [
        request(1, start=0, width=4, id="w4-a"),
        request(2, start=1, width=3, id="w3-a"),
        request(1, start=2, width=4, raw=False, id="typed-a"),
        request(1, start=3, width=4, id="w4-b"),
        request(3, start=4, width=3, id="w3-b"),
        request(2, start=5, width=4, raw=False, id="typed-b"),
    ]
    answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
    assert sorted(backend.sizes) == [2, 3, 5]
    for sent in backend.requests:  # each merged request is homogeneous
        shapes = {tuple(t.shape[1:]) for t in sent.inputs}
        assert len(shapes) == 1
    kinds = {bool(sent.raw_input_contents) for sent in backend.requests}
    assert kinds == {True, False}
    for r, answer in zip(requests, answers, strict=True):
        assert same(answer, model(r))


async def test_unbatchable_requests_pass_straight_through():
    backend, recorder = Backend(), Recorder()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=1.0, on_batch=recorder)
    scalar = oip.ModelInferRequest(model_name="m")
    oip_codec.add_input(scalar, "X", np.float32(3.0).reshape(()))
    started = time.monotonic()
    answer = await batcher.submit(scalar)
    assert time.monotonic() - started < 0.5  # no queueing
    assert backend.requests == [scalar]
    assert oip_codec.output_array(answer, 0).tolist() == 7.0
    assert recorder.batches == [] and batcher.queued == 0


# --- deadlines -----------------------------------------------------------------------------------


async def test_a_deadline_passing_in_the_queue_leaves_alone_and_at_once():
    backend, recorder = Backend(), Recorder()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=0.3, on_batch=recorder)
    started = time.monotonic()
    patient = asyncio.ensure_future(batcher.submit(request(2, id="patient")))
    hurried = asyncio.ensure_future(
        batcher.submit(request(1, id="hurried"), deadline=started + 0.05)
    )
    with pytest.raises(GatewayError) as info:
        await hurried
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.budget_ran_out  # the caller's budget, not a slow backend
    assert 0.05 <= time.monotonic() - started < 0.05 + SLACK
    assert not patient.done()  # the other keeps its place
    answer = await patient
    assert 0.3 <= time.monotonic() - started < 0.3 + SLACK  # its own schedule, unchanged
    assert backend.sizes == [2]  # the expired request was not sent
    assert backend.deadlines == [None]
    assert same(answer, model(request(2, id="patient")))
    assert recorder.batches[0][0] == 2


async def test_a_batch_whose_only_member_expired_is_never_sent():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=0.3)
    with pytest.raises(GatewayError, match="while queued for a batch"):
        await batcher.submit(request(1), deadline=time.monotonic() + 0.02)
    await asyncio.sleep(0.35)
    assert backend.requests == [] and batcher.queued == 0 and not batcher._open


async def test_a_deadline_already_passed_is_refused_without_queueing():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=0.3)
    with pytest.raises(GatewayError) as info:
        await batcher.submit(request(1), deadline=time.monotonic() - 1)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert batcher.queued == 0 and not batcher._open


async def test_the_batch_call_gets_the_latest_member_deadline():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=3, max_queue_delay=0.2)
    now = time.monotonic()
    await asyncio.gather(
        batcher.submit(request(1), deadline=now + 5),
        batcher.submit(request(1), deadline=now + 9),
        batcher.submit(request(1), deadline=now + 7),
    )
    await asyncio.gather(
        batcher.submit(request(1), deadline=now + 5),
        batcher.submit(request(1)),
        batcher.submit(request(1), deadline=now + 7),
    )
    assert backend.deadlines == [now + 9, None]  # None: some member waits without a deadline


# --- cancellation --------------------------------------------------------------------------------


async def test_a_caller_cancelled_while_queued_leaves_the_batch():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay=0.1)
    stays = asyncio.ensure_future(batcher.submit(request(1, start=1, id="stays")))
    goes = asyncio.ensure_future(batcher.submit(request(2, start=2, id="goes")))
    await asyncio.sleep(0.02)
    goes.cancel()
    answer = await stays
    assert goes.cancelled()
    assert backend.sizes == [1]  # sent without the cancelled caller's rows
    assert same(answer, model(request(1, start=1, id="stays")))
    assert batcher.queued == 0


async def test_cancelling_one_caller_of_a_sent_batch_affects_no_one_else():
    backend = Backend(delay=0.1)
    batcher = Batcher(backend, max_batch_size=3, max_queue_delay=1.0)
    requests = [request(1, start=i, id=str(i)) for i in range(3)]
    tasks = [asyncio.ensure_future(batcher.submit(r)) for r in requests]
    await asyncio.sleep(0.03)  # the full batch is with the backend now
    assert backend.sizes == [3]
    tasks[1].cancel()
    answers = await asyncio.gather(tasks[0], tasks[2])
    assert tasks[1].cancelled()
    assert backend.finished == 1 and backend.cancelled == 0  # the backend call went on
    assert same(answers[0], model(requests[0])) and same(answers[1], model(requests[2]))


async def test_the_backend_call_is_cancelled_once_nobody_waits_for_it():
    backend = Backend(delay=0.3)
    batcher = Batcher(backend, max_batch_size=2, max_queue_delay=1.0)
    tasks = [asyncio.ensure_future(batcher.submit(request(1))) for _ in range(2)]
    await asyncio.sleep(0.03)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.02)
    assert backend.cancelled == 1 and backend.finished == 0
    assert not batcher._sending


# --- failures ------------------------------------------------------------------------------------


async def test_a_failed_batch_gives_every_member_the_backend_status_in_its_own_error():
    original = GatewayError(grpc.StatusCode.UNAVAILABLE, "backend triton-a is down")
    original.target = "variant-a"
    backend = Backend(fail=original)
    batcher = Batcher(backend, max_batch_size=4, max_queue_delay=0.05)
    results = await asyncio.gather(
        *(batcher.submit(request(1, start=i)) for i in range(4)), return_exceptions=True
    )
    assert backend.sizes == [4]
    assert all(isinstance(e, GatewayError) for e in results)
    assert {(e.code, e.message, e.target) for e in results} == {
        (grpc.StatusCode.UNAVAILABLE, "backend triton-a is down", "variant-a")
    }
    assert len({id(e) for e in results}) == 4  # one instance each
    assert all(e is not original for e in results)
    # a member's handling (retry blames its own variant) does not leak into the others
    results[0].target = "variant-b"
    assert results[1].target == "variant-a"


async def test_a_lone_member_failure_is_copied_too():
    original = GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
    original.budget_ran_out = True
    batcher = Batcher(Backend(fail=original), max_batch_size=4, max_queue_delay=0.01)
    with pytest.raises(GatewayError) as info:
        await batcher.submit(request(1))
    assert info.value is not original
    assert (info.value.code, info.value.message) == (grpc.StatusCode.INVALID_ARGUMENT, "bad input")
    assert info.value.budget_ran_out


async def test_an_answer_that_cannot_be_split_fails_every_member():
    def no_batch_dim(r):
        response = oip.ModelInferResponse(model_name="m")
        oip_codec.add_output(response, "Y", np.zeros((7,), np.float32))
        return response

    batcher = Batcher(Backend(answer=no_batch_dim), max_batch_size=2, max_queue_delay=0.05)
    results = await asyncio.gather(
        batcher.submit(request(1)), batcher.submit(request(1)), return_exceptions=True
    )
    for err in results:
        assert isinstance(err, GatewayError) and err.code is grpc.StatusCode.INTERNAL
        assert "first dimension 7 for a batch of 2" in err.message


async def test_an_unexpected_exception_becomes_internal_for_each_member():
    batcher = Batcher(Backend(fail=RuntimeError("bug")), max_batch_size=2, max_queue_delay=0.05)
    results = await asyncio.gather(
        batcher.submit(request(1)), batcher.submit(request(1)), return_exceptions=True
    )
    assert [e.code for e in results] == [grpc.StatusCode.INTERNAL] * 2
    assert results[0] is not results[1]


async def test_a_failing_metrics_hook_does_not_strand_the_batch():
    def broken(size, delays):
        raise ValueError("metrics down")

    backend = Backend()
    batcher = Batcher(backend, max_batch_size=2, max_queue_delay=0.01, on_batch=broken)
    answers = await asyncio.gather(batcher.submit(request(1)), batcher.submit(request(1)))
    assert len(answers) == 2 and backend.sizes == [2]


# --- bounds --------------------------------------------------------------------------------------


async def test_a_full_queue_refuses_at_once():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=0.2, max_queued=3)
    waiting = [asyncio.ensure_future(batcher.submit(request(1, width=w))) for w in (1, 1, 2)]
    await asyncio.sleep(0)
    assert batcher.queued == 3
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await batcher.submit(request(1))
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 0.05
    batcher.flush()  # sent: the queue is free again
    assert batcher.queued == 0
    await asyncio.gather(*waiting)
    assert sorted(backend.sizes) == [1, 2]
    await batcher.submit(request(1))


async def test_flush_sends_open_batches_now():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=10.0)
    tasks = [asyncio.ensure_future(batcher.submit(request(1))) for _ in range(3)]
    await asyncio.sleep(0)
    batcher.flush()
    await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
    assert backend.sizes == [3]


async def test_one_timer_per_open_batch_and_none_left_behind():
    backend = Backend()
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=0.05)
    now = time.monotonic()
    tasks = [
        asyncio.ensure_future(batcher.submit(request(1), deadline=now + 1 + i / 10))
        for i in range(5)
    ]
    await asyncio.sleep(0)
    [batch] = batcher._open.values()
    assert batch.timer is not None and len(batch.members) == 5
    await asyncio.gather(*tasks)
    assert batch.timer is None and not batcher._open and backend.sizes == [5]


def test_settings_are_checked():
    send = Backend()
    with pytest.raises(ValueError):
        Batcher(send, max_batch_size=0, max_queue_delay=0.01)
    with pytest.raises(ValueError):
        Batcher(send, max_batch_size=4, max_queue_delay=-1)
    with pytest.raises(ValueError):
        Batcher(send, max_batch_size=4, max_queue_delay=0.01, max_queued=0)
    with pytest.raises(ValueError):
        Batcher(send, max_batch_size=4, max_queue_delay=0.01, max_in_flight=0)


# -- adaptive dispatch (max_in_flight): idle callers never wait, batches grow with load -----------


async def test_adaptive_a_call_to_an_idle_backend_goes_at_once_alone():
    backend, recorder = Backend(), Recorder()
    batcher = Batcher(
        backend, max_batch_size=8, max_queue_delay=1.0, max_in_flight=1, on_batch=recorder
    )
    started = time.monotonic()
    for k in range(3):  # one after another: each finds the backend idle
        assert same(await batcher.submit(request(2, start=k)), model(request(2, start=k)))
    assert time.monotonic() - started < SLACK  # the 1 s queue delay was never waited
    assert backend.sizes == [2, 2, 2] and [size for size, _ in recorder.batches] == [2, 2, 2]
    assert all(delays == [0.0] for _, delays in recorder.batches)
    assert batcher.in_flight == 0 and batcher.queued == 0


async def test_adaptive_calls_arriving_while_busy_wait_for_company_and_go_together():
    backend = Backend(delay=0.1)
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=0.3, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit(request(1, start=0)))
    await asyncio.sleep(0.02)  # the first call is now at the backend
    started = time.monotonic()
    rest = [asyncio.ensure_future(batcher.submit(request(1, start=k))) for k in range(1, 6)]
    await asyncio.sleep(0)
    assert batcher.in_flight == 1 and batcher.queued == 5
    await asyncio.sleep(0.15)  # the first call has returned: the five still wait for company
    assert backend.sizes == [1] and batcher.queued == 5 and batcher.in_flight == 0
    answers = await asyncio.gather(first, *rest)
    # Two backend calls: the lone first one, then the five as one batch at their queue delay.
    assert backend.sizes == [1, 5]
    assert 0.3 - 0.01 <= time.monotonic() - started < 0.3 + SLACK
    for k, answer in enumerate(answers):
        assert same(answer, model(request(1, start=k)))


async def test_adaptive_allows_max_in_flight_calls_before_queueing():
    backend = Backend(delay=0.1)
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=0.2, max_in_flight=2)
    tasks = [asyncio.ensure_future(batcher.submit(request(1, start=k))) for k in range(5)]
    await asyncio.sleep(0.02)
    assert batcher.in_flight == 2 and batcher.queued == 3
    await asyncio.gather(*tasks)
    assert backend.sizes == [1, 1, 3]


async def test_adaptive_queue_delay_still_bounds_the_wait_behind_a_slow_backend():
    backend = Backend(delay=0.5)
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=0.05, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit(request(1)))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    queued = asyncio.ensure_future(batcher.submit(request(1, start=1)))
    await asyncio.sleep(0.05 + SLACK / 2)
    # Sent at its delay although the backend was still busy with the first call.
    assert len(backend.requests) == 2 and time.monotonic() - started < 0.5
    await asyncio.gather(first, queued)


async def test_adaptive_full_batches_still_leave_at_once():
    backend = Backend(delay=0.1)
    batcher = Batcher(backend, max_batch_size=4, max_queue_delay=5.0, max_in_flight=1)
    tasks = [asyncio.ensure_future(batcher.submit(request(1, start=k))) for k in range(9)]
    await asyncio.sleep(0.02)
    # 1 alone, then two full batches of 4 sent over the in-flight bound (a full batch never waits)
    assert backend.sizes == [1, 4, 4]
    await asyncio.gather(*tasks)


async def test_adaptive_a_cancelled_lone_call_frees_its_slot():
    backend = Backend(delay=1.0)
    batcher = Batcher(backend, max_batch_size=64, max_queue_delay=0.2, max_in_flight=1)
    lone = asyncio.ensure_future(batcher.submit(request(1)))
    await asyncio.sleep(0.01)
    assert batcher.in_flight == 1
    lone.cancel()
    await asyncio.sleep(0.01)
    assert backend.cancelled == 1 and batcher.in_flight == 0
    fast = Backend()
    batcher._send = fast  # the next call finds the backend free: it goes at once
    started = time.monotonic()
    assert same(await batcher.submit(request(1, start=3)), model(request(1, start=3)))
    assert time.monotonic() - started < 0.1 and fast.sizes == [1]


async def test_adaptive_unbatchable_calls_count_as_in_flight():
    backend = Backend(delay=0.1)
    batcher = Batcher(backend, max_batch_size=2, max_queue_delay=0.2, max_in_flight=1)
    big = asyncio.ensure_future(batcher.submit(request(3)))  # over max_batch_size: alone
    await asyncio.sleep(0.01)
    small = asyncio.ensure_future(batcher.submit(request(1)))
    await asyncio.sleep(0.01)
    assert batcher.in_flight == 1 and batcher.queued == 1  # waits behind the big one
    await asyncio.gather(big, small)
    assert backend.sizes == [3, 1]
