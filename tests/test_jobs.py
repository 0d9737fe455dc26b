"""Asynchronous inference on the embedded (SQLite) queue, against real gateway processes and a
real Triton: submit/get/watch/cancel/list, idempotency, every final state (failed with the
status the unary call gives, dead-lettered, cancelled, expired), quotas and size limits with
errors naming them, another caller's job refused as unknown, queued jobs surviving a restart,
and the metrics saying so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import prometheus_client
import pytest
import yaml
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as oip

from gateway.jobs.metrics import JobMetrics
from tensorgate.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.backends.process import tool
from tests.backends.triton import REPO_ROOT
from tests.builders import oip_stub, triton_backend, variant
from tests.callers import Signer, bearer, callers_config
from tests.gateway_process import GatewayProcess
from tests.loadgen import metric, scrape
from tests.oip import Y_V1, linear_request, output, sleep_request

S = jobs_pb2
FINAL = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED, S.JOB_STATE_EXPIRED}
JOBS = {
    "visibility_timeout": "1s", "max_deliveries": 2, "concurrency": 2,
    "max_payload_bytes": 4096, "max_result_bytes": 1024, "max_queued_jobs_per_model": 5,
    "max_queued_bytes_per_model": 8192, "max_result_ttl": "3600s", "max_job_deadline": "3600s",
}  # fmt: skip


def routes() -> list[dict]:
    sleep = {"backend_model": "demo_sleep", "backend_version": ""}
    return [
        {"model": "linear", "variants": [variant("stable")]},
        {"model": "sleep", "variants": [variant("only", **sleep)]},
        {"model": "quota", "variants": [variant("only", **sleep)]},
        {"model": "fail", "variants": [variant("only", backend_model="demo_fail", backend_version="")]},
        {"model": "identity", "variants": [variant("only", backend_model="demo_identity", backend_version="")]},
    ]  # fmt: skip


def gateway_config(triton, directory, jobs=None, **extra) -> dict:
    return {
        # No breaker: the poisoned job's failures must all reach Triton.
        "backends": [triton_backend(triton.address, circuit_breaker={"disabled": True})],
        "routes": routes(),
        "jobs": {**JOBS, "embedded": {"path": f"{directory}/jobs.sqlite3"}, **(jobs or {})},
        "lifecycle": {"shutdown_grace": "1s", "drain_delay": "0s"},
        **extra,
    }


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return Signer(tmp_path_factory.mktemp("jwks"))


@pytest.fixture(scope="module")
def gateway(triton, signer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("jobs")
    config = gateway_config(triton, directory, callers=callers_config(signer, allow_anonymous=True))
    with GatewayProcess(config, rest=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def jobs(channel):
    return jobs_pb2_grpc.JobsServiceStub(channel)


@pytest.fixture(scope="module")
def alice(signer):
    return bearer(signer.token("alice", expires_in=3600))


def submit(jobs, request: oip.ModelInferRequest, metadata=(), **options) -> S.SubmitResponse:
    wire = S.InferRequest.FromString(request.SerializeToString())
    return jobs.Submit(S.SubmitRequest(request=wire, **options), metadata=metadata, timeout=10)


def final(jobs, job_id: str, metadata=(), timeout: float = 30.0) -> S.Job:
    """The job's final state, from Watch (the last message of the stream)."""
    last = None
    for message in jobs.Watch(S.WatchRequest(id=job_id), metadata=metadata, timeout=timeout):
        last = message.job
    assert last is not None and last.state in FINAL, last
    return last


def response(job: S.Job) -> oip.ModelInferResponse:
    return oip.ModelInferResponse.FromString(job.result.SerializeToString())


def unary_error(gateway, request) -> grpc.RpcError:
    with oip_stub(gateway.address) as stub, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    return err.value


def test_submit_returns_at_once_and_watch_follows_to_the_result(jobs):
    started = time.monotonic()
    submitted = submit(jobs, sleep_request(1.0))
    assert time.monotonic() - started < 0.8  # an id at once, not after the 1 s call
    job = submitted.job
    assert submitted.created and job.state == S.JOB_STATE_QUEUED and job.model == "sleep"
    assert len(job.id) >= 20  # 128 random bits, URL-safe
    states = [m.job.state for m in jobs.Watch(S.WatchRequest(id=job.id), timeout=30)]
    assert states[-1] == S.JOB_STATE_SUCCEEDED
    assert S.JOB_STATE_RUNNING in states and states.index(S.JOB_STATE_RUNNING) < len(states) - 1
    got = jobs.Get(S.GetRequest(id=job.id), timeout=5).job
    assert got.state == S.JOB_STATE_SUCCEEDED and got.deliveries == 1
    assert output(response(got)) == [1.0]
    assert got.finish_time.ToNanoseconds() > got.start_time.ToNanoseconds() > 0
    assert got.expire_time.ToNanoseconds() > got.finish_time.ToNanoseconds()


