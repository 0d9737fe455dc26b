"""Retry retryable failures with exponential backoff and full jitter, within a retry budget.

A retry may go to another variant of the route (policy `other_variant`), which is what turns a
single sick backend into a latency blip instead of an error.
"""

from __future__ import annotations

import asyncio
import dataclasses

from tritonclient.grpc import service_pb2 as oip

from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.pipeline import InferCall, InferService, Layer
from gateway.resilience.backoff import full_jitter
from gateway.resilience.budget import RetryBudget


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
        async def retried(call: InferCall) -> oip.ModelInferResponse:
            policy = call.plan.settings.retry
            if policy.max_attempts <= 1:
                return await inner(call)
            budget = budgets.for_plan(call.plan)
            budget.record_request()
            target = call.target
            tried = [target]
            attempt = 1
            while True:
                attempt_call = (
                    call if target is call.target else dataclasses.replace(call, target=target)
                )
                try:
                    response = await inner(attempt_call)
                except GatewayError as err:
                    if err.code not in policy.retry_on or attempt >= policy.max_attempts:
                        call.target = target
                        raise
                    if not budget.try_spend():
                        metrics.retry_budget_exhausted.labels(call.model).inc()
                        call.target = target
                        raise
                    delay = full_jitter(attempt, policy.base_delay, policy.max_delay)
                    remaining = call.remaining()
                    if remaining is not None and delay >= remaining:
                        call.target = target
                        raise
                    metrics.retries.labels(call.model, err.code.name).inc()
                    await asyncio.sleep(delay)
                    attempt += 1
                    if policy.other_variant:
                        other = call.plan.alternative(call.version, exclude=tried)
                        if other is not None:
                            target = other
                            tried.append(other)
                    continue
                call.target = target
                return response

        return retried

    return layer
