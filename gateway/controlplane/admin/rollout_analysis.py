"""One rollout step's verdict: the canary against the baseline over the step's window, by error
ratio and p99 latency (gateway/controlplane/admin/rollout.py drives the steps)."""

from __future__ import annotations

from tensorgate.store.v1 import store_pb2

Counts = tuple[int, float, float]  # (requests, error ratio, p99 seconds): stats.window


def analyse(
    record: store_pb2.RolloutRecord, percent: int, canary: Counts, baseline: Counts
) -> list[str]:
    """Record the step's analysis on `record.rollout` and return why the canary fails it (empty:
    it passes). At 100% the baseline gets no calls: the last step's baseline stands in."""
    request = record.request
    error_factor = request.max_error_ratio_factor or 2.0
    slack = request.error_ratio_slack or 0.01
    p99_factor = request.max_p99_factor or 2.0
    last = record.last_baseline
    if baseline[0] == 0 and last.baseline_requests:
        baseline = (last.baseline_requests, last.baseline_error_ratio, last.baseline_p99_seconds)
    failed = []
    if canary[1] > baseline[1] * error_factor + slack:
        failed.append(
            f"error ratio {canary[1]:.3f} > {error_factor:g} x baseline "
            f"{baseline[1]:.3f} + {slack:g}"
        )
    if baseline[0] and canary[2] > baseline[2] * p99_factor:
        failed.append(
            f"p99 {canary[2] * 1000:.1f} ms > {p99_factor:g} x baseline {baseline[2] * 1000:.1f} ms"
        )
    analysis = record.rollout.analyses.add(
        percent=percent,
        canary_requests=canary[0],
        canary_error_ratio=canary[1],
        canary_p99_seconds=canary[2],
        baseline_requests=baseline[0],
        baseline_error_ratio=baseline[1],
        baseline_p99_seconds=baseline[2],
        passed=not failed,
    )
    if baseline[0]:
        record.last_baseline.CopyFrom(analysis)
    return failed
