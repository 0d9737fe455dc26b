"""A rollout's smoke gate: before each weight step, the canary's smoke examples (its route's
`smoke` and its own) are sent to it, and a failing one rolls the rollout back before traffic
moves (gateway/controlplane/admin/rollout.py).

The examples run inside the gateway that drives the rollout, through what a call to one variant
goes through below the route's own layers (its backend's breaker, bulkhead and adapter, as a
shadow's mirror does): so a canary at weight 0, which no caller can single out, is tested too,
without a way for callers to bypass weights, and without the route's fallback or retries hiding
a bad answer. They are not counted in the traffic the step's analysis judges (that is measured
above, where callers' calls enter). docs/smoke.md.
"""

from __future__ import annotations

import time
from typing import Protocol

from gateway.controlplane.smoke_examples import examples_for, judge, latency_problem, request
from gateway.controlplane.store.base import now
from gateway.dataplane.pipeline import InferCall, InferService
from gateway.dataplane.routing import RouteTable
from gateway.errors import GatewayError
from tensorgate.admin.v1 import admin_pb2

PROBLEM_CHARS = 600  # a failure as shown in `rollout status` and the audit log's summary
TIMEOUT_S = 30.0  # one example's answer at most (the backend's per-try timeout applies too)


class Served(Protocol):
    """What the gateway (gateway/app.py's Runtime) offers the gate."""

    table: RouteTable  # the live route table
    backend_call: InferService  # one variant's breaker, bulkhead and adapter


def _cut(text: str) -> str:
    return text if len(text) <= PROBLEM_CHARS else text[: PROBLEM_CHARS - 3] + "..."


class SmokeGate:
    def __init__(self, served: Served) -> None:
        self._served = served

    async def run(self, model: str, variant: str, percent: int) -> admin_pb2.SmokeRun | None:
        """The canary's examples, each sent once; None when it declares none."""
        plan = self._served.table.get(model)
        target = plan.variant(variant) if plan is not None else None
        if target is None:
            return None  # the rollout ends on the route change itself (rollout.py)
        config = next(v for v in plan.route.variants if v.name == variant)
        examples = examples_for(plan.route, config)
        if not examples:
            return None
        run = admin_pb2.SmokeRun(percent=percent, ran_at=now(), examples=len(examples))
        for example in examples:
            problems = await self._problems(plan, target, example)
            if problems:
                run.failures.add(example=example.name, problem=_cut("; ".join(problems)))
        return run

    async def _problems(self, plan, target, example) -> list[str]:
        call = InferCall(
            request(plan.model, target.version, example),
            plan.model,
            target.version,
            deadline=time.monotonic() + TIMEOUT_S,
            plan=plan,
            target=target,
        )
        started = time.perf_counter()
        try:
            result = await self._served.backend_call(call)
        except GatewayError as err:
            return [f"{err.code.name}: {err.message}"]
        except Exception as err:  # an adapter's bug must end the rollout, not its driver task
            return [f"the call failed: {type(err).__name__}: {err}"]
        latency = time.perf_counter() - started
        problems = judge(example, result.response)
        slow = latency_problem(example, latency)
        return [*problems, slow] if slow else problems


def failure_reason(run: admin_pb2.SmokeRun) -> str:
    """The rollback's reason: the first failing example and what differed."""
    first = run.failures[0]
    more = f" (and {len(run.failures) - 1} more)" if len(run.failures) > 1 else ""
    return (
        f"smoke example {first.example!r} failed before step {run.percent}%{more}: "
        f"{first.problem}; rolled back"
    )
