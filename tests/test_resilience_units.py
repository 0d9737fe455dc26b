"""Each resilience layer's own logic, with scripted inner services (no processes, no sleeps
beyond a few ms). The same layers are tested against real backends and real faults in
tests/test_resilience_faults.py."""

from __future__ import annotations

import asyncio
import time

import grpc
import prometheus_client as prom
import pytest
from tritonclient.grpc import service_pb2 as oip

from gateway.controlplane.config import from_dict
from gateway.dataplane.layers import breaker, bulkhead, fallback, hedge, retry, shadow
from gateway.dataplane.layers.breaker import BreakerSettings
from gateway.dataplane.layers.bulkhead import BulkheadSettings
from gateway.dataplane.layers.retry.backoff import full_jitter
from gateway.dataplane.layers.retry.budget import RetryBudget
from gateway.dataplane.pipeline import InferCall, InferResult, compose
from gateway.dataplane.routing import RouteTable
from gateway.errors import GatewayError

UNAVAILABLE = GatewayError(grpc.StatusCode.UNAVAILABLE, "down")
INVALID = GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "bad input")


class GatewayMetrics:
    """Every layer's metrics on one registry, as a runtime holds them (each layer module
    declares its own)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        self._parts = [
            breaker.BreakerMetrics(self.registry),
            bulkhead.BulkheadMetrics(self.registry),
            retry.RetryMetrics(self.registry),
            fallback.FallbackMetrics(self.registry),
            hedge.HedgeMetrics(self.registry),
            shadow.ShadowMetrics(self.registry),
        ]

    def __getattr__(self, name: str):
        for part in self._parts:
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(name)


def retry_layer(table, metrics, budgets=None):
    """The retry layer as route "m" of `table` configures it."""
    settings = table.plan("m").settings.retry
    budget = (budgets or retry.RetryBudgets()).for_route("m", settings)
    return retry.retry(settings, budget, metrics)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- backoff and budget ------------------------------------------------------------------------


def test_full_jitter_bounds():
    base, cap = 0.025, 0.25
    for retry_number, ceiling in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)]:
        samples = [full_jitter(retry_number, base, cap) for _ in range(2000)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.9 * ceiling  # uses the whole interval (full jitter)
        assert min(samples) < 0.1 * ceiling
    assert full_jitter(3, base, cap, rand=lambda: 1.0) == pytest.approx(0.1)


def test_retry_budget_ratio_floor_and_window():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10, clock=clock)
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(50)) == 20  # 20% of 100 requests
    clock.now += 11  # the window has moved on: old requests and retries no longer count
    assert not budget.try_spend()
    floor = RetryBudget(ratio=0.2, min_per_second=1, window=10, clock=clock)
    assert sum(floor.try_spend() for _ in range(30)) == 10  # 1/s floor over 10 s, no traffic


# --- breaker -------------------------------------------------------------------------------


async def _fail():
    raise UNAVAILABLE


async def _invalid():
    raise INVALID


async def _ok(delay: float = 0.0):
    await asyncio.sleep(delay)
    return "ok"


async def test_breaker_state_machine():
    metrics = GatewayMetrics()
    cb = breaker.BackendBreaker(
        "b", BreakerSettings(consecutive_failures=3, open_duration=0.2), metrics
    )
    for _ in range(2):
        with pytest.raises(GatewayError):
            await cb.call(_fail)
    with pytest.raises(GatewayError) as err:  # a caller error: the backend answered, so healthy
        await cb.call(_invalid)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert cb.state == "closed"
    for _ in range(3):
        with pytest.raises(GatewayError):
            await cb.call(_fail)
    assert cb.state == "open"
    started = time.perf_counter()
    with pytest.raises(GatewayError) as err:
        await cb.call(lambda: _ok(1.0))
    assert time.perf_counter() - started < 0.05  # fails fast, never calls
    assert "circuit breaker for backend 'b' is open" in err.value.message
    await asyncio.sleep(0.25)
    # Half-open: one trial at a time; concurrent calls fail fast.
    results = await asyncio.gather(
        cb.call(lambda: _ok(0.05)), cb.call(_ok), cb.call(_ok), return_exceptions=True
    )
    assert results[0] == "ok"
    assert all(isinstance(r, GatewayError) for r in results[1:])
    assert cb.state == "closed"
    # A failed trial re-opens.
    for _ in range(3):
        with pytest.raises(GatewayError):
            await cb.call(_fail)
    await asyncio.sleep(0.25)
    with pytest.raises(GatewayError):
        await cb.call(_fail)
    assert cb.state == "open"
    text = metrics.registry.get_sample_value("tensorgate_breaker_state", {"backend": "b"})
    assert text == 2


async def test_breaker_ignores_deadlines_the_caller_set():
    cb = breaker.BackendBreaker("b", BreakerSettings(consecutive_failures=2), GatewayMetrics())

    async def caller_deadline():
        err = GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
        err.budget_ran_out = True
        raise err

    async def per_try_timeout():
        raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "per-try timeout")

    for _ in range(5):
        with pytest.raises(GatewayError):
            await cb.call(caller_deadline)
    assert cb.state == "closed"  # a short caller deadline says nothing about the backend
    for _ in range(2):
        with pytest.raises(GatewayError):
            await cb.call(per_try_timeout)
    assert cb.state == "open"


async def test_breaker_ignores_cancelled_trials():
    cb = breaker.BackendBreaker(
        "b", BreakerSettings(consecutive_failures=1, open_duration=0.05), GatewayMetrics()
    )
    with pytest.raises(GatewayError):
        await cb.call(_fail)
    await asyncio.sleep(0.06)
    task = asyncio.ensure_future(cb.call(lambda: _ok(1.0)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cb.state == "half-open"  # neither closed nor re-opened by a call that never finished
    assert await cb.call(_ok) == "ok"
    assert cb.state == "closed"


async def test_breaker_failure_ratio():
    settings = BreakerSettings(
        consecutive_failures=100, failure_ratio=0.5, minimum_calls=10, window=10
    )
    metrics = GatewayMetrics()
    cb = breaker.BackendBreaker("b", settings, metrics)
    for i in range(10):  # alternate: never 100 in a row, but 50% of calls fail
        with pytest.raises(GatewayError) if i % 2 else _null():
            await cb.call(_fail if i % 2 else _ok)
    assert cb.state == "open"
    # one trip, one transition counted (it was counted twice)
    opened = metrics.registry.get_sample_value(
        "tensorgate_breaker_transitions_total", {"backend": "b", "state": "open"}
    )
    assert opened == 1
    assert metrics.registry.get_sample_value("tensorgate_breaker_state", {"backend": "b"}) == 2


def test_retry_budget_zero_is_kept_when_set():
    def settings(**fields):
        config = from_dict(
            {
                "backends": [{"name": "b", "kind": "BACKEND_KIND_TRITON", "address": "127.0.0.1:9"}],
                "routes": [{"model": "m", "variants": [{"name": "a", "backend": "b", "weight": 1}],
                            "policy": {"retry": fields}}],
            }
        )  # fmt: skip
        return retry.settings(config.routes[0].policy)

    assert settings().budget_ratio == 0.2 and settings().budget_min_per_second == 5
    zero = settings(budget_ratio=0, budget_min_per_second=0)
    assert zero.budget_ratio == 0 and zero.budget_min_per_second == 0
    assert settings(budget_ratio=0.5).budget_ratio == 0.5


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- bulkhead ------------------------------------------------------------------------------


async def test_bulkhead_limits_and_rejects_fast():
    metrics = GatewayMetrics()
    limit = bulkhead.Bulkhead("b", BulkheadSettings(max_concurrency=2, max_queue=1), metrics)
    release = asyncio.Event()

    async def held():
        await release.wait()
        return "ok"

    running = [asyncio.ensure_future(limit.call(held)) for _ in range(3)]  # 2 in flight, 1 queued
    await asyncio.sleep(0.01)
    assert limit.in_flight == 2
    started = time.perf_counter()
    with pytest.raises(GatewayError) as err:
        await limit.call(held)
    assert time.perf_counter() - started < 0.01
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "concurrency limit (2 in flight, 1 queued)" in err.value.message
    release.set()
    assert await asyncio.gather(*running) == ["ok"] * 3
    assert (
        metrics.registry.get_sample_value("tensorgate_bulkhead_rejections_total", {"backend": "b"})
        == 1
    )


# --- retry, fallback, hedge, shadow as composed layers -------------------------------------


def _plan(policy: dict, variants=None):
    variants = variants or [
        {"name": "a", "backend": "ba", "weight": 1},
        {"name": "b", "backend": "bb", "weight": 0},
        {"name": "s", "backend": "bs", "weight": 0},
    ]
    config = from_dict(
        {
            "backends": [
                {"name": n, "kind": "BACKEND_KIND_TRITON", "address": "127.0.0.1:1"}
                for n in ("ba", "bb", "bs")
            ],
            "routes": [
                {"model": "m", "variants": variants, "policy": policy},
                {"model": "small", "variants": [{"name": "tiny", "backend": "bb", "weight": 1}]},
            ],
        }
    )
    return RouteTable(config.routes)


class Script:
    """An inner service answering per backend from a script, recording what it was sent."""

    def __init__(self, **behaviour) -> None:
        self.behaviour = behaviour
        self.calls: list[str] = []

    async def __call__(self, call: InferCall):
        backend = call.target.backend
        self.calls.append(backend)
        action = self.behaviour[backend]
        if isinstance(action, list):
            action = action.pop(0) if len(action) > 1 else action[0]
        if isinstance(action, GatewayError):
            raise action
        if isinstance(action, float):
            await asyncio.sleep(action)
            action = "ok"
        response = oip.ModelInferResponse(id=f"{backend}:{action}")
        return InferResult(response, call.target)


def _call(table: RouteTable, variant: str | None = None) -> InferCall:
    plan = table.plan("m")
    target = plan.variant(variant) if variant else plan.resolve("", None)
    request = oip.ModelInferRequest(model_name="m")
    return InferCall(request=request, model="m", version="", plan=plan, target=target)


async def test_retry_only_retryable_and_bounded_attempts():
    table = _plan({"retry": {"max_attempts": 3, "base_delay": "0.001s", "max_delay": "0.002s"}})
    metrics = GatewayMetrics()
    script = Script(ba=[UNAVAILABLE, UNAVAILABLE, "ok"])
    service = compose(retry_layer(table, metrics), service=script)
    assert (await service(_call(table))).response.id == "ba:ok"
    assert script.calls == ["ba"] * 3
    script = Script(ba=[UNAVAILABLE])
    with pytest.raises(GatewayError):
        await compose(retry_layer(table, metrics), service=script)(_call(table))
    assert len(script.calls) == 3  # max_attempts, not more
    script = Script(ba=[INVALID])
    with pytest.raises(GatewayError) as err:
        await compose(retry_layer(table, metrics), service=script)(_call(table))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and script.calls == ["ba"]


async def test_retry_goes_to_other_variant_and_respects_budget():
    table = _plan(
        {"retry": {"max_attempts": 2, "base_delay": "0.001s", "other_variant": True}},
        variants=[
            {"name": "a", "backend": "ba", "weight": 1000},
            {"name": "b", "backend": "bb", "weight": 1},
        ],
    )
    script = Script(ba=[UNAVAILABLE], bb=["ok"])
    call = _call(table, "a")
    result = await compose(retry_layer(table, GatewayMetrics()), service=script)(call)
    assert result.response.id == "bb:ok"
    assert result.target.variant == "b" and result.attempts == 2
    assert call.target.variant == "a"  # the call itself is never changed
    table = _plan(
        {
            "retry": {
                "max_attempts": 5,
                "base_delay": "0.0001s",
                "budget_ratio": 0.1,
                "budget_min_per_second": 1,
                "budget_window": "1s",
            }
        }
    )
    metrics = GatewayMetrics()
    budgets = retry.RetryBudgets()
    service = compose(retry_layer(table, metrics, budgets), service=Script(ba=[UNAVAILABLE]))
    for _ in range(20):
        with pytest.raises(GatewayError):
            await service(_call(table))
    retries = metrics.registry.get_sample_value(
        "tensorgate_retries_total", {"model": "m", "code": "UNAVAILABLE"}
    )
    # floor 1/s * 1 s + 10% of 20 requests = 3 retries in all, not 20 * 4
    assert retries == 3
    assert (
        metrics.registry.get_sample_value("tensorgate_retry_budget_exhausted_total", {"model": "m"})
        == 20  # every call ended because the budget said no
    )


async def test_breaker_rejection_is_marked_fail_fast():
    cb = breaker.BackendBreaker("b", BreakerSettings(consecutive_failures=1), GatewayMetrics())
    with pytest.raises(GatewayError) as err:
        await cb.call(_fail)
    assert not err.value.fail_fast  # the backend's own failure: it was called
    with pytest.raises(GatewayError) as err:
        await cb.call(_ok)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.fail_fast


async def _open_breakers(metrics: GatewayMetrics, *open_backends: str, closed=()) -> dict:
    """Breakers for backends ba/bb/bs; the named ones opened (one failure, open for 60 s)."""
    breakers = {}
    for name in (*open_backends, *closed):
        settings = BreakerSettings(consecutive_failures=1, open_duration=60)
        breakers[name] = breaker.BackendBreaker(name, settings, metrics)
    for name in open_backends:
        with pytest.raises(GatewayError):
            await breakers[name].call(_fail)
    return breakers


def _counted(metrics: GatewayMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0


async def test_retry_never_retries_a_breaker_fail_fast_on_the_same_backend():
    # Slow backoff: any sleep spent on a refusal would show in the elapsed time.
    table = _plan({"retry": {"max_attempts": 3, "base_delay": "0.2s", "max_delay": "0.2s"}})
    metrics = GatewayMetrics()
    breakers = await _open_breakers(metrics, "ba")
    script = Script(ba=["ok"], bb=["ok"])
    service = compose(
        retry_layer(table, metrics),
        breaker.breaker(lambda: breakers),
        service=script,
    )
    started = time.perf_counter()
    for _ in range(20):
        with pytest.raises(GatewayError) as err:
            await service(_call(table))
        assert err.value.fail_fast
    assert time.perf_counter() - started < 0.1  # 20 refusals, no backoff slept on any
    assert script.calls == []  # no retry after a refusal: "ba" refuses again, up to fallback
    assert _counted(metrics, "tensorgate_breaker_rejections_total", backend="ba") == 20
    assert _counted(metrics, "tensorgate_retries_total", model="m", code="UNAVAILABLE") == 0
    assert _counted(metrics, "tensorgate_retry_budget_exhausted_total", model="m") == 0


async def test_fail_fast_moves_to_another_backend_at_once_without_spending_budget():
    table = _plan(
        {
            "retry": {
                "max_attempts": 2,
                "base_delay": "0.2s",
                "max_delay": "0.2s",
                "other_variant": True,
                "budget_ratio": 0,
                "budget_min_per_second": 1,  # one retry in the 1 s window, no more
                "budget_window": "1s",
            }
        },
        variants=[
            {"name": "a", "backend": "ba", "weight": 100},
            {"name": "a2", "backend": "ba", "weight": 50},  # same backend: refuses too
            {"name": "b", "backend": "bb", "weight": 1},
        ],
    )
    metrics = GatewayMetrics()
    budgets = retry.RetryBudgets()
    breakers = await _open_breakers(metrics, "ba", closed=["bb"])
    script = Script(ba=["ok"], bb=["ok"])
    service = compose(
        retry_layer(table, metrics, budgets), breaker.breaker(lambda: breakers), service=script
    )
    started = time.perf_counter()
    for _ in range(20):
        call = _call(table, "a")
        result = await service(call)
        assert result.response.id == "bb:ok"
        assert result.target.variant == "b"  # "a2" was skipped: its backend refused this call
    assert time.perf_counter() - started < 0.1  # no backoff
    assert script.calls == ["bb"] * 20
    assert _counted(metrics, "tensorgate_breaker_rejections_total", backend="ba") == 20
    # Redirects are not retries: not counted, and the budget's single retry is still there.
    assert _counted(metrics, "tensorgate_retries_total", model="m", code="UNAVAILABLE") == 0
    script.behaviour["bb"] = [UNAVAILABLE, "ok"]
    breakers["bb"] = breaker.BackendBreaker("bb", BreakerSettings(), metrics)
    call = _call(table, "a")
    assert (await service(call)).response.id == "bb:ok"  # refused by ba, failed on bb, retried
    assert _counted(metrics, "tensorgate_retries_total", model="m", code="UNAVAILABLE") == 1
    assert _counted(metrics, "tensorgate_retry_budget_exhausted_total", model="m") == 0


async def test_a_retry_the_breaker_refuses_is_not_counted_as_sent():
    # The first try fails for real and opens the breaker; the retry is then refused.
    table = _plan({"retry": {"max_attempts": 3, "base_delay": "0.001s", "max_delay": "0.001s"}})
    metrics = GatewayMetrics()
    breakers = await _open_breakers(metrics, closed=["ba"])
    script = Script(ba=[UNAVAILABLE])
    service = compose(
        retry_layer(table, metrics),
        breaker.breaker(lambda: breakers),
        service=script,
    )
    with pytest.raises(GatewayError) as err:
        await service(_call(table))
    assert err.value.fail_fast and script.calls == ["ba"]  # one real try, one refusal, no third
    assert _counted(metrics, "tensorgate_breaker_rejections_total", backend="ba") == 1
    assert _counted(metrics, "tensorgate_retries_total", model="m", code="UNAVAILABLE") == 0


def _fallback(table, metrics, other_routes=None):
    shared = fallback.FallbackState(lambda: table, metrics, frozenset, lambda plan: other_routes)
    return fallback.fallback(table.plan("m").settings.fallback, shared)


async def test_fallback_answers_at_once_when_the_primary_breaker_is_open():
    static = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "fp_values": [0.0]}]}
    table = _plan(
        {
            "retry": {"max_attempts": 3, "base_delay": "0.2s", "max_delay": "0.2s"},
            "fallback": [{"variant": "b"}, {"static_response": static}],
        }
    )
    metrics = GatewayMetrics()
    breakers = await _open_breakers(metrics, "ba", "bb")
    service = compose(
        _fallback(table, metrics),
        retry_layer(table, metrics),
        breaker.breaker(lambda: breakers),
        service=Script(ba=["ok"], bb=["ok"]),
    )
    started = time.perf_counter()
    for _ in range(10):
        call = _call(table)
        result = await service(call)
        assert result.degraded == "static" and result.response.outputs[0].name == "y"
        assert result.primary_failure.code == "UNAVAILABLE"
        assert result.primary_failure.target.variant == "a"
    assert time.perf_counter() - started < 0.05
    assert _counted(metrics, "tensorgate_retries_total", model="m", code="UNAVAILABLE") == 0
    assert _counted(metrics, "tensorgate_breaker_rejections_total", backend="ba") == 10


async def test_fallback_chain_and_invalid_never_rescued():
    policy = {
        "fallback": [
            {"variant": "b"},
            {"model": "small"},
            {
                "static_response": {
                    "outputs": [
                        {"name": "y", "datatype": "FP32", "shape": [1, 2], "fp_values": [0.5, 0.5]}
                    ]
                }
            },
        ]
    }
    table = _plan(policy)
    metrics = GatewayMetrics()

    def chain(script):  # a fallback to model "small" runs that route's chain: here the script
        return compose(_fallback(table, metrics, other_routes=script), service=script)

    call = _call(table)
    result = await chain(Script(ba=[UNAVAILABLE], bb=["ok"]))(call)
    assert result.response.id == "bb:ok"
    assert result.degraded == "variant:b" and result.target.variant == "b"
    call = _call(table)
    result = await chain(Script(ba=[UNAVAILABLE], bb=[UNAVAILABLE]))(call)
    assert result.degraded == "static"
    response = result.response
    assert response.outputs[0].name == "y" and response.raw_output_contents[0] == bytes.fromhex(
        "0000003f0000003f"
    )
    script = Script(ba=[INVALID], bb=["ok"])
    with pytest.raises(GatewayError) as err:
        await chain(script)(_call(table))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and script.calls == ["ba"]
    assert (
        metrics.registry.get_sample_value(
            "tensorgate_fallbacks_total", {"model": "m", "step": "static"}
        )
        == 1
    )


async def test_hedge_takes_the_faster_answer():
    table = _plan(
        {"hedge": {"delay": "0.02s"}},
        variants=[
            {"name": "a", "backend": "ba", "weight": 2},
            {"name": "b", "backend": "bb", "weight": 1},
        ],
    )
    metrics = GatewayMetrics()
    service = compose(
        hedge.hedge(table.plan("m").settings.hedge, hedge.LatencyTracker(), metrics),
        service=Script(ba=[0.5], bb=[0.01]),
    )
    call = _call(table, "a")
    started = time.perf_counter()
    result = await service(call)
    assert result.response.id == "bb:ok"
    assert time.perf_counter() - started < 0.2
    assert result.target.variant == "b"
    service = compose(
        hedge.hedge(table.plan("m").settings.hedge, hedge.LatencyTracker(), metrics),
        service=Script(ba=[0.001], bb=[0.001]),
    )
    call = _call(table, "a")
    await service(call)
    assert (
        metrics.registry.get_sample_value(
            "tensorgate_hedges_total", {"model": "m", "winner": "second"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "tensorgate_hedges_total", {"model": "m", "winner": "first"}
        )
        is None
    )


async def test_shadow_never_delays_or_fails_the_primary():
    table = _plan({"shadow": {"variant": "s", "fraction": 1.0, "max_concurrency": 2}})
    metrics = GatewayMetrics()
    runner = shadow.ShadowRunner(metrics, lambda backend: 5.0)
    mirror_path = Script(bs=[1.0])  # slow shadow
    service = compose(
        shadow.shadow(table.plan("m").settings.shadow, runner, lambda: mirror_path),
        service=Script(ba=["ok"]),
    )
    started = time.perf_counter()
    for _ in range(5):
        assert (await service(_call(table))).response.id == "ba:ok"
    assert time.perf_counter() - started < 0.1  # five answers, none waited for the 1 s shadow
    await asyncio.sleep(0)
    assert (
        metrics.registry.get_sample_value(
            "tensorgate_shadow_requests_total", {"model": "m", "variant": "s", "outcome": "dropped"}
        )
        == 3
    )
    failing = compose(
        shadow.shadow(table.plan("m").settings.shadow, runner, lambda: Script(bs=[UNAVAILABLE])),
        service=Script(ba=["ok"]),
    )
    await runner.close()
    assert (await failing(_call(table))).response.id == "ba:ok"
    await asyncio.sleep(0.01)
    assert (
        metrics.registry.get_sample_value(
            "tensorgate_shadow_requests_total", {"model": "m", "variant": "s", "outcome": "error"}
        )
        == 1
    )
    await runner.close()


def test_shadow_comparison_metrics():
    import numpy as np

    metrics = GatewayMetrics()

    def response(rows):
        r = oip.ModelInferResponse()
        array = np.asarray(rows, dtype=np.float32)
        r.outputs.add(name="p", datatype="FP32", shape=list(array.shape))
        r.raw_output_contents.append(array.tobytes())
        return r

    shadow.compare(
        metrics, "m", "s", response([[0.1, 0.9], [0.8, 0.2]]), response([[0.2, 0.8], [0.3, 0.7]])
    )
    get = metrics.registry.get_sample_value
    assert (
        get(
            "tensorgate_shadow_argmax_total",
            {"model": "m", "variant": "s", "output": "p", "agree": "true"},
        )
        == 1
    )
    assert (
        get(
            "tensorgate_shadow_argmax_total",
            {"model": "m", "variant": "s", "output": "p", "agree": "false"},
        )
        == 1
    )
    assert get(
        "tensorgate_shadow_max_abs_diff_sum", {"model": "m", "variant": "s", "output": "p"}
    ) == pytest.approx(0.5, abs=1e-6)
