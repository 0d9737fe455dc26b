"""Retry retryable failures with exponential backoff and full jitter, within a retry budget.

A retry may go to another variant of the route (policy `other_variant`), which is what turns a
single sick backend into a latency blip instead of an error.

A breaker's fail-fast refusal (GatewayError.fail_fast) is never retried against the same backend:
the call moves at once to a variant on another backend, or is handed up to fallback.
"""

from __future__ import annotations

import asyncio
import dataclasses

from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.pipeline import InferCall, InferResult, InferService, Layer
from gateway.resilience.backoff import full_jitter
from gateway.resilience.budget import RetryBudget
from gateway.routing import Target


class RetryBudgets:
    """One budget per route, kept across calls and across route-table revisions (a new budget
    only when the route's retry settings change)."""

    def __init__(self) -> None:
        self._budgets: dict[str, tuple[object, RetryBudget]] = {}

    def for_plan(self, plan) -> RetryBudget:
        settings = plan.settings.retry
        entry = self._budgets.get(plan.model)
        if entry is None or entry[0] != settings:
            budget = RetryBudget(
                settings.budget_ratio, settings.budget_min_per_second, settings.budget_window
            )
            entry = self._budgets[plan.model] = (settings, budget)
        return entry[1]


def retry(budgets: RetryBudgets, metrics: GatewayMetrics) -> Layer:
    def layer(inner: InferService) -> InferService:
        async def retried(call: InferCall) -> InferResult:
            policy = call.plan.settings.retry
            if policy.max_attempts <= 1:
                return await inner(call)
            budget = budgets.for_plan(call.plan)
            budget.record_request()
            target = call.target
            tried = [target]
            refused: set[str] = set()  # backends whose breaker failed this call fast
            attempt = 1  # tries that reached a backend (or may have): what max_attempts bounds
            pending = ""  # code of a retry paid for but not yet seen to reach a backend
            while True:
                attempt_call = call if target is call.target else call.to(target)
                try:
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
                        return dataclasses.replace(result, attempts=result.attempts + attempt - 1)
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