def test_result_equals_the_unary_answer(jobs, gateway):
    job = final(jobs, submit(jobs, linear_request(version="")).job.id)
    assert job.state == S.JOB_STATE_SUCCEEDED
    assert output(response(job)) == Y_V1
    with oip_stub(gateway.address) as stub:
        unary = stub.ModelInfer(linear_request(), timeout=10)
    assert response(job).outputs == unary.outputs and response(job).model_name == "linear"


def test_same_idempotency_key_same_job(jobs, alice):
    first = submit(jobs, sleep_request(0.1), alice, idempotency_key="order-17")
    again = submit(jobs, sleep_request(0.1), alice, idempotency_key="order-17")
    assert first.created and not again.created and again.job.id == first.job.id
    # Another key, or the same key from another caller, is another job.
    other = submit(jobs, sleep_request(0.1), alice, idempotency_key="order-18")
    anonymous = submit(jobs, sleep_request(0.1), idempotency_key="order-17")
    assert len({first.job.id, other.job.id, anonymous.job.id}) == 3
    final(jobs, first.job.id, alice)
    assert (
        submit(jobs, sleep_request(0.1), alice, idempotency_key="order-17").job.id == first.job.id
    )


def test_failed_job_carries_the_unary_status_and_message(jobs, gateway):
    request = linear_request(version="9")  # the route has no version 9
    unary = unary_error(gateway, request)
    job = final(jobs, submit(jobs, request).job.id)
    assert job.state == S.JOB_STATE_FAILED and job.deliveries == 1  # not retried: same answer
    assert (job.error.status, job.error.code) == ("NOT_FOUND", grpc.StatusCode.NOT_FOUND.value[0])
    assert job.error.message == unary.details() and not job.error.dead_letter_reason


def test_poisoned_job_is_dead_lettered_after_max_deliveries(jobs, gateway):
    poisoned = sleep_request(-1.0, model="fail")
    unary = unary_error(gateway, poisoned)
    assert unary.code() == grpc.StatusCode.INTERNAL
    before = scrape(gateway.metrics_url)
    job_id = submit(jobs, poisoned).job.id
    healthy = [submit(jobs, sleep_request(0.1)).job.id for _ in range(3)]
    assert all(final(jobs, i).state == S.JOB_STATE_SUCCEEDED for i in healthy)  # not blocked
    job = final(jobs, job_id)
    assert job.state == S.JOB_STATE_FAILED and job.deliveries == 2  # jobs.max_deliveries
    assert job.error.status == "INTERNAL" and job.error.message == unary.details()
    assert "dead-lettered after 2 deliveries" in job.error.dead_letter_reason
    assert "demo_fail: INPUT0 must be >= 0" in job.error.dead_letter_reason
    after = scrape(gateway.metrics_url)
    for name in ("tensorgate_jobs_dead_lettered_total", "tensorgate_jobs_redeliveries_total"):
        assert metric(after, name, model="fail") == metric(before, name, model="fail") + 1, name
    assert metric(after, "tensorgate_jobs_finished_total", model="fail", state="failed") >= 1


def test_cancel_queued_and_running_jobs(jobs):
    running = submit(jobs, sleep_request(3.0)).job.id
    _wait_state(jobs, running, S.JOB_STATE_RUNNING)
    cancelled = jobs.Cancel(S.CancelRequest(id=running), timeout=5).job
    assert cancelled.state == S.JOB_STATE_CANCELLED and cancelled.error.status == "CANCELLED"
    time.sleep(3.5)  # the call's answer, when it comes, is discarded
    assert jobs.Get(S.GetRequest(id=running), timeout=5).job.state == S.JOB_STATE_CANCELLED
    # Cancelling a finished job changes nothing.
    done = final(jobs, submit(jobs, sleep_request(0.0)).job.id)
    assert jobs.Cancel(S.CancelRequest(id=done.id), timeout=5).job.state == S.JOB_STATE_SUCCEEDED


