"""The Redis Streams job queue against its three faults, with real processes: two gateways sharing
a real redis-server (AOF on) in front of a real Triton.

- 100 jobs on demo_sleep, one gateway killed -9 mid-way: every job succeeds, once, none lost.
- Redis restarted during the run: queued jobs survive; submits during the outage get
  UNAVAILABLE naming the queue (never an acknowledgement Redis did not store).
- A poisoned job (demo_fail with a negative input) is dead-lettered after max_deliveries, with
  its reason in the dead-letter stream, and does not block the others."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
import redis

from tensorgate.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.backends.redis import RedisServer
from tests.builders import triton_backend, variant
from tests.gateway_process import GatewayProcess
from tests.loadgen import metric, scrape
from tests.oip import sleep_request

S = jobs_pb2
FINAL = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED, S.JOB_STATE_EXPIRED}
PREFIX = "tg-test"


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def fresh(redis_server):
    """An empty Redis for each test (the fleet's state is the queue's)."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    return redis_server


def config(triton, redis_address: str, **jobs) -> dict:
    sleep = {"backend_model": "demo_sleep", "backend_version": ""}
    return {
        "backends": [triton_backend(triton.address, circuit_breaker={"disabled": True})],
        "routes": [
            {"model": "sleep", "variants": [variant("only", **sleep)]},
            {
                "model": "fail",
                "variants": [variant("only", backend_model="demo_fail", backend_version="")],
            },
        ],
        "jobs": {
            "redis": {"address": redis_address, "key_prefix": PREFIX, "timeout": "1s"},
            "visibility_timeout": "2s",
            "max_deliveries": 3,
            "concurrency": 4,
            **jobs,
        },
        "lifecycle": {"shutdown_grace": "1s", "drain_delay": "0s"},
    }


def stub_for(gateway, channels: list):
    channel = grpc.insecure_channel(gateway.address)
    channels.append(channel)
    return jobs_pb2_grpc.JobsServiceStub(channel)


def submit(stub, seconds: float, model: str = "sleep", **options) -> str:
    request = S.InferRequest.FromString(sleep_request(seconds, model=model).SerializeToString())
    return stub.Submit(S.SubmitRequest(request=request, **options), timeout=10).job.id


def settle_all(stub, ids, timeout: float) -> dict[str, S.Job]:
    """Every job's final state, polled with Get (through Redis outages: UNAVAILABLE is retried)."""
    deadline, done = time.monotonic() + timeout, {}
    while len(done) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id in done:
                continue
            try:
                job = stub.Get(S.GetRequest(id=job_id), timeout=5).job
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                break
            if job.state in FINAL:
                done[job_id] = job
        time.sleep(0.2)
    missing = [i for i in ids if i not in done]
    assert not missing, f"{len(missing)} jobs never finished"
    return done


def echoed(job: S.Job) -> float:
    return float(np.frombuffer(job.result.raw_output_contents[0], dtype=np.float32)[0])


def test_a_gateway_killed_mid_way_loses_no_job(triton, fresh):
    channels: list = []
    cfg = config(triton, fresh.address)
    with GatewayProcess(cfg) as a, GatewayProcess(cfg) as b:
        stub_a, stub_b = stub_for(a, channels), stub_for(b, channels)
        # Distinct inputs, echoed back: each result says which job it answers.
        inputs = {}
        for i in range(100):
            seconds = float(np.float32(0.2 + i / 10_000))
            inputs[submit(stub_a if i % 2 else stub_b, seconds)] = seconds
        ids = list(inputs)
        # Mid-way: once a third has finished, b dies with jobs in its hands.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [stub_a.Get(S.GetRequest(id=i), timeout=5).job.state for i in ids]
            if states.count(S.JOB_STATE_SUCCEEDED) >= 30:
                break
            time.sleep(0.1)
        # Both gateways consume: b has finished jobs of its own before it dies.
        finished_on_b = metric(scrape(b.metrics_url), "tensorgate_jobs_finished_total",
                               model="sleep", state="succeeded")  # fmt: skip
        assert finished_on_b >= 1
        os.killpg(b.proc.pid, signal.SIGKILL)
        b.proc.wait()
        jobs = settle_all(stub_a, ids, timeout=90)
        assert all(j.state == S.JOB_STATE_SUCCEEDED for j in jobs.values())
        assert all(echoed(jobs[i]) == inputs[i] for i in ids)  # each its own answer
        # b held jobs when it died: they ran again on a, after the visibility timeout.
        assert any(j.deliveries >= 2 for j in jobs.values())
        assert (
            metric(scrape(a.metrics_url), "tensorgate_jobs_redeliveries_total", model="sleep") >= 1
        )
        # Exactly once from the caller's view: List shows each job once, succeeded.
        listed, token = [], ""
        while True:
            page = stub_a.List(
                S.ListRequest(model="sleep", page_size=40, page_token=token), timeout=10
            )
            listed += [j.id for j in page.jobs if j.state == S.JOB_STATE_SUCCEEDED]
            token = page.next_page_token
            if not token:
                break
        assert sorted(listed) == sorted(ids)
        b.stop()
    for channel in channels:
        channel.close()


