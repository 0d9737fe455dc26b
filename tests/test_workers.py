"""`tensorgate serve --workers N` in front of a real Triton: both workers serve, one scrape counts
every call once, SIGTERM drains every worker, the admin API is served once and its changes reach
both workers, a dead worker comes back, and workers do not outlive a killed supervisor.

Balancing is per connection (SO_REUSEPORT hashes each new connection to one worker's socket), so
the tests open one TCP connection per channel: grpc shares a connection between channels with the
same target and arguments unless told otherwise (OWN_CONNECTION)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from tritonclient.grpc import service_pb2_grpc

from gateway import cli
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.backends.triton import REPO_ROOT, TritonServer
from tests.builders import triton_backend, variant
from tests.gateway_process import ADMIN_TOKEN, READ_TOKEN, WORKERS_UP, GatewayProcess
from tests.loadgen import Outcome, Results, infer, scrape
from tests.oip import Y_V1, Y_V2, linear_request, output, sleep_request

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
WORKERS = ("0", "1")
ROUTES = [
    {"model": "linear", "variants": [variant("v1")]},
    {"model": "sleep", "variants": [variant("only", backend_model="demo_sleep", backend_version=None)]},
]  # fmt: skip


def config(triton, **lifecycle) -> dict:
    return {
        "backends": [triton_backend(triton.address)],
        "routes": ROUTES,
        "lifecycle": {"drain_delay": "0s", "shutdown_grace": "10s", **lifecycle},
    }


@pytest.fixture(scope="module")
def triton():
    """A Triton of this module's own, not the session's: these tests time calls and drains with
    16 connections at once, and the session's Triton may still be working off what earlier
    modules left queued on it (in full-suite CI runs the calls here timed out; alone, never)."""
    with TritonServer(REPO_ROOT / "deploy" / "demo" / "models") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(triton):
    with GatewayProcess(config(triton), admin=True, workers=2) as gw:
        yield gw


def by_worker(samples: dict, name: str, **match: str) -> dict[str, float]:
    """Sum of the samples called `name` (whose labels include `match`) per worker label."""
    sums: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        labels = dict(labels)
        if sample == name and all(labels.get(k) == v for k, v in match.items()):
            sums[labels["worker"]] = sums.get(labels["worker"], 0.0) + value
    return sums


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {w: after.get(w, 0.0) - before.get(w, 0.0) for w in WORKERS}


async def linear_calls(
    address: str, *, channels: int, calls: int, rounds: int = 1, expect: list[float] = Y_V1
) -> int:
    """`rounds` x `channels` connections, `calls` sequential ModelInfer each, every answer
    `expect`; returns how many calls were made."""
    for _ in range(rounds):
        opened = [
            grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(channels)
        ]
        try:

            async def call_on(channel: grpc.aio.Channel) -> None:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(calls):
                    assert output(await stub.ModelInfer(linear_request(), timeout=10)) == expect

            await asyncio.gather(*(call_on(c) for c in opened))
        finally:
            await asyncio.gather(*(c.close() for c in opened))
    return rounds * channels * calls


def listening_pids(port: int, pids: list[int]) -> set[int]:
    """Which of `pids` hold a listening TCP socket on `port` (IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    owners.add(pid)
            except OSError:
                pass
    return owners


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.1)


# ----------------------------------------------------------------------------- one gateway


def test_one_channel_stays_with_one_worker(gateway):
    """Balancing is per connection: 200 calls on one channel are all served by one worker."""
    before = by_worker(scrape(gateway.metrics_url), "tensorgate_requests_total")
    asyncio.run(linear_calls(gateway.address, channels=1, calls=200))
    served = delta(by_worker(scrape(gateway.metrics_url), "tensorgate_requests_total"), before)
    assert sorted(served.values()) == [0.0, 200.0], served


def test_both_workers_serve_calls_spread_over_connections(gateway):
    """128 connections (8 rounds of 16 channels), 8 calls each: each worker serves >= 30%.

    The kernel hashes each connection to a worker at random, so the share is a binomial draw
    over connections: with 8 connections one worker gets < 30% of them 29% of the time, with 32
    2%, with 128 about 5 in a million (the test's odds of failing by chance)."""
    before = by_worker(scrape(gateway.metrics_url), "tensorgate_requests_total")
    sent = asyncio.run(linear_calls(gateway.address, channels=16, calls=8, rounds=8))
    served = delta(by_worker(scrape(gateway.metrics_url), "tensorgate_requests_total"), before)
    assert sum(served.values()) == sent == 1024
    for worker in WORKERS:
        assert served[worker] >= 0.3 * sent, served


