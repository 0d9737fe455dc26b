"""Resilience against real faults: real Tritons killed with SIGKILL, and a fault-injecting TCP
proxy (latency, resets, blackholes) between the gateway and a real Triton."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from tests.backends.triton import TritonServer
from tests.builders import oip_stub, triton_backend, variant
from tests.conftest import DEMO_MODELS
from tests.faults.proxy import FaultProxy
from tests.gateway_process import GatewayProcess
from tests.loadgen import Results, infer, metric, run_load, scrape
from tests.oip import Y_V1, linear_request, output

FAST_HEALTH = {"health_check_interval": "0.5s", "shutdown_grace": "2s"}


@pytest.fixture(scope="module")
def killable_triton():
    with TritonServer(DEMO_MODELS) as server:
        yield server


async def test_kill_9_primary_under_load_fallback_hides_it_and_breaker_cycles(
    triton, killable_triton
):
    config = {
        "backends": [
            triton_backend(killable_triton.address, "primary", per_try_timeout="2s",
                           circuit_breaker={"consecutive_failures": 3, "open_duration": "1s"}),
            triton_backend(triton.address, "spare"),
        ],
        "routes": [{
            "model": "linear",
            "variants": [variant("main", backend="primary"), variant("backup", backend="spare", weight=0)],
            "policy": {"fallback": [{"variant": "backup"}]},
        }],
        "lifecycle": FAST_HEALTH,
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        stop = asyncio.Event()
        live = Results()
        load = asyncio.ensure_future(
            run_load(
                gw.address,
                lambda: linear_request(),
                concurrency=6,
                until=stop,
                timeout=10,
                results=live,
            )
        )
        await asyncio.sleep(1.5)
        killable_triton.kill()  # SIGKILL to Triton and its python-backend stubs
        await asyncio.sleep(3.0)
        opened = metric(
            scrape(gw.metrics_url),
            "tensorgate_breaker_transitions_total",
            backend="primary",
            state="open",
        )
        await asyncio.to_thread(killable_triton.restart)
        # Breaker half-opens after 1 s, a trial succeeds, it closes; traffic returns to "main".
        deadline = time.monotonic() + 20
        while True:
            samples = scrape(gw.metrics_url)
            closed = metric(samples, "tensorgate_breaker_state", backend="primary") == 0
            recent = [o.variant for o in live.outcomes[-50:] if o.code == "OK"]
            if closed and recent and all(v == "main" for v in recent):
                break
            assert time.monotonic() < deadline, "primary never took traffic again after restart"
            await asyncio.sleep(0.2)
        stop.set()
        results = await load
    assert results.errors() == [], results.codes()  # callers saw zero errors
    assert len(results.outcomes) > 500
    assert all(output(o.response) == Y_V1 for o in results.outcomes)
    assert opened >= 1  # the breaker opened while the primary was dead
    degraded = [o for o in results.outcomes if o.degraded]
    assert degraded and all(
        o.degraded == "variant:backup" and o.variant == "backup" for o in degraded
    )
    assert (
        metric(samples, "tensorgate_breaker_transitions_total", backend="primary", state="closed")
        >= 1
    )
    assert metric(
        samples, "tensorgate_fallbacks_total", model="linear", step="variant:backup"
    ) == len(degraded)


@pytest.fixture
def proxy(triton):
    with FaultProxy(triton.address) as p:
        yield p


@pytest.fixture
def proxy_to_killable(killable_triton):
    """Fault proxy in front of this module's own Triton: the deadline test cancels many calls
    mid-flight, and a Triton that misbehaves after that must not take the session's down."""
    with FaultProxy(killable_triton.address) as p:
        yield p


