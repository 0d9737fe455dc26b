"""A job as both queues store it, and the errors they raise: what the service, the consumers
and the two queues (sqlite_queue.py, redis_queue.py) share. A leaf module."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from tensorgate.jobs.v1 import jobs_pb2

QUEUED = jobs_pb2.JOB_STATE_QUEUED
RUNNING = jobs_pb2.JOB_STATE_RUNNING
SUCCEEDED = jobs_pb2.JOB_STATE_SUCCEEDED
FAILED = jobs_pb2.JOB_STATE_FAILED
CANCELLED = jobs_pb2.JOB_STATE_CANCELLED
EXPIRED = jobs_pb2.JOB_STATE_EXPIRED
UNFINISHED = (QUEUED, RUNNING)
STATE_NAMES = {
    QUEUED: "queued", RUNNING: "running", SUCCEEDED: "succeeded", FAILED: "failed",
    CANCELLED: "cancelled", EXPIRED: "expired",
}  # fmt: skip


class QueueUnavailable(Exception):
    """The queue's store did not answer: nothing was stored (callers get UNAVAILABLE)."""


class QuotaExceeded(Exception):
    """A submit beyond a model's quota. `quota`: the config field it names."""

    def __init__(self, quota: str, limit: int, used: int) -> None:
        super().__init__(quota)
        self.quota, self.limit, self.used = quota, limit, used


@dataclass
class Job:
    id: str
    owner: str  # the submitting caller's id (gateway/dataplane/identity.py)
    groups: tuple[str, ...]  # its groups, for the access rules when the job runs
    model: str
    version: str
    priority: int
    idempotency_key: str
    submitted: float  # wall-clock seconds (time.time()): shared by every process of a fleet
    deadline: float
    result_ttl: float
    request: bytes  # a serialized inference.ModelInferRequest
    state: int = QUEUED
    started: float = 0.0
    finished: float = 0.0
    expires: float = 0.0  # finished jobs: when they are deleted
    deliveries: int = 0
    result: bytes = b""  # succeeded: a serialized inference.ModelInferResponse
    error_code: int = 0
    error_message: str = ""
    dead_letter: str = ""

    @property
    def payload_bytes(self) -> int:
        return len(self.request)

    @property
    def finished_state(self) -> bool:
        return self.state not in UNFINISHED


def timestamp(value: float):
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(value * 1e9))
    return stamp


def to_proto(job: Job, *, with_result: bool = True) -> jobs_pb2.Job:
    """The job as the API shows it (never its owner: a caller sees only its own jobs)."""
    import grpc

    out = jobs_pb2.Job(
        id=job.id, model=job.model, model_version=job.version, state=job.state,
        priority=job.priority, idempotency_key=job.idempotency_key, deliveries=job.deliveries,
    )  # fmt: skip
    out.submit_time.CopyFrom(timestamp(job.submitted))
    out.deadline.CopyFrom(timestamp(job.deadline))
    if job.started:
        out.start_time.CopyFrom(timestamp(job.started))
    if job.finished:
        out.finish_time.CopyFrom(timestamp(job.finished))
    if job.expires:
        out.expire_time.CopyFrom(timestamp(job.expires))
    if job.error_code or job.error_message or job.dead_letter:
        names = {c.value[0]: c.name for c in grpc.StatusCode}
        out.error.code = job.error_code
        out.error.status = names.get(job.error_code, "UNKNOWN")
        out.error.message = job.error_message
        out.error.dead_letter_reason = job.dead_letter
    if with_result and job.result:
        out.result.ParseFromString(job.result)
    return out


def page_token(job: Job) -> str:
    """Where the next page starts: after this job in (submitted, id) descending order."""
    return base64.urlsafe_b64encode(json.dumps([job.submitted, job.id]).encode()).decode()


def read_page_token(token: str) -> tuple[float, str] | None:
    """(submitted, id) of a page token, or None when it is not one of ours."""
    try:
        submitted, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(submitted), str(job_id)
    except (ValueError, TypeError):
        return None


def dead_letter_reason(job: Job) -> str:
    last = job.error_message or "its consumer stopped (killed or hung) before finishing"
    return f"dead-lettered after {job.deliveries} deliveries; last failure: {last}"


def infer_request(job: Job):
    """The job's inference.ModelInferRequest, as the data plane takes it."""
    from tritonclient.grpc import service_pb2 as oip

    return oip.ModelInferRequest.FromString(job.request)