def test_job_past_its_deadline_is_expired(jobs):
    blockers = [submit(jobs, sleep_request(2.0)).job.id for _ in range(2)]  # both consumers busy
    _wait_state(jobs, blockers[0], S.JOB_STATE_RUNNING)
    late = submit(jobs, sleep_request(0.0), deadline={"nanos": 500_000_000}).job.id
    job = final(jobs, late)
    assert job.state == S.JOB_STATE_EXPIRED and job.error.status == "DEADLINE_EXCEEDED"
    assert "deadline" in job.error.message
    # A running call past the job's deadline is cut and the job expired too.
    cut = final(jobs, submit(jobs, sleep_request(5.0), deadline={"seconds": 1}).job.id)
    assert cut.state == S.JOB_STATE_EXPIRED
    for blocker in blockers:
        final(jobs, blocker)


def test_list_by_model_and_state_paginated(jobs, alice):
    ids = [submit(jobs, linear_request(), alice).job.id for _ in range(3)]
    for job_id in ids:
        final(jobs, job_id, alice)
    request = S.ListRequest(model="linear", state=S.JOB_STATE_SUCCEEDED, page_size=2)
    first = jobs.List(request, metadata=alice, timeout=5)
    assert len(first.jobs) == 2 and first.next_page_token
    request.page_token = first.next_page_token
    second = jobs.List(request, metadata=alice, timeout=5)
    listed = [j.id for j in first.jobs] + [j.id for j in second.jobs]
    assert set(ids) <= set(listed) and len(listed) == len(set(listed))
    assert all(j.model == "linear" and not j.HasField("result") for j in first.jobs)
    # Newest first; alice's list holds none of the anonymous caller's jobs.
    assert listed[: len(ids)] == ids[::-1]
    anonymous = jobs.List(S.ListRequest(model="linear"), timeout=5)
    assert not set(ids) & {j.id for j in anonymous.jobs}
    with pytest.raises(grpc.RpcError) as err:
        jobs.List(S.ListRequest(page_token="not-a-token"), timeout=5)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.value.details()
    )