def test_redis_restart_keeps_queued_jobs_and_refuses_submits_while_down(triton, fresh):
    channels: list = []
    with GatewayProcess(config(triton, fresh.address, concurrency=2)) as gw:
        stub = stub_for(gw, channels)
        ids = [submit(stub, 0.5) for _ in range(16)]  # ~4 s of work for 2 consumers
        # The queue gauges read Redis: jobs wait, the oldest for a while, two run.
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            samples = scrape(gw.metrics_url)
            if metric(samples, "tensorgate_jobs_queued", model="sleep") > 0:
                break
            time.sleep(0.2)
        assert metric(samples, "tensorgate_jobs_queued", model="sleep") > 0
        assert metric(samples, "tensorgate_jobs_oldest_queued_age_seconds", model="sleep") > 0
        assert metric(samples, "tensorgate_jobs_running", model="sleep") == 2
        fresh.stop()  # SIGTERM: Redis writes its AOF out and exits
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            submit(stub, 0.1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Refused promptly (redis-py's default retries held it ~6 s per Redis operation).
        assert time.monotonic() - started < 2.0
        assert f"job queue (redis at {fresh.address}) is unavailable" in err.value.details()
        assert metric(scrape(gw.metrics_url), "tensorgate_jobs_queue_errors_total",
                      operation="submit") >= 1  # fmt: skip
        time.sleep(1.0)
        fresh.start()  # the same port, the same AOF
        jobs = settle_all(stub, ids, timeout=60)
        assert all(j.state == S.JOB_STATE_SUCCEEDED for j in jobs.values()), [
            (j.state, j.error.message) for j in jobs.values() if j.state != S.JOB_STATE_SUCCEEDED
        ]
        # Nothing acknowledged during the outage; after it, submits work again.
        assert settle_all(stub, [submit(stub, 0.0)], timeout=20)
    for channel in channels:
        channel.close()


def test_poisoned_job_is_dead_lettered_and_blocks_nothing(triton, fresh):
    channels: list = []
    cfg = config(triton, fresh.address)
    with GatewayProcess(cfg) as a, GatewayProcess(cfg) as b:
        stub = stub_for(a, channels)
        poisoned = submit(stub, -1.0, model="fail", priority=10)  # read first, every time
        stub_b = stub_for(b, channels)
        healthy = [submit(stub_b, 0.2) for _ in range(12)]
        done = settle_all(stub, healthy, timeout=30)
        assert all(j.state == S.JOB_STATE_SUCCEEDED for j in done.values())
        # They finished while the poisoned job still waited for its next delivery.
        assert stub.Get(S.GetRequest(id=poisoned), timeout=5).job.state not in FINAL
        job = settle_all(stub, [poisoned], timeout=30)[poisoned]
        assert job.state == S.JOB_STATE_FAILED and job.deliveries == 3
        assert (
            job.error.status == "INTERNAL" and "demo_fail: INPUT0 must be >= 0" in job.error.message
        )
        assert "dead-lettered after 3 deliveries" in job.error.dead_letter_reason
        client = redis.Redis(port=fresh.port)
        dead = client.xrange(f"{PREFIX}:dead")
        client.close()
        assert [(e[b"id"].decode(), e[b"model"]) for _, e in dead] == [(poisoned, b"fail")]
        assert b"demo_fail" in dead[0][1][b"reason"]
        counted = sum(
            metric(scrape(g.metrics_url), "tensorgate_jobs_dead_lettered_total", model="fail")
            for g in (a, b)
        )
        assert counted == 1
    for channel in channels:
        channel.close()
