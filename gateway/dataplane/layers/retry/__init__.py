"""Retry retryable failures with exponential backoff and full jitter, within a retry budget.

A retry may go to another variant of the route (policy `other_variant`), which is what turns a
single sick backend into a latency blip instead of an error.

A breaker's fail-fast refusal (GatewayError.fail_fast) is never retried against the same backend:
the call moves at once to a variant on another backend, or is handed up to fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import prometheus_client as prom

from gateway.dataplane.layers.contract import NOT_ON_DECOUPLED, LayerEnv, OnEnvoy, RouteLayer
from gateway.dataplane.layers.retry.backoff import full_jitter
from gateway.dataplane.layers.retry.budget import RetryBudget
from gateway.dataplane.pipeline import InferCall, InferResult, InferService, Layer
from gateway.durations import seconds
from gateway.errors import NEVER_RETRY, GatewayError
from gateway.observability import tracing
from tensorgate.config.v1 import config_pb2

if TYPE_CHECKING:
    from gateway.dataplane.routing import RoutePlan
from gateway.dataplane.target import Target


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 2
    base_delay: float = 0.025
    max_delay: float = 0.25
    retry_on: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE})
    budget_ratio: float = 0.2
    budget_min_per_second: float = 5.0
    budget_window: float = 10.0
    other_variant: bool = False


def settings(policy: config_pb2.RoutePolicy, route=None) -> RetrySettings:
    r, base = policy.retry, RetrySettings()
    return RetrySettings(
        max_attempts=r.max_attempts or base.max_attempts,
        base_delay=seconds(r.base_delay) if r.HasField("base_delay") else base.base_delay,
        max_delay=seconds(r.max_delay) if r.HasField("max_delay") else base.max_delay,
        retry_on=frozenset(grpc.StatusCode[c] for c in r.retry_on) or base.retry_on,
        # Explicit zeros are kept (no ratio, no floor): the fields are proto3 `optional`.
        budget_ratio=r.budget_ratio if r.HasField("budget_ratio") else base.budget_ratio,
        budget_min_per_second=(
            r.budget_min_per_second
            if r.HasField("budget_min_per_second")
            else base.budget_min_per_second
        ),
        budget_window=(
            seconds(r.budget_window) if r.HasField("budget_window") else base.budget_window
        ),
        other_variant=r.other_variant,
    )


def check(policy: config_pb2.RoutePolicy, at: str, route, models) -> Iterator[tuple[str, str]]:
    retry = policy.retry
    for k, code in enumerate(retry.retry_on):
        if code not in grpc.StatusCode.__members__:
            yield f"{at}.retry.retry_on[{k}]", f"{code!r} is not a gRPC code name"
        elif grpc.StatusCode[code] in NEVER_RETRY:
            yield f"{at}.retry.retry_on[{k}]", f"{code} is a caller error; retrying cannot help"
    if not 0 <= retry.budget_ratio <= 1:
        yield f"{at}.retry.budget_ratio", "must be between 0 and 1"
    if retry.max_attempts > 10:
        yield f"{at}.retry.max_attempts", "must be at most 10"
    for field in ("base_delay", "max_delay", "budget_window"):
        if retry.HasField(field) and seconds(getattr(retry, field)) < 0:
            yield f"{at}.retry.{field}", "must not be negative"


class RetryMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.retries = prom.Counter(
            "tensorgate_retries",
            "Retries sent, by public model and the code that caused them.",
            ("model", "code"),
            registry=registry,
        )
        self.retry_budget_exhausted = prom.Counter(
            "tensorgate_retry_budget_exhausted",
            "Retries not sent because the route's retry budget was used up.",
            ("model",),
            registry=registry,
        )


class RetryBudgets:
    """One budget per route, kept across calls and across route-table revisions (a new budget
    only when the route's retry settings change)."""

    def __init__(self) -> None:
        self._budgets: dict[str, tuple[RetrySettings, RetryBudget]] = {}

    def for_route(self, model: str, settings: RetrySettings) -> RetryBudget:
        entry = self._budgets.get(model)
        if entry is None or entry[0] != settings:
            budget = RetryBudget(
                settings.budget_ratio, settings.budget_min_per_second, settings.budget_window
            )
            entry = self._budgets[model] = (settings, budget)
        return entry[1]


@dataclass(slots=True)
class RetryState:
    metrics: RetryMetrics
    budgets: RetryBudgets


def state(env: LayerEnv) -> RetryState:
    return RetryState(RetryMetrics(env.registry), RetryBudgets())


def build(policy: RetrySettings, shared: RetryState, plan: RoutePlan) -> Layer:
    return retry(policy, shared.budgets.for_route(plan.model, policy), shared.metrics)


# gRPC codes a route may retry -> Envoy's x-envoy-retry-on words for them. Connection failures
# and resets are what the Python path sees as UNAVAILABLE; a per-try timeout is Envoy's 504,
# retried under gateway-error, as the Python path retries a try's DEADLINE_EXCEEDED.
ENVOY_RETRY_ON = {
    "UNAVAILABLE": ("unavailable", "reset", "connect-failure", "refused-stream"),
    "DEADLINE_EXCEEDED": ("deadline-exceeded", "gateway-error"),
    "INTERNAL": ("internal",),
    "RESOURCE_EXHAUSTED": ("resource-exhausted",),
    "CANCELLED": ("cancelled",),
}


def on_envoy(policy: RetrySettings, route) -> OnEnvoy:
    """translated (retry_on, per-try timeout); hands the route to the gateway for codes Envoy
    cannot match and for retry.other_variant"""
    reasons = []
    unmatched = sorted({c.name for c in policy.retry_on} - ENVOY_RETRY_ON.keys())
    if unmatched:
        reasons.append(f"retry.retry_on {unmatched}: Envoy cannot match these gRPC codes")
    if policy.other_variant:
        reasons.append("retry.other_variant: Envoy retries stay on the variant it picked")
    return OnEnvoy(hand_over=tuple(reasons))


LAYER = RouteLayer(
    "retry",
    settings=settings,
    active=lambda s: s.max_attempts > 1,
    state=state,
    build=build,
    envoy=on_envoy,
    fields=("RoutePolicy.retry",),
    decoupled=NOT_ON_DECOUPLED,
    check=check,
)


def retry(policy: RetrySettings, budget: RetryBudget, metrics: RetryMetrics) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def retried(call: InferCall) -> InferResult:
            budget.record_request()
            target = call.target
            tried = [target]
            refused: set[str] = set()  # backends whose breaker failed this call fast
            attempt = 1  # tries that reached a backend (or may have): what max_attempts bounds
            pending = ""  # code of a retry paid for but not yet seen to reach a backend
            while True:
                attempt_call = call if target is call.target else call.to(target)
                try:
                    if attempt > 1:
                        with tracing.step("retry"):
                            result = await inner(attempt_call)
                    else:
                        result = await inner(attempt_call)
                except GatewayError as err:
                    error = err
                except BaseException:  # cancelled: the retry was admitted, so it was sent
                    if pending:
                        metrics.retries.labels(call.model, pending).inc()
                    raise
                else:
                    error = None
                if pending and not (error is not None and error.fail_fast):
                    # tensorgate_retries_total counts retries sent to a backend, never the
                    # breaker's own refusals: counted once the retry got past the breaker.
                    metrics.retries.labels(call.model, pending).inc()
                    pending = ""
                if error is None:
                    if attempt > 1:
                        return result.replace(attempts=result.attempts + attempt - 1)
                    return result
                if error.fail_fast:
                    # The breaker refused without calling the backend: the same backend can
                    # only refuse again, so move to a variant on another backend at once, or
                    # give up now and let fallback answer. No backoff (there is nothing to back
                    # off from) and no retry budget: the budget caps the extra load retries put
                    # on backends, and a refused try put none on any, so the redirected try is
                    # this call's first real send (or the retry already paid for). Nor is it an
                    # attempt; each refusal rules out a backend, so this cannot loop.
                    refused.add(target.backend)
                    other = None
                    if error.code in policy.retry_on and policy.other_variant:
                        other = _elsewhere(call, tried, refused)
                    if other is None:
                        raise error
                    target = other
                    tried.append(other)
                    continue
                if error.code not in policy.retry_on or attempt >= policy.max_attempts:
                    raise error
                if not budget.try_spend():
                    metrics.retry_budget_exhausted.labels(call.model).inc()
                    raise error
                delay = full_jitter(attempt, policy.base_delay, policy.max_delay)
                remaining = call.remaining()
                if remaining is not None and delay >= remaining:
                    raise error
                pending = error.code.name
                await asyncio.sleep(delay)
                attempt += 1
                if policy.other_variant:
                    other = _elsewhere(call, tried, refused)
                    if other is not None:
                        target = other
                        tried.append(other)

        return retried

    return layer


def _elsewhere(call: InferCall, tried: list[Target], refused: set[str]) -> Target | None:
    """The heaviest variant not yet tried whose backend has not refused this call fast."""
    exclude = [*tried, *(t for t in call.plan.candidates(call.version) if t.backend in refused)]
    return call.plan.alternative(call.version, exclude=exclude)
