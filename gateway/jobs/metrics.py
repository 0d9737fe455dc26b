"""The Jobs API's metrics, on the gateway's registry. Label values are bounded: `model` is only
ever a routed model's public name (a submit for any other is refused before it is queued), and
`state` one of six.

The queue gauges (depth, oldest age, running) are the whole queue's as this process last read
it, so with a shared Redis every process reports the same values: aggregate them with `max by
(model)`, never `sum`."""

from __future__ import annotations

import prometheus_client as prom

# Jobs take seconds to hours: buckets from 100 ms to 2 h.
BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class JobMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.queued = prom.Gauge(
            "tensorgate_jobs_queued", "Jobs waiting in the job queue, per model.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.oldest_age = prom.Gauge(
            "tensorgate_jobs_oldest_queued_age_seconds",
            "Age of the oldest job still waiting in the job queue, per model (0: none waits).",
            ["model"], registry=registry,
        )  # fmt: skip
        self.running = prom.Gauge(
            "tensorgate_jobs_running", "Jobs being run by some gateway process, per model.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.submitted = prom.Counter(
            "tensorgate_jobs_submitted_total", "Jobs queued by this process, per model.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.finished = prom.Counter(
            "tensorgate_jobs_finished_total",
            "Jobs this process settled, per model and final state.",
            ["model", "state"], registry=registry,
        )  # fmt: skip
        self.redeliveries = prom.Counter(
            "tensorgate_jobs_redeliveries_total",
            "Jobs this process took again after an earlier delivery (a consumer died or hung, "
            "or the call failed retryably).",
            ["model"], registry=registry,
        )  # fmt: skip
        self.dead_lettered = prom.Counter(
            "tensorgate_jobs_dead_lettered_total",
            "Jobs dead-lettered by this process after jobs.max_deliveries deliveries.",
            ["model"], registry=registry,
        )  # fmt: skip
        self.queue_errors = prom.Counter(
            "tensorgate_jobs_queue_errors_total",
            "Operations the job queue's store (SQLite or Redis) did not answer, by operation.",
            ["operation"], registry=registry,
        )  # fmt: skip
        self.time_in_queue = prom.Histogram(
            "tensorgate_job_queue_seconds",
            "From submit to the job's first start, per model.",
            ["model"], buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self.total_time = prom.Histogram(
            "tensorgate_job_duration_seconds",
            "From submit to the job's final state, per model and state.",
            ["model", "state"], buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self._shown: set[str] = set()  # models whose queue gauges have been set

    def show_queue(self, stats: dict[str, tuple[int, float, int]], now: float) -> None:
        """Set the queue gauges from a queue's stats; models no longer in it read 0."""
        seen = set(stats)
        for model, (queued, oldest, running) in stats.items():
            self.queued.labels(model).set(queued)
            self.oldest_age.labels(model).set(max(0.0, now - oldest) if queued else 0.0)
            self.running.labels(model).set(running)
        for model in self._shown - seen:
            self.queued.labels(model).set(0)
            self.oldest_age.labels(model).set(0)
            self.running.labels(model).set(0)
        self._shown |= seen