async def test_deadlines_are_honoured_end_to_end(proxy_to_killable):
    proxy = proxy_to_killable
    config = {
        "backends": [triton_backend(proxy.address, "slow", per_try_timeout="10s")],
        "routes": [
            {"model": "linear", "variants": [variant("only", backend="slow")]},
            {
                "model": "capped",
                "variants": [variant("only", backend="slow")],
                "policy": {"timeout": "0.15s"},
            },
        ],
        "lifecycle": FAST_HEALTH,
    }
    with GatewayProcess(config) as gw:
        proxy.set_latency(0.6)
        # Caller deadline 0.2 s; no route timeout.
        results = await run_load(
            gw.address, lambda: linear_request(), concurrency=4, duration=3.0, timeout=0.2
        )
        assert set(results.codes()) == {"DEADLINE_EXCEEDED"}
        # Bounds: never before the deadline; typically just after it; never anywhere near the
        # backend's 0.6 s (p99 slack for a loaded 2-core CI box, where 90 ms stalls happen).
        assert 0.2 <= results.p(0.0) and results.p(0.5) <= 0.25 and results.p(0.99) <= 0.4
        # Route timeout 0.15 s, enforced by the gateway itself (the caller sets no deadline).
        results = await run_load(
            gw.address, lambda: linear_request(model="capped"), concurrency=4, duration=3.0
        )
        assert set(results.codes()) == {"DEADLINE_EXCEEDED"}, results.codes()
        assert 0.15 <= results.p(0.0) and results.p(0.5) <= 0.20 and results.p(0.99) <= 0.35
        proxy.heal()
        ok = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=0.5, timeout=5
        )
        assert ok.codes() == {"OK": len(ok.outcomes)}


async def test_resets_retries_budget_and_breaker_transitions(proxy):
    config = {
        "backends": [triton_backend(proxy.address, "flaky", per_try_timeout="2s",
                                    circuit_breaker={"consecutive_failures": 5, "open_duration": "1s"})],
        "routes": [{"model": "linear", "variants": [variant("only", backend="flaky")],
                    "policy": {"retry": {"max_attempts": 4, "base_delay": "0.005s", "max_delay": "0.02s",
                                         "budget_ratio": 0.5, "budget_min_per_second": 1, "budget_window": "10s"}}}],
        "lifecycle": {"health_check_interval": "30s", "shutdown_grace": "1s"},  # keep probes out of it
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        ok = await run_load(
            gw.address, lambda: linear_request(), concurrency=1, duration=0.3, timeout=5
        )
        assert ok.errors() == []
        proxy.reset()
        failed = await run_load(
            gw.address, lambda: linear_request(), concurrency=1, duration=1.5, timeout=5
        )
        codes = failed.codes()
        assert set(codes) == {"UNAVAILABLE"}, codes
        samples = scrape(gw.metrics_url)
        requests = len(ok.outcomes) + len(failed.outcomes)
        retries = metric(samples, "tensorgate_retries_total", model="linear", code="UNAVAILABLE")
        # Budget: 1/s floor over 10 s + 50% of requests; without a budget it would be 3 per call.
        assert 1 <= retries <= 10 + 0.5 * requests
        assert (
            metric(samples, "tensorgate_breaker_transitions_total", backend="flaky", state="open")
            >= 1
        )
        assert metric(samples, "tensorgate_breaker_rejections_total", backend="flaky") > 0
        # While open, calls fail fast with a message that says so.
        fast = [o for o in failed.outcomes[-20:]]
        assert max(o.seconds for o in fast) < 0.1
        proxy.heal()
        await asyncio.sleep(1.2)  # open_duration: the next call is a trial
        healed = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=1.0, timeout=5
        )
        assert healed.outcomes[-1].code == "OK"
        # Once the trial call passed, calls go through (before it, the client channel may still
        # be in its reconnect backoff after the resets: longer on a loaded machine).
        codes = [o.code for o in healed.outcomes]
        after_trial = codes[codes.index("OK") :]
        assert after_trial.count("OK") >= len(after_trial) - 2, codes
        samples = scrape(gw.metrics_url)
        assert metric(samples, "tensorgate_breaker_state", backend="flaky") == 0
        for state in ("open", "half-open", "closed"):
            assert (
                metric(
                    samples, "tensorgate_breaker_transitions_total", backend="flaky", state=state
                )
                >= 1
            )