def test_another_callers_job_is_not_found(jobs, signer, alice):
    job_id = submit(jobs, sleep_request(0.0), alice).job.id
    bob = bearer(signer.token("bob"))
    for call in (
        lambda md: jobs.Get(S.GetRequest(id=job_id), metadata=md, timeout=5),
        lambda md: jobs.Cancel(S.CancelRequest(id=job_id), metadata=md, timeout=5),
        lambda md: list(jobs.Watch(S.WatchRequest(id=job_id), metadata=md, timeout=5)),
    ):
        for stranger in (bob, ()):  # another caller, and an anonymous one
            with pytest.raises(grpc.RpcError) as err:
                call(stranger)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
            assert err.value.details() == f"no job {job_id!r}"
    # Same answer as an id that never existed: the refusal confirms nothing.
    with pytest.raises(grpc.RpcError) as err:
        jobs.Get(S.GetRequest(id="x" * 22), metadata=bob, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert final(jobs, job_id, alice).state == S.JOB_STATE_SUCCEEDED
    # A forged token is refused outright.
    with pytest.raises(grpc.RpcError) as err:
        jobs.Get(S.GetRequest(id=job_id), metadata=bearer("not.a.jwt"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_submit_refusals_name_what_was_wrong(jobs, gateway):
    # A model the caller may not call (here: unknown, with access rules on) is refused at
    # submit exactly as ModelInfer refuses it.
    unary = unary_error(gateway, linear_request(model="nope"))
    cases = [
        (oip.ModelInferRequest(), grpc.StatusCode.INVALID_ARGUMENT, "model_name is required"),
        (linear_request(model="nope"), unary.code(), unary.details()),
        (_padded(5000), grpc.StatusCode.INVALID_ARGUMENT, "over jobs.max_payload_bytes (4096)"),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            submit(jobs, request)
        assert err.value.code() == code and text in err.value.details(), err.value
    for options, text in (
        ({"deadline": {"seconds": 7200}}, "over jobs.max_job_deadline (3600s)"),
        ({"result_ttl": {"seconds": 7200}}, "over jobs.max_result_ttl (3600s)"),
        ({"priority": 1000}, "priority must be within"),
        ({"idempotency_key": "k" * 200}, "idempotency_key is over 128"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            submit(jobs, linear_request(), **options)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert text in err.value.details(), err.value.details()


def test_result_over_the_limit_fails_the_job(jobs):
    request = oip.ModelInferRequest(model_name="identity")
    values = np.arange(400, dtype=np.int32)  # 1600 bytes back: over max_result_bytes (1024)
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[400])
    request.raw_input_contents.append(values.tobytes())
    job = final(jobs, submit(jobs, request).job.id)
    assert job.state == S.JOB_STATE_FAILED and job.error.status == "RESOURCE_EXHAUSTED"
    assert "over jobs.max_result_bytes (1024)" in job.error.message


def test_quotas_of_jobs_and_bytes_per_model(jobs, gateway):
    blockers = [submit(jobs, sleep_request(8.0)).job.id for _ in range(2)]  # consumers busy
    for blocker in blockers:
        _wait_state(jobs, blocker, S.JOB_STATE_RUNNING)
    queued = [submit(jobs, sleep_request(0.0, model="quota")).job.id for _ in range(5)]
    with pytest.raises(grpc.RpcError) as err:
        submit(jobs, sleep_request(0.0, model="quota"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "jobs.max_queued_jobs_per_model = 5" in err.value.details()
    submit(jobs, linear_request())  # another model's quota is its own
    # The queue gauges say so (refreshed every 2 s).
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if metric(scrape(gateway.metrics_url), "tensorgate_jobs_queued", model="quota") == 5:
            break
        time.sleep(0.2)
    samples = scrape(gateway.metrics_url)
    assert metric(samples, "tensorgate_jobs_queued", model="quota") == 5
    assert metric(samples, "tensorgate_jobs_oldest_queued_age_seconds", model="quota") > 0
    assert metric(samples, "tensorgate_jobs_running", model="sleep") == 2
    for job_id in queued:
        jobs.Cancel(S.CancelRequest(id=job_id), timeout=5)
    big = [submit(jobs, _padded(3000, model="quota")).job.id for _ in range(2)]
    with pytest.raises(grpc.RpcError) as err:
        submit(jobs, _padded(3000, model="quota"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "jobs.max_queued_bytes_per_model = 8192" in err.value.details()
    for job_id in big:
        jobs.Cancel(S.CancelRequest(id=job_id), timeout=5)
    submit(jobs, _padded(3000, model="quota"))  # room again once cancelled
    for blocker in blockers:
        jobs.Cancel(S.CancelRequest(id=blocker), timeout=5)


def test_job_metrics(jobs, gateway):
    job = final(jobs, submit(jobs, sleep_request(0.2)).job.id)
    assert job.state == S.JOB_STATE_SUCCEEDED
    samples = scrape(gateway.metrics_url)
    assert metric(samples, "tensorgate_jobs_submitted_total", model="sleep") >= 1
    assert metric(samples, "tensorgate_jobs_finished_total", model="sleep", state="succeeded") >= 1
    assert metric(samples, "tensorgate_job_queue_seconds_count", model="sleep") >= 1
    assert metric(samples, "tensorgate_job_duration_seconds_count", model="sleep",
                  state="succeeded") >= 1  # fmt: skip
    # The job ran through the request path: the unary metrics count it, as protocol "jobs".
    names = {name for name, _ in samples}
    assert (
        "tensorgate_jobs_queued" in names and "tensorgate_jobs_oldest_queued_age_seconds" in names
    )
    ran = [dict(labels) for name, labels in samples if name == "tensorgate_requests_total"]
    assert {"model": "sleep", "variant": "only", "backend": "triton-a", "code": "OK",
            "protocol": "jobs"} in ran  # fmt: skip


def test_rest_mapping_of_a_job_is_the_protobuf_json(jobs):
    job = final(jobs, submit(jobs, linear_request()).job.id)
    body = json_format.MessageToDict(job)
    assert body["state"] == "JOB_STATE_SUCCEEDED" and body["result"]["modelName"] == "linear"


def http(gateway, method: str, path: str, body=None, token: str | None = None):
    """(status, JSON body) of a REST call."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(gateway.rest_url + path, data=data, method=method)
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_jobs_over_rest(gateway, signer):
    """POST /v2/jobs, GET /v2/jobs/{id}, POST /v2/jobs/{id}/cancel, GET /v2/jobs?...: the
    protobuf JSON mapping of the gRPC messages (needs the REST listener's /v2/jobs wiring)."""
    alice, bob = signer.token("alice"), signer.token("bob")
    linear = json_format.MessageToDict(
        S.InferRequest.FromString(linear_request().SerializeToString())
    )
    submit_body = {"request": linear, "idempotencyKey": "rest-1"}
    status, created = http(gateway, "POST", "/v2/jobs", submit_body, alice)
    assert status == 201 and created["created"] is True, created
    job_id = created["job"]["id"]
    status, again = http(gateway, "POST", "/v2/jobs", submit_body, alice)
    assert status == 200 and again["job"]["id"] == job_id and not again.get("created")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, job = http(gateway, "GET", f"/v2/jobs/{job_id}", token=alice)
        assert status == 200, job
        if job["state"] == "JOB_STATE_SUCCEEDED":
            break
        time.sleep(0.1)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["result"]["modelName"] == "linear"
    result = json_format.ParseDict(job["result"], S.InferResponse())
    assert output(oip.ModelInferResponse.FromString(result.SerializeToString())) == Y_V1
    status, page = http(gateway, "GET", "/v2/jobs?model=linear&state=succeeded&page_size=5",
                        token=alice)  # fmt: skip
    assert status == 200 and job_id in [j["id"] for j in page["jobs"]]
    assert http(gateway, "GET", f"/v2/jobs/{job_id}", token=bob) == (
        404,
        {"error": f"no job {job_id!r}"},
    )
    status, body = http(gateway, "POST", "/v2/jobs", {"request": linear, "nope": 1}, alice)
    assert status == 400 and "nope" in body["error"]
    status, body = http(gateway, "GET", "/v2/jobs?state=bogus", token=alice)
    assert status == 400 and "bogus" in body["error"]
    long = http(gateway, "POST", "/v2/jobs", {"request": json_format.MessageToDict(
        S.InferRequest.FromString(sleep_request(2.0).SerializeToString()))}, alice)[1]["job"]["id"]  # fmt: skip
    status, cancelled = http(gateway, "POST", f"/v2/jobs/{long}/cancel", {}, alice)
    assert status == 200 and cancelled["state"] == "JOB_STATE_CANCELLED"


def test_queued_jobs_survive_a_restart(triton, tmp_path):
    config = gateway_config(triton, tmp_path, jobs={"concurrency": 1})
    gw = GatewayProcess(config).start()
    try:
        with grpc.insecure_channel(gw.address) as channel:
            stub = jobs_pb2_grpc.JobsServiceStub(channel)
            long = submit(stub, sleep_request(3.0)).job.id
            _wait_state(stub, long, S.JOB_STATE_RUNNING)
            queued = [submit(stub, sleep_request(0.1)).job.id for _ in range(3)]
    finally:
        assert gw.stop() == 0
    again = GatewayProcess(config, directory=gw.directory).start()
    try:
        with grpc.insecure_channel(again.address) as channel:
            stub = jobs_pb2_grpc.JobsServiceStub(channel)
            for job_id in queued:
                job = final(stub, job_id)
                assert job.state == S.JOB_STATE_SUCCEEDED and job.deliveries == 1
            # The job cut by the shutdown ran again once its lease ran out.
            job = final(stub, long)
            assert job.state == S.JOB_STATE_SUCCEEDED and job.deliveries == 2
    finally:
        again.stop()


def test_workers_of_one_host_share_the_embedded_queue(triton, tmp_path):
    """`serve --workers 2`: both processes consume one SQLite file; each job runs once."""
    config = gateway_config(
        triton, tmp_path, jobs={"concurrency": 2, "max_queued_jobs_per_model": 100}
    )
    with GatewayProcess(config, workers=2) as gw, grpc.insecure_channel(gw.address) as channel:
        stub = jobs_pb2_grpc.JobsServiceStub(channel)
        ids = [submit(stub, sleep_request(0.5)).job.id for _ in range(12)]
        jobs = [final(stub, job_id) for job_id in ids]
        assert all(j.state == S.JOB_STATE_SUCCEEDED and j.deliveries == 1 for j in jobs)
        # Four at once (two consumers in each of two workers): 12 jobs of 0.5 s in about 1.5 s,
        # where one worker alone would take 3 s.
        first = min(j.start_time.ToNanoseconds() for j in jobs)
        last = max(j.finish_time.ToNanoseconds() for j in jobs)
        assert (last - first) / 1e9 < 2.6


def _padded(size: int, model: str = "linear") -> oip.ModelInferRequest:
    """A request of about `size` bytes (its raw input is garbage: it is refused or cancelled
    before it runs)."""
    request = linear_request(model=model)
    request.raw_input_contents.append(b"\0" * size)
    return request


def _wait_state(jobs, job_id: str, state: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if jobs.Get(S.GetRequest(id=job_id), timeout=5).job.state == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"job never reached {S.JobState.Name(state)}")


# --- operations: autoscaling on queue depth (deploy/kubernetes/components/jobs-autoscaling) ----

COMPONENT = REPO_ROOT / "deploy" / "kubernetes" / "components" / "jobs-autoscaling"


def _rendered_with_component(tmp_path) -> tuple[Path, list[dict]]:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(REPO_ROOT / "deploy" / "kubernetes", overlay)
    component = os.path.relpath(COMPONENT, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [base],
                "components": [component],
            }
        )
    )
    result = subprocess.run([tool("kubectl"), "kustomize", str(overlay)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(result.stdout)
    return rendered, [d for d in yaml.safe_load_all(result.stdout) if d]


def test_queue_depth_autoscaling_renders_validates_and_reads_an_exported_metric(tmp_path):
    rendered, objects = _rendered_with_component(tmp_path)
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(rendered)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output and "ERROR" not in output, output
    hpas = [d for d in objects if d["kind"] == "HorizontalPodAutoscaler"]
    assert len(hpas) == 1  # the base's HPA, extended: two HPAs on one Deployment would fight
    kinds = [m["type"] for m in hpas[0]["spec"]["metrics"]]
    assert kinds == ["Resource", "Pods", "External"]  # the base's metrics kept
    external = hpas[0]["spec"]["metrics"][2]["external"]
    assert external["target"] == {"type": "AverageValue", "averageValue": "8"}
    # The adapter serves the HPA's metric name, from a series the gateway exports.
    rules = yaml.safe_load((COMPONENT / "prometheus-adapter-rules.yaml").read_text())
    [rule] = rules["rules"]["external"]
    assert rule["name"]["as"] == external["metric"]["name"] == "tensorgate_jobs_queued"
    series = rule["seriesQuery"].split("{")[0]
    registry = prometheus_client.CollectorRegistry()
    JobMetrics(registry)
    assert series in {m.name for m in registry.collect()}
    # Its query, templates filled as the adapter fills them, is valid PromQL (promtool).
    query = (rule["metricsQuery"].replace("<<.GroupBy>>", "namespace")
             .replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'namespace="tensorgate"'))  # fmt: skip
    check = tmp_path / "adapter_rule.yaml"
    check.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "namespace:tensorgate_jobs_queued:sum", "expr": query}]}]}))  # fmt: skip
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run scripts/system-tools"
    result = subprocess.run(
        [promtool, "check", "rules", str(check)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_checks_name_each_problem(monkeypatch):
    from gateway.jobs.settings import check_jobs, jobs_defaults, jobs_environment
    from tensorgate.config.v1 import config_pb2

    def config(jobs: str):  # parsed only: the checks under test are what validation runs
        data = {"limits": {"max_request_bytes": 32 << 20}, "jobs": yaml.safe_load(jobs)}
        return json_format.ParseDict(data, config_pb2.GatewayConfig())

    assert check_jobs(config("{}")) == []
    problems = dict(check_jobs(config(
        "{redis: {address: nowhere}, max_deliveries: 1000, result_ttl: 100000s,"
        " max_payload_bytes: 99999999999, visibility_timeout: 0.5s}"
    )))  # fmt: skip
    assert problems["jobs.redis.address"] == "'nowhere' is not host:port"
    assert problems["jobs.max_deliveries"] == "must be at most 100"
    assert problems["jobs.result_ttl"] == "must not be over max_result_ttl"
    assert "over limits.max_request_bytes" in problems["jobs.max_payload_bytes"]
    assert "at least 1s" in problems["jobs.visibility_timeout"]
    monkeypatch.delenv("TG_TEST_REDIS_PASSWORD", raising=False)
    missing = config("{redis: {address: '127.0.0.1:6379', password_env: TG_TEST_REDIS_PASSWORD}}")
    assert jobs_environment(missing) == [
        ("jobs.redis.password_env", "environment variable TG_TEST_REDIS_PASSWORD is not set")
    ]
    # Defaults written into the config, as the other sections' are.
    defaulted = config("{}")
    jobs_defaults(defaulted)
    assert defaulted.jobs.max_deliveries == 3 and defaulted.jobs.visibility_timeout.seconds == 30
    assert defaulted.jobs.max_payload_bytes == 4 << 20 and not defaulted.jobs.embedded.path