def test_one_scrape_counts_every_call_once(gateway):
    """The supervisor's /metrics is every worker's, labelled: counters and histograms sum to
    exactly the calls made; per-worker gauges say each worker is ready and was scraped."""
    names = (
        "tensorgate_requests_total",
        "tensorgate_request_duration_seconds_count",
        "tensorgate_request_duration_seconds_bucket",
    )
    inf = {"le": "+Inf"}
    before = scrape(gateway.metrics_url)
    sent = asyncio.run(linear_calls(gateway.address, channels=16, calls=20))
    after = scrape(gateway.metrics_url)
    for name in names:
        match = inf if name.endswith("_bucket") else {}
        counted = delta(by_worker(after, name, **match), by_worker(before, name, **match))
        assert sum(counted.values()) == sent == 320, (name, counted)
    assert by_worker(after, "tensorgate_ready") == {"0": 1.0, "1": 1.0}
    assert by_worker(after, "tensorgate_worker_up") == {"0": 1.0, "1": 1.0}
    assert by_worker(after, "tensorgate_worker_restarts_total") == {"0": 0.0, "1": 0.0}


def test_admin_listener_is_served_once(gateway):
    """The data plane is one port held by both workers; the admin API by worker 0 alone, and it
    answers; the metrics listener by the supervisor."""
    pids = gateway.pids()
    supervisor = gateway.proc.pid
    workers = set(pids) - {supervisor}
    assert len(workers) == 2, pids
    data_port = int(gateway.address.rpartition(":")[2])
    admin_port = int(gateway.admin_address.rpartition(":")[2])
    assert listening_pids(data_port, pids) == workers
    admin = listening_pids(admin_port, pids)
    worker0 = int(re.search(r"worker 0 \(pid (\d+)\) serving", gateway.log()).group(1))
    assert admin == {worker0}, (admin, workers)
    assert listening_pids(gateway.metrics_port, pids) == {supervisor}
    with grpc.insecure_channel(gateway.admin_address) as channel:
        table = admin_pb2_grpc.AdminServiceStub(channel).GetRouteTable(
            admin_pb2.GetRouteTableRequest(),
            metadata=(("authorization", f"Bearer {READ_TOKEN}"),),
            timeout=5,
        )
    assert {route.model for route in table.routes} == {"linear", "sleep"}


def test_an_admin_change_reaches_every_worker(triton):
    """Weights changed through worker 0's admin API: both workers serve the new weights (they
    follow the revision store)."""
    variants = [variant("v1"), variant("v2", backend_version="2", version="2", weight=0)]
    settings = {**config(triton), "routes": [{"model": "linear", "variants": variants}]}
    with GatewayProcess(settings, admin=True, workers=2) as gw:
        with grpc.insecure_channel(gw.admin_address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).SetVariantWeights(
                admin_pb2.SetVariantWeightsRequest(model="linear", weights={"v1": 0, "v2": 1}),
                metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
                timeout=5,
            )

        async def answers() -> set[tuple[float, ...]]:
            opened = [
                grpc.aio.insecure_channel(gw.address, options=OWN_CONNECTION) for _ in range(16)
            ]
            try:
                stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in opened]
                replies = await asyncio.gather(
                    *(s.ModelInfer(linear_request(), timeout=10) for s in stubs)
                )
            finally:
                await asyncio.gather(*(c.close() for c in opened))
            return {tuple(output(r)) for r in replies}

        wait_until(lambda: asyncio.run(answers()) == {tuple(Y_V2)}, 10, "v2 everywhere")
        before = by_worker(scrape(gw.metrics_url), "tensorgate_requests_total", variant="v2")
        asyncio.run(linear_calls(gw.address, channels=16, calls=4, expect=Y_V2))
        after = by_worker(scrape(gw.metrics_url), "tensorgate_requests_total", variant="v2")
        served = delta(after, before)
        assert sum(served.values()) == 64 and min(served.values()) > 0, served


# ----------------------------------------------------------------------------- lifecycle