async def test_open_breaker_fails_over_at_once_and_is_never_retried(proxy, triton):
    """Primary unreachable, breaker open, retry(max_attempts 3) and a fallback: the breaker's own
    fail-fast refusals are handed to fallback at once, never retried (issue #8 item 7: they were,
    7,707 times in 20 s, each after a backoff sleep)."""
    static = {
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3], "fp_values": [0, 0, 0]}
        ]
    }
    config = {
        "backends": [
            triton_backend(proxy.address, "primary", per_try_timeout="2s",
                           circuit_breaker={"consecutive_failures": 3, "open_duration": "2s"}),
            triton_backend(triton.address, "spare"),
        ],
        "routes": [{
            "model": "linear",
            "variants": [variant("main", backend="primary"), variant("backup", backend="spare", weight=0)],
            "policy": {"retry": {"max_attempts": 3},  # default backoff: 25 ms base, 250 ms cap
                       "fallback": [{"variant": "backup"}, {"static_response": static}]},
        }],
        "lifecycle": {"health_check_interval": "30s", "shutdown_grace": "1s"},  # keep probes out
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        await run_load(gw.address, lambda: linear_request(), concurrency=2, duration=0.5, timeout=5)
        healthy = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=2.0, timeout=5
        )
        proxy.refuse()
        # Trip the breaker: these first calls fail for real on the primary and are retried.
        tripping = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=0.5, timeout=5
        )
        before = scrape(gw.metrics_url)
        failed_over = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=4.0, timeout=5
        )
        after = scrape(gw.metrics_url)

    def grew(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert healthy.errors() == [] and tripping.errors() == [] and failed_over.errors() == []
    assert all(o.degraded == "variant:backup" for o in failed_over.outcomes)
    assert all(output(o.response) == Y_V1 for o in failed_over.outcomes)
    rejections = grew("tensorgate_breaker_rejections_total", backend="primary")
    retries = grew("tensorgate_retries_total", model="linear", code="UNAVAILABLE")
    fallbacks = grew("tensorgate_fallbacks_total", model="linear", step="variant:backup")
    base_p99, p99 = healthy.p(0.99), failed_over.p(0.99)
    print(
        f"\nhealthy p99 {base_p99 * 1000:.1f} ms; primary down: {len(failed_over.outcomes)} calls, "
        f"p50 {failed_over.p(0.5) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {failed_over.p(1.0) * 1000:.1f} ms; breaker rejections {rejections:.0f}, "
        f"retries {retries:.0f}, fallbacks {fallbacks:.0f}"
    )
    assert fallbacks == len(failed_over.outcomes)
    # Every call was refused by the breaker at least once (half-open trials aside); none of those
    # refusals was retried. The only retries are after a failed half-open trial (one per 2 s),
    # and a retry the re-opened breaker refuses is not counted as sent.
    assert rejections >= len(failed_over.outcomes) - 5 and rejections > 200
    assert retries <= 4
    # A fallback answer costs about one backend call, not a retry's backoff sleeps on top (before
    # the fix: p50 42 ms, p99 77 ms). The p99 bound leaves room for a machine shared with other
    # test runs (27 ms seen there, healthy p99 13 ms), still half the unfixed p99.
    assert failed_over.p(0.5) < 0.010
    assert p99 < max(0.040, 2 * base_p99), (base_p99, p99)


async def test_bulkhead_rejects_overflow_fast_when_backend_hangs(proxy):
    config = {
        "backends": [triton_backend(proxy.address, "hung", per_try_timeout="3s", bulkhead={"max_concurrency": 4, "max_queue": 2})],
        "routes": [{"model": "linear", "variants": [variant("only", backend="hung")], "policy": {"retry": {"max_attempts": 1}}}],
        "lifecycle": {"health_check_interval": "30s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        warm = await run_load(
            gw.address, lambda: linear_request(), concurrency=1, duration=0.2, timeout=5
        )
        assert warm.errors() == []
        proxy.blackhole()
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            hanging = [
                asyncio.ensure_future(infer(stub, linear_request(), timeout=10)) for _ in range(6)
            ]
            await asyncio.sleep(0.3)
            extra = await asyncio.gather(
                *(infer(stub, linear_request(), timeout=10) for _ in range(4))
            )
            assert [o.code for o in extra] == ["RESOURCE_EXHAUSTED"] * 4
            assert max(o.seconds for o in extra) < 0.1
            done = await asyncio.gather(*hanging)
        assert {o.code for o in done} == {"DEADLINE_EXCEEDED"}  # per-try timeout 3 s
        # 4 held a slot until the 3 s per-try timeout; 2 waited in the queue, then got 3 s more.
        times = sorted(o.seconds for o in done)
        assert all(2.9 <= t <= 4.0 for t in times[:4]) and all(5.9 <= t <= 7.5 for t in times[4:])
        assert (
            metric(scrape(gw.metrics_url), "tensorgate_bulkhead_rejections_total", backend="hung")
            == 4
        )


async def test_blast_radius_hung_backend_does_not_slow_others(proxy, triton):
    config = {
        "backends": [
            triton_backend(proxy.address, "a", per_try_timeout="5s", bulkhead={"max_concurrency": 8, "max_queue": 4}),
            triton_backend(triton.address, "b"),
        ],
        "routes": [
            {"model": "on-a", "variants": [variant("only", backend="a")], "policy": {"retry": {"max_attempts": 1}}},
            {"model": "on-b", "variants": [variant("only", backend="b")]},
        ],
        "lifecycle": {"health_check_interval": "30s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        await run_load(
            gw.address, lambda: linear_request(model="on-b"), concurrency=4, duration=1.0, timeout=5
        )
        baseline = await run_load(
            gw.address, lambda: linear_request(model="on-b"), concurrency=4, duration=4.0, timeout=5
        )
        proxy.blackhole()
        hung, during = await asyncio.gather(
            run_load(
                gw.address,
                lambda: linear_request(model="on-a"),
                concurrency=16,
                duration=4.0,
                timeout=3,
                pause_after_error=0.05,
            ),
            run_load(
                gw.address,
                lambda: linear_request(model="on-b"),
                concurrency=4,
                duration=4.0,
                timeout=5,
            ),
        )
    assert during.errors() == []
    # Hung calls time out, overflow is shed by the bulkhead, then the breaker opens and fails fast.
    assert {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"} >= set(hung.codes())
    assert "RESOURCE_EXHAUSTED" in hung.codes()
    base_p99, hurt_p99 = baseline.p(0.99), during.p(0.99)
    print(f"on-b p99 baseline {base_p99 * 1000:.1f} ms, with on-a hung {hurt_p99 * 1000:.1f} ms")
    assert hurt_p99 <= 2 * base_p99, (base_p99, hurt_p99)


async def test_shadow_down_or_slow_leaves_primary_untouched(proxy, triton):
    config = {
        "backends": [triton_backend(triton.address, "main"), triton_backend(proxy.address, "shadow", per_try_timeout="2s")],
        "routes": [{
            "model": "linear",
            "variants": [variant("live", backend="main"), variant("candidate", backend="shadow", weight=0)],
            "policy": {"shadow": {"variant": "candidate", "fraction": 1.0, "max_concurrency": 4}},
        }],
        "lifecycle": {"health_check_interval": "30s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        await run_load(
            gw.address, lambda: linear_request(version=""), concurrency=4, duration=1.0, timeout=5
        )
        healthy = await run_load(
            gw.address, lambda: linear_request(), concurrency=4, duration=3.0, timeout=5
        )
        samples = scrape(gw.metrics_url)
        assert (
            metric(
                samples,
                "tensorgate_shadow_requests_total",
                model="linear",
                variant="candidate",
                outcome="ok",
            )
            > 50
        )
        # Same model behind both: identical outputs, every argmax agrees.
        assert (
            metric(
                samples,
                "tensorgate_shadow_max_abs_diff_sum",
                model="linear",
                variant="candidate",
                output="OUTPUT0",
            )
            == 0
        )
        assert (
            metric(
                samples,
                "tensorgate_shadow_argmax_total",
                model="linear",
                variant="candidate",
                output="OUTPUT0",
                agree="false",
            )
            == 0
        )
        proxy.set_latency(1.0)
        slow = await run_load(
            gw.address, lambda: linear_request(), concurrency=4, duration=3.0, timeout=5
        )
        proxy.refuse()
        down = await run_load(
            gw.address, lambda: linear_request(), concurrency=4, duration=3.0, timeout=5
        )
        samples = scrape(gw.metrics_url)
    for phase in (healthy, slow, down):
        assert phase.errors() == []
        assert all(o.variant == "live" and output(o.response) == Y_V1 for o in phase.outcomes)
    base = healthy.p(0.99)
    print(
        f"primary p99: shadow healthy {base * 1000:.1f} ms, slow {slow.p(0.99) * 1000:.1f}, down {down.p(0.99) * 1000:.1f}"
    )
    assert slow.p(0.99) <= 2 * base and down.p(0.99) <= 2 * base
    assert (
        metric(
            samples,
            "tensorgate_shadow_requests_total",
            model="linear",
            variant="candidate",
            outcome="dropped",
        )
        > 0
    )
    assert (
        metric(
            samples,
            "tensorgate_shadow_requests_total",
            model="linear",
            variant="candidate",
            outcome="error",
        )
        > 0
    )


async def test_hedge_answers_from_the_fast_variant(proxy, triton):
    config = {
        "backends": [triton_backend(proxy.address, "slow"), triton_backend(triton.address, "fast")],
        "routes": [{
            "model": "linear",
            "variants": [variant("first", backend="slow", weight=100), variant("second", backend="fast")],
            "policy": {"hedge": {"delay": "0.05s"}},
        }],
        "lifecycle": {"health_check_interval": "30s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        await run_load(gw.address, lambda: linear_request(), concurrency=2, duration=0.5, timeout=5)
        proxy.set_latency(0.5)
        results = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=2.0, timeout=5
        )
        samples = scrape(gw.metrics_url)
    assert results.errors() == []
    hedged = [o for o in results.outcomes if o.variant == "second"]
    assert len(hedged) >= 0.9 * len(results.outcomes)
    assert results.p(0.9) < 0.3  # well under the slow variant's 0.5 s
    assert (
        metric(samples, "tensorgate_hedges_total", model="linear", winner="second")
        >= len(hedged) * 0.9
    )


async def test_unhealthy_variant_gets_no_traffic_until_it_recovers(proxy, triton):
    config = {
        "backends": [triton_backend(proxy.address, "flaky"), triton_backend(triton.address, "steady")],
        "routes": [
            {"model": "linear", "variants": [variant("x", backend="flaky"), variant("y", backend="steady")]},
            {"model": "lonely", "variants": [variant("only", backend="flaky")]},
            {"model": "guarded", "variants": [variant("only", backend="flaky")],
             "policy": {"fallback": [{"static_response": {"outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3], "fp_values": [0, 0, 0]}]}}]}},
        ],
        "lifecycle": {"health_check_interval": "0.3s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config) as gw, oip_stub(gw.address) as stub:
        before = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=1.0, timeout=5
        )
        assert {o.variant for o in before.outcomes} == {"x", "y"}
        proxy.refuse()
        await asyncio.sleep(1.5)  # a probe round or two
        during = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=1.0, timeout=5
        )
        assert during.errors() == [] and {o.variant for o in during.outcomes} == {"y"}
        # "lonely" has no healthy variant and no fallback: it is not ready, but the gateway
        # stays ready for the models that can answer (blast radius); "guarded" can still
        # answer (static fallback), so it is ready.
        assert stub.ServerReady(oip.ServerReadyRequest()).ready
        assert not stub.ModelReady(oip.ModelReadyRequest(name="lonely")).ready
        assert stub.ModelReady(oip.ModelReadyRequest(name="guarded")).ready
        assert stub.ModelReady(oip.ModelReadyRequest(name="linear")).ready
        proxy.heal()
        deadline = time.monotonic() + 10
        while not stub.ModelReady(oip.ModelReadyRequest(name="lonely")).ready:
            assert time.monotonic() < deadline, "never recovered"
            await asyncio.sleep(0.1)
        after = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=1.0, timeout=5
        )
        assert after.errors() == [] and {o.variant for o in after.outcomes} == {"x", "y"}
