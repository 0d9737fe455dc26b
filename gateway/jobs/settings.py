"""The Jobs API's settings (config `jobs`, protos/tensorgate/config/v1/jobs.proto): defaults in
one place, and the whole-config check `check-config` and `serve` run."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

from gateway.addresses import address_problem
from gateway.durations import duration, seconds
from tensorgate.config.v1 import config_pb2

DEFAULT_VISIBILITY_TIMEOUT_S = 30.0
DEFAULT_MAX_DELIVERIES = 3
DEFAULT_MAX_PAYLOAD_BYTES = 4 << 20
DEFAULT_MAX_RESULT_BYTES = 16 << 20
DEFAULT_MAX_QUEUED_JOBS = 10_000
DEFAULT_MAX_QUEUED_BYTES = 1 << 30
DEFAULT_RESULT_TTL_S = 3600.0
DEFAULT_MAX_RESULT_TTL_S = 24 * 3600.0
DEFAULT_JOB_DEADLINE_S = 3600.0
DEFAULT_MAX_JOB_DEADLINE_S = 24 * 3600.0
DEFAULT_CONCURRENCY = 4
DEFAULT_REDIS_PREFIX = "tensorgate:jobs"
DEFAULT_REDIS_TIMEOUT_S = 2.0
EMBEDDED_FILE = "jobs.sqlite3"
MAX_DELIVERIES_BOUND = 100
MAX_CONCURRENCY = 1024


@dataclass(frozen=True)
class JobSettings:
    """Every knob with its default applied (`jobs_defaults`)."""

    kind: str  # "embedded" or "redis"
    path: str  # embedded: the SQLite file
    redis_address: str
    redis_password_env: str
    redis_tls: bool
    redis_tls_ca_file: str
    redis_prefix: str
    redis_timeout: float
    visibility_timeout: float
    max_deliveries: int
    max_payload_bytes: int
    max_result_bytes: int
    max_queued_jobs: int
    max_queued_bytes: int
    result_ttl: float
    max_result_ttl: float
    job_deadline: float
    max_job_deadline: float
    concurrency: int

    @property
    def queue_name(self) -> str:
        """How errors and logs name the queue (never with a password)."""
        if self.kind == "redis":
            return f"job queue (redis at {self.redis_address})"
        return f"job queue (sqlite {self.path})"


def job_settings(jobs: config_pb2.Jobs, state_dir: str, max_request_bytes: int = 0) -> JobSettings:
    """`jobs` with every default applied (whether or not `jobs_defaults` ran). `state_dir`: where
    the embedded queue lives unless jobs.embedded.path says."""
    redis = jobs.redis
    payload = jobs.max_payload_bytes or min(DEFAULT_MAX_PAYLOAD_BYTES, max_request_bytes or 1 << 62)
    return JobSettings(
        kind="redis" if jobs.HasField("redis") else "embedded",
        path=jobs.embedded.path or str(pathlib.Path(state_dir) / EMBEDDED_FILE),
        redis_address=redis.address,
        redis_password_env=redis.password_env,
        redis_tls=redis.tls,
        redis_tls_ca_file=redis.tls_ca_file,
        redis_prefix=redis.key_prefix or DEFAULT_REDIS_PREFIX,
        redis_timeout=seconds(redis.timeout, DEFAULT_REDIS_TIMEOUT_S),
        visibility_timeout=seconds(jobs.visibility_timeout, DEFAULT_VISIBILITY_TIMEOUT_S),
        max_deliveries=jobs.max_deliveries or DEFAULT_MAX_DELIVERIES,
        max_payload_bytes=payload,
        max_result_bytes=jobs.max_result_bytes or DEFAULT_MAX_RESULT_BYTES,
        max_queued_jobs=jobs.max_queued_jobs_per_model or DEFAULT_MAX_QUEUED_JOBS,
        max_queued_bytes=jobs.max_queued_bytes_per_model or DEFAULT_MAX_QUEUED_BYTES,
        result_ttl=seconds(jobs.result_ttl, DEFAULT_RESULT_TTL_S),
        max_result_ttl=seconds(jobs.max_result_ttl, DEFAULT_MAX_RESULT_TTL_S),
        job_deadline=seconds(jobs.job_deadline, DEFAULT_JOB_DEADLINE_S),
        max_job_deadline=seconds(jobs.max_job_deadline, DEFAULT_MAX_JOB_DEADLINE_S),
        concurrency=jobs.concurrency or DEFAULT_CONCURRENCY,
    )


def jobs_defaults(config: config_pb2.GatewayConfig) -> None:
    """Fill the unset fields of the config's `jobs` (when present) with their defaults, in
    place, as config.py does for the other sections. The embedded path stays empty: it follows
    the state directory the gateway runs with."""
    if not config.HasField("jobs"):
        return
    jobs = config.jobs
    s = job_settings(jobs, "", config.limits.max_request_bytes)
    for field, value in (
        ("visibility_timeout", s.visibility_timeout), ("result_ttl", s.result_ttl),
        ("max_result_ttl", s.max_result_ttl), ("job_deadline", s.job_deadline),
        ("max_job_deadline", s.max_job_deadline),
    ):  # fmt: skip
        if not jobs.HasField(field):
            getattr(jobs, field).CopyFrom(duration(value))
    for field, value in (
        ("max_deliveries", s.max_deliveries), ("max_payload_bytes", s.max_payload_bytes),
        ("max_result_bytes", s.max_result_bytes), ("max_queued_jobs_per_model", s.max_queued_jobs),
        ("max_queued_bytes_per_model", s.max_queued_bytes), ("concurrency", s.concurrency),
    ):  # fmt: skip
        if not getattr(jobs, field):
            setattr(jobs, field, value)
    if jobs.HasField("redis"):
        if not jobs.redis.key_prefix:
            jobs.redis.key_prefix = DEFAULT_REDIS_PREFIX
        if not jobs.redis.HasField("timeout"):
            jobs.redis.timeout.CopyFrom(duration(DEFAULT_REDIS_TIMEOUT_S))


def _negative(duration) -> bool:
    return duration.seconds < 0 or duration.nanos < 0


def check_jobs(config: config_pb2.GatewayConfig) -> list[tuple[str, str]]:
    """Every problem of the config's `jobs`, as (field path, plain message); none without it."""
    if not config.HasField("jobs"):
        return []
    jobs = config.jobs
    problems: list[tuple[str, str]] = []
    at = "jobs"
    for field in (
        "visibility_timeout", "result_ttl", "max_result_ttl", "job_deadline", "max_job_deadline",
    ):  # fmt: skip
        if jobs.HasField(field) and _negative(getattr(jobs, field)):
            problems.append((f"{at}.{field}", "must be positive"))
    settings = job_settings(jobs, "", config.limits.max_request_bytes)
    if settings.max_deliveries > MAX_DELIVERIES_BOUND:
        problems.append((f"{at}.max_deliveries", f"must be at most {MAX_DELIVERIES_BOUND}"))
    if settings.concurrency > MAX_CONCURRENCY:
        problems.append((f"{at}.concurrency", f"must be at most {MAX_CONCURRENCY}"))
    max_request = config.limits.max_request_bytes or (32 << 20)
    if settings.max_payload_bytes > max_request:
        problems.append(
            (f"{at}.max_payload_bytes",
             f"{settings.max_payload_bytes} is over limits.max_request_bytes ({max_request}): "
             "a job could never be submitted")
        )  # fmt: skip
    if settings.max_queued_bytes < settings.max_payload_bytes:
        problems.append(
            (f"{at}.max_queued_bytes_per_model",
             f"must be at least max_payload_bytes ({settings.max_payload_bytes})")
        )  # fmt: skip
    if settings.result_ttl > settings.max_result_ttl:
        problems.append((f"{at}.result_ttl", "must not be over max_result_ttl"))
    if settings.job_deadline > settings.max_job_deadline:
        problems.append((f"{at}.job_deadline", "must not be over max_job_deadline"))
    if settings.visibility_timeout < 1.0:
        problems.append((f"{at}.visibility_timeout", "must be at least 1s (leases renew at 1/3)"))
    if jobs.HasField("redis"):
        redis = jobs.redis
        if not redis.address:
            problems.append((f"{at}.redis.address", "required (host:port)"))
        else:
            reason = address_problem(redis.address)
            if reason:
                problems.append((f"{at}.redis.address", reason))
        if redis.tls_ca_file and not redis.tls:
            problems.append((f"{at}.redis.tls_ca_file", "set, but tls is false"))
        if redis.HasField("timeout") and _negative(redis.timeout):
            problems.append((f"{at}.redis.timeout", "must be positive"))
    return problems


def jobs_environment(config: config_pb2.GatewayConfig) -> list[tuple[str, str]]:
    """What `serve` needs of the machine for `jobs` (environment.py's part): the Redis password's
    variable and the CA file. The password itself is never shown."""
    if not config.HasField("jobs") or not config.jobs.HasField("redis"):
        return []
    redis = config.jobs.redis
    problems = []
    if redis.password_env and not os.environ.get(redis.password_env):
        problems.append(
            ("jobs.redis.password_env", f"environment variable {redis.password_env} is not set")
        )
    if redis.tls_ca_file and not pathlib.Path(redis.tls_ca_file).is_file():
        problems.append(("jobs.redis.tls_ca_file", f"cannot read {redis.tls_ca_file}"))
    return problems