def test_sigterm_drains_every_worker_and_exits_zero(triton):
    """16 connections, each with a closed loop of short calls and, after 1 s, one 1 s sleep call
    (Triton runs 4 at a time: the last ones finish ~4 s later); once both workers have sleep
    calls in flight, SIGTERM to the supervisor alone (it forwards it). Every accepted call is
    answered OK, none is CANCELLED, calls sent before the signal are OK or UNAVAILABLE
    (retryable), calls keep being served during drain_delay; the supervisor exits 0 and leaves
    no process behind."""
    gw = GatewayProcess(config(triton, drain_delay="1s"), workers=2).start()
    try:

        async def scenario() -> tuple[list[Outcome], Results, float]:
            channels = [
                grpc.aio.insecure_channel(gw.address, options=OWN_CONNECTION) for _ in range(16)
            ]
            stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
            results = Results()
            stop = asyncio.Event()

            async def closed_loop(stub) -> None:
                while not stop.is_set():
                    outcome = await infer(stub, linear_request(), timeout=10)
                    results.outcomes.append(outcome)
                    if outcome.code != "OK":
                        await asyncio.sleep(0.01)

            loops = [asyncio.ensure_future(closed_loop(s)) for s in stubs]
            await asyncio.sleep(1.0)
            sleeps = [
                asyncio.ensure_future(infer(s, sleep_request(1.0), timeout=30)) for s in stubs
            ]
            sleeping: dict[str, float] = {}
            deadline = time.monotonic() + 3
            while not all(sleeping.get(w, 0) > 0 for w in WORKERS):
                assert time.monotonic() < deadline, f"sleep calls in flight by worker: {sleeping}"
                samples = await asyncio.to_thread(scrape, gw.metrics_url)
                sleeping = by_worker(samples, "tensorgate_requests_in_flight", model="sleep")
                await asyncio.sleep(0.05)
            signalled = time.monotonic()
            os.kill(gw.proc.pid, signal.SIGTERM)
            slept = await asyncio.gather(*sleeps)
            await asyncio.sleep(max(0.0, signalled + 2.5 - time.monotonic()))
            stop.set()
            await asyncio.gather(*loops)
            await asyncio.gather(*(c.close() for c in channels))
            return slept, results, signalled

        slept, results, signalled = asyncio.run(scenario())
        assert [o.code for o in slept] == ["OK"] * 16
        codes = results.codes()
        assert "CANCELLED" not in codes, codes
        before = [o for o in results.outcomes if o.started < signalled]
        assert len(before) > 50
        assert {o.code for o in before} <= {"OK", "UNAVAILABLE"}, codes
        assert any(o.code == "OK" and o.started > signalled + 0.5 for o in results.outcomes)
        assert gw.proc.wait(20) == 0, gw.log()
        assert "all 2 workers stopped" in gw.log()
        assert wait_until(lambda: not gw.pids(), 5, "all gone") is True
    finally:
        gw.stop()


def test_a_dead_worker_is_restarted(triton):
    gw = GatewayProcess(config(triton), workers=2).start()
    try:
        victim = int(re.search(r"worker 1 \(pid (\d+)\) serving", gw.log()).group(1))
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                by_worker(scrape(gw.metrics_url), "tensorgate_worker_restarts_total")
                == {"0": 0.0, "1": 1.0}
                and len(re.findall(r"worker 1 \(pid \d+\) serving", gw.log())) == 2
            ),
            15,
            "restarted",
        )
        assert f"worker 1 (pid {victim}) exited with signal 9 unasked: restarting it" in gw.log()
        asyncio.run(linear_calls(gw.address, channels=16, calls=4))
        samples = scrape(gw.metrics_url)
        assert by_worker(samples, "tensorgate_worker_up") == {"0": 1.0, "1": 1.0}
        assert set(by_worker(samples, "tensorgate_requests_total")) == set(WORKERS)
        gw.terminate()
        assert gw.proc.wait(20) == 0, gw.log()
    finally:
        gw.stop()


def test_workers_do_not_outlive_a_killed_supervisor(triton):
    gw = GatewayProcess(config(triton), workers=2).start()
    try:
        assert len(gw.pids()) == 3
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(5)
        assert wait_until(lambda: not gw.pids(), 10, "all gone") is True
        assert gw.log().count("the supervisor is gone: draining") == 2
    finally:
        gw.stop()


# ----------------------------------------------------------------------------- no backend needed


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_workers_must_be_1_to_64(value, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--config", "unused.yaml", "--workers", value])
    assert exited.value.code == 2
    assert "--workers: must be a whole number from 1 to 64" in capsys.readouterr().err


def test_a_port_another_gateway_shares_is_refused(tmp_path):
    """A listener with SO_REUSEPORT on the port (another `serve --workers`, say): the workers
    would join it; the supervisor refuses to start instead."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        address = f"127.0.0.1:{other.getsockname()[1]}"
        path = tmp_path / "gateway.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "listeners": {"data_plane": address, "metrics": "off"},
                    "backends": [triton_backend("127.0.0.1:9")],
                    "routes": ROUTES,
                }
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "-c", str(path), "--workers", "2"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"cannot listen on {address} (listeners.data_plane): address in use?" in done.stderr
    assert WORKERS_UP not in done.stderr
