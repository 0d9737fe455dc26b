"""Dynamic batching at the gateway (Variant.batching), against real backends: a Triton of its own
serving batching echo models (tests/backends/batch_models.py), the TF Serving stand-in and a real
TorchServe, all behind one `tensorgate serve`.

What a caller sees, asserted here:
- A batched answer is byte-identical to the unbatched answer (the same request through a variant
  of the same route with batching off), on all three backends, every OIP datatype each serves,
  raw and typed contents, batch sizes 1..3 per call; and batching really happened (the gateway's
  tensorgate_batch_size histogram, Triton's inferences per execution).
- A model without a batch dimension (Triton max_batch_size 0) passes through unbatched.
- A queued call whose deadline passes leaves the queue with DEADLINE_EXCEEDED and the batch goes
  on without it; a cancelled caller (queued, or with its batch already at the backend) does not
  cancel the others; a failed batch gives every member the backend's status; members of a batch
  that failed go through retry and fallback each on its own.
- tensorgate_batch_size and tensorgate_batch_queue_delay_seconds per (model, variant).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs import oip as oip_codec
from tests.backends.batch_models import MAX_BATCH_SIZE, write_repository
from tests.backends.triton import TritonServer
from tests.builders import oip_stub, tfserving_backend, torchserve_backend, triton_backend, variant
from tests.faults.proxy import FaultProxy
from tests.gateway_process import GatewayProcess
from tests.loadgen import metric, scrape

TRITON_TYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES",
]  # fmt: skip
TF_NAME = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "half",
    "BF16": "bfloat16", "FP32": "float", "FP64": "double", "BYTES": "string",
}  # fmt: skip
# TorchServe's echo (torch tensors): no unsigned types above 8 bits, no BYTES.
TORCH_TYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"]
BACKENDS = {"triton": TRITON_TYPES, "tfserving": list(TF_NAME), "torchserve": TORCH_TYPES}
PREFIX = {"triton": "t", "tfserving": "f", "torchserve": "s"}

COLUMNS = 3  # the non-batch dimension every call of a datatype shares
CALLS = 6  # concurrent calls per datatype and content kind, batch sizes 1, 2, 3, 1, 2, 3
BATCHING = {"max_batch_size": MAX_BATCH_SIZE, "max_queue_delay": "0.05s"}
# Tests of the queue itself (deadlines, limits, cancellation) need calls to wait in it whatever
# the backend is doing: Triton's rule, not the adaptive default (tested on "adaptive").
WAIT = {"dispatch": "BATCH_DISPATCH_WAIT_FOR_DELAY"}
LONG_QUEUE = {"max_batch_size": MAX_BATCH_SIZE, "max_queue_delay": "0.2s", **WAIT}
TIMEOUT = 20.0


def route(model: str, backend: str, backend_model: str, *, batching=BATCHING, **fields) -> dict:
    """Variant "batched" (version 1) and an identical variant "direct" (version 2, batching off,
    weight 0): the same request pinned to each gives the batched and the unbatched answer."""
    extra = {key: fields.pop(key) for key in ("schema", "policy") if key in fields}
    common = {"backend": backend, "backend_model": backend_model, "backend_version": None, **fields}
    return {
        "model": model,
        "variants": [
            variant("batched", version="1", batching=batching, **common),
            variant("direct", version="2", weight=0, **common),
        ],
        **extra,
    }


def echo_schema(datatype: str) -> dict:
    """A declared schema with a batch dimension: TF Serving and TorchServe do not say whether
    their models batch, so the route does (ModelSchema.max_batch_size)."""
    return {
        "inputs": [{"name": "x", "datatype": datatype, "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": datatype, "shape": [-1, -1]}],
        "max_batch_size": MAX_BATCH_SIZE,
    }


@pytest.fixture(scope="module")
def batch_triton(request):
    """A second real Triton serving the batching echo models (no Triton-side dynamic batching:
    what Triton executes is what the gateway sent). It starts while the session's TF Serving
    and TorchServe do."""
    repo = Path(tempfile.mkdtemp(prefix="tensorgate-batch-models-"))
    write_repository(repo, TRITON_TYPES)
    server = TritonServer(repo, extra_args=["--model-load-thread-count=16"])
    # The thread that spawns Triton must outlive it (PR_SET_PDEATHSIG is per thread): the pool
    # is shut down only after the server stopped.
    pool = ThreadPoolExecutor(1, thread_name_prefix="batch-triton")
    starting = pool.submit(server.start)
    try:
        request.getfixturevalue("tfserving")
        request.getfixturevalue("torchserve")
        starting.result()
        yield server
    finally:
        with contextlib.suppress(BaseException):
            starting.result()  # never leave a start running behind the stop
        server.stop()
        pool.shutdown()
        shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy(batch_triton):
    with FaultProxy(batch_triton.address) as p:
        yield p


@pytest.fixture(scope="module")
def gateway(batch_triton, tfserving, torchserve, proxy):
    triton_io = {"input_names": {"x": "INPUT0"}, "output_names": {"y": "OUTPUT0"}}
    routes = []
    for datatype in TRITON_TYPES:  # batch dimension from Triton's own model config
        routes.append(route(f"t-{datatype.lower()}", "tb", f"echo_{datatype.lower()}", **triton_io))
    for datatype, name in TF_NAME.items():
        routes.append(route(
            f"f-{datatype.lower()}", "tfs", "echo", schema=echo_schema(datatype),
            tfserving={"signature_name": f"echo_{name}"},
        ))  # fmt: skip
    for datatype in TORCH_TYPES:
        routes.append(route(f"s-{datatype.lower()}", "ts", "echo", schema=echo_schema(datatype)))
    routes += [
        # max_batch_size 0 in Triton: batching is configured but cannot apply
        route("identity", "tb", "demo_identity", batching=LONG_QUEUE),
        route("slowq", "tb", "echo_fp32", batching=LONG_QUEUE, **triton_io),
        route("sleep", "tb", "sleep_fp32", batching={"max_batch_size": 32, "max_queue_delay": "0.02s", **WAIT}, **triton_io),
        # The default dispatch, with a queue delay no test could miss.
        route("adaptive", "tb", "sleep_fp32", batching={"max_batch_size": 32, "max_queue_delay": "1s"}, **triton_io),
        route("fail", "tb", "fail_fp32", policy={"retry": {"max_attempts": 1}}, batching={**BATCHING, **WAIT}, **triton_io),
        route("limits", "tb", "echo_fp32", **triton_io, batching={
            "max_batch_size": 4, "max_queue_delay": "0.2s", "preferred_batch_sizes": [3], "max_queued": 5,
            **WAIT}),
        {"model": "failover", "variants": [
            variant("main", backend="tb-proxied", backend_model="echo_fp32", backend_version=None,
                    batching={**BATCHING, **WAIT}, **triton_io),
            # batching too, on a model version nothing else calls (its description is fetched
            # when the first fallbacks arrive, all at once)
            variant("backup", backend="tb", backend_model="echo_fp32", weight=0,
                    batching={**BATCHING, **WAIT}, **triton_io),
         ], "policy": {"retry": {"max_attempts": 2, "budget_min_per_second": 100},
                       "fallback": [{"variant": "backup"}]}},
    ]  # fmt: skip
    config = {
        "backends": [
            triton_backend(batch_triton.address, "tb"),
            triton_backend(proxy.address, "tb-proxied", per_try_timeout="3s",
                           circuit_breaker={"disabled": True}),
            tfserving_backend(tfserving.address),
            torchserve_backend(torchserve),
        ],
        "routes": routes,
        # No health probes while the proxy refuses: the failover test needs routing to keep
        # choosing the refused variant, so its batch fails and fallback answers.
        "lifecycle": {"health_check_interval": "60s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        yield gw


@pytest.fixture(scope="module")
def stub(gateway):
    with oip_stub(gateway.address) as stub:
        yield stub


# -- helpers -------------------------------------------------------------------------------------


def sample(datatype: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    shape = (rows, COLUMNS)
    if datatype == "BYTES":
        items = [
            bytes(rng.integers(0, 256, size=int(rng.integers(0, 9)), dtype=np.uint8))
            for _ in range(rows * COLUMNS)
        ]
        array = np.empty(rows * COLUMNS, dtype=np.object_)
        array[:] = items
        return array.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if datatype == "BF16":
        return rng.normal(0, 100, size=shape).astype(ml_dtypes.bfloat16)
    dtype = oip_codec.NUMPY_DTYPE[datatype]
    if dtype.kind == "f":
        return (rng.normal(0, 1000, size=shape)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def echo_request(
    model: str, version: str, array: np.ndarray, datatype: str, *, raw: bool, id_: str
):
    request = oip.ModelInferRequest(model_name=model, model_version=version, id=id_)
    if raw:
        oip_codec.add_input(request, "x", array, datatype)
        return request
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    values = array.reshape(-1).tolist()
    getattr(tensor.contents, oip_codec.CONTENTS_FIELD[datatype]).extend(values)
    return request


def fp32_request(model: str, rows, version: str = "1") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    oip_codec.add_input(request, "x", np.asarray(rows, dtype=np.float32))
    return request


def fire(stub, requests, timeout: float = TIMEOUT) -> list:
    """All of `requests` in flight at once; their futures."""
    return [stub.ModelInfer.future(r, timeout=timeout) for r in requests]


def trailers(future) -> dict:
    return dict(future.trailing_metadata() or ())


def batch_stats(samples, model: str, variant: str = "batched") -> tuple[float, float, float]:
    """(batches, rows, calls queued) the gateway recorded for a variant."""
    return (
        metric(samples, "tensorgate_batch_size_count", model=model, variant=variant),
        metric(samples, "tensorgate_batch_size_sum", model=model, variant=variant),
        metric(samples, "tensorgate_batch_queue_delay_seconds_count", model=model, variant=variant),
    )


def grew(before, after, model: str, variant: str = "batched") -> tuple[float, ...]:
    return tuple(
        b - a
        for a, b in zip(
            batch_stats(before, model, variant), batch_stats(after, model, variant), strict=True
        )
    )


def triton_counts(server: TritonServer, model: str) -> tuple[int, int]:
    """(inference_count, execution_count): rows Triton inferred, model executions it ran."""
    with oip_stub(server.address) as stub:
        stats = stub.ModelStatistics(oip.ModelStatisticsRequest(name=model))
    return (
        sum(s.inference_count for s in stats.model_stats),
        sum(s.execution_count for s in stats.model_stats),
    )


def canonical(response: oip.ModelInferResponse) -> bytes:
    return response.SerializeToString(deterministic=True)


# -- 1. byte-identical answers, on every backend and datatype ------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_batched_answers_are_byte_identical_to_unbatched(backend, stub, gateway, batch_triton):
    rng = np.random.default_rng(sum(map(ord, backend)))
    datatypes = BACKENDS[backend]
    before = scrape(gateway.metrics_url)
    counts_before = (
        {dt: triton_counts(batch_triton, f"echo_{dt.lower()}") for dt in datatypes}
        if backend == "triton"
        else {}
    )
    expected_rows: dict[str, int] = {}
    calls: dict[str, int] = {}
    for datatype in datatypes:
        model = f"{PREFIX[backend]}-{datatype.lower()}"
        kinds = [True] if datatype in ("FP16", "BF16") else [True, False]  # FP16/BF16: raw only
        cases = []
        for raw in kinds:
            for k in range(CALLS):
                array = sample(datatype, 1 + k % 3, rng)
                cases.append((array, raw, f"{model}-{'raw' if raw else 'typed'}-{k}"))
        expected_rows[model] = sum(a.shape[0] for a, _, _ in cases)
        calls[model] = len(cases)

        def requests(version, cases=cases, model=model, datatype=datatype):
            return [
                echo_request(model, version, a, datatype, raw=raw, id_=id_) for a, raw, id_ in cases
            ]

        batched = fire(stub, requests("1"))  # all of a datatype's calls at once: they batch
        batched_answers = [f.result() for f in batched]
        direct = fire(stub, requests("2"))
        direct_answers = [f.result() for f in direct]
        for (array, _raw, id_), b, d, bf, df in zip(
            cases, batched_answers, direct_answers, batched, direct, strict=True
        ):
            assert trailers(bf)["x-tensorgate-variant"] == "batched"
            assert trailers(df)["x-tensorgate-variant"] == "direct"
            # The public version is the only field that may differ: it names the variant.
            assert (b.model_name, b.model_version, d.model_version) == (model, "1", "2")
            assert b.id == id_
            d.model_version = "1"
            assert canonical(b) == canonical(d), (id_, b, d)
            # ... and both are the echo of what was sent, exactly
            got = oip_codec.output_array(b, 0)
            assert b.outputs[0].name == "y" and b.outputs[0].datatype == datatype
            assert got.shape == array.shape, id_
            if datatype == "BYTES":
                assert got.reshape(-1).tolist() == array.reshape(-1).tolist(), id_
            else:
                assert got.tobytes() == array.tobytes(), id_
    after = scrape(gateway.metrics_url)

    sizes = {}
    for model, rows in expected_rows.items():
        batches, batched_rows, queued = grew(before, after, model)
        # Every call was queued once and every row went in some batch, in fewer batches than
        # calls: each batched call shared its backend call with others.
        assert (queued, batched_rows) == (calls[model], rows), model
        assert 1 <= batches < calls[model], (model, batches)
        sizes[model] = batched_rows / batches
        assert grew(before, after, model, "direct") == (0, 0, 0)  # batching off: no batches
    summary = f"{backend}: mean rows per batched backend call " + ", ".join(
        f"{m.split('-', 1)[1]} {s:.1f}" for m, s in sizes.items()
    )
    if backend == "triton":
        per_execution = []
        for datatype in datatypes:
            inferences, executions = triton_counts(batch_triton, f"echo_{datatype.lower()}")
            b_inf, b_exec = counts_before[datatype]
            # Triton itself does no batching here: each of its executions was one call from the
            # gateway. Batched + direct: direct calls were one execution each.
            model = f"t-{datatype.lower()}"
            direct_executions = calls[model]
            batched_executions = (executions - b_exec) - direct_executions
            batched_inferences = (inferences - b_inf) - expected_rows[model]
            assert batched_inferences == expected_rows[model]
            per_execution.append(batched_inferences / batched_executions)
            assert batched_inferences / batched_executions > 1.5, (datatype, per_execution)
        summary += f"; Triton inferences per execution (batched): min {min(per_execution):.1f}"
    print("\n" + summary)


# -- 2. only models with a batch dimension batch ---------------------------------------------------


def test_model_without_batch_dimension_passes_through(stub, gateway, batch_triton):
    before = scrape(gateway.metrics_url)
    inferences, executions = triton_counts(batch_triton, "demo_identity")
    requests = []
    for k in range(6):
        request = oip.ModelInferRequest(model_name="identity", model_version="1")
        oip_codec.add_input(request, "INPUT0", np.arange(k, k + 1 + k % 3, dtype=np.int32))
        requests.append(request)
    started = time.monotonic()
    futures = fire(stub, requests)
    answers = [f.result() for f in futures]
    elapsed = time.monotonic() - started
    for request, answer, future in zip(requests, answers, futures, strict=True):
        assert trailers(future)["x-tensorgate-variant"] == "batched"
        assert (
            oip_codec.output_array(answer, 0).tolist() == oip_codec.input_array(request, 0).tolist()
        )
    after = scrape(gateway.metrics_url)
    # Never queued (the variant's 200 ms queue delay would show), never merged: one Triton
    # execution per call.
    assert grew(before, after, "identity") == (0, 0, 0)
    assert triton_counts(batch_triton, "demo_identity") == (inferences + 6, executions + 6)
    print(f"\n6 concurrent calls to a model without batch dimension: {elapsed * 1000:.0f} ms")


# -- 3. per-caller deadline, cancellation and errors ---------------------------------------------


def test_queued_call_past_its_deadline_leaves_without_holding_the_others(stub, gateway):
    before = scrape(gateway.metrics_url)
    started = time.monotonic()
    late = stub.ModelInfer.future(fp32_request("slowq", [[9, 9], [9, 9], [9, 9]]), timeout=0.05)
    others = fire(stub, [fp32_request("slowq", [[1, 2]]), fp32_request("slowq", [[3, 4]])])
    with pytest.raises(grpc.RpcError) as err:
        late.result()
    late_after = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    answers = [oip_codec.output_array(f.result(), 0).tolist() for f in others]
    others_after = time.monotonic() - started
    assert answers == [[[1, 2]], [[3, 4]]]
    after = scrape(gateway.metrics_url)
    # The batch left with the two others only (2 rows, not 5), after its 200 ms queue delay.
    assert grew(before, after, "slowq")[:2] == (1, 2)
    assert late_after < 0.19, late_after
    assert others_after < 2.0, others_after
    print(f"\nlate caller out after {late_after * 1000:.0f} ms, others answered after "
          f"{others_after * 1000:.0f} ms")  # fmt: skip


def test_cancelled_caller_does_not_cancel_the_batch(stub, gateway, batch_triton):
    # Cancelled while queued: it leaves the batch, the others are answered.
    before = scrape(gateway.metrics_url)
    leaving = stub.ModelInfer.future(fp32_request("slowq", [[5, 5], [5, 5]]), timeout=TIMEOUT)
    staying = fire(stub, [fp32_request("slowq", [[1, 1]]), fp32_request("slowq", [[2, 2]])])
    time.sleep(0.05)
    assert leaving.cancel()
    assert [oip_codec.output_array(f.result(), 0).tolist() for f in staying] == [
        [[1, 1]],
        [[2, 2]],
    ]
    after = scrape(gateway.metrics_url)
    assert grew(before, after, "slowq")[:2] == (1, 2)

    # Cancelled while its batch is at the backend (sleep_fp32 sleeps x[0][0] seconds): the
    # backend call goes on, and the others get their own rows of its answer.
    inferences, executions = triton_counts(batch_triton, "sleep_fp32")
    rows = [[[0.6, 1]], [[0.6, 2], [0.6, 3]], [[0.6, 4]]]
    futures = fire(stub, [fp32_request("sleep", r) for r in rows])
    time.sleep(0.25)  # past the 20 ms queue delay: the batch of 4 rows is sleeping in Triton
    assert futures[0].cancel()
    assert [oip_codec.output_array(f.result(), 0).tolist() for f in futures[1:]] == [
        np.float32(r).tolist() for r in rows[1:]
    ]
    assert triton_counts(batch_triton, "sleep_fp32") == (inferences + 4, executions + 1)


def test_failed_batch_gives_every_member_the_backend_status(stub, gateway):
    # fail_fp32 refuses a request holding any negative element: the one bad call fails its
    # whole batch, and each member gets Triton's status (what batching a model costs).
    before = scrape(gateway.metrics_url)
    rows = [[[1, 2]], [[-1, 2], [3, 4]], [[5, 6]], [[7, 8], [9, 10], [11, 12]]]
    futures = fire(stub, [fp32_request("fail", r) for r in rows])
    for future in futures:
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
        assert "negative input in a batch of 7" in err.value.details()
        assert trailers(future)["x-tensorgate-variant"] == "batched"
    after = scrape(gateway.metrics_url)
    assert grew(before, after, "fail") == (1, 7, 4)
    # Alone, the good ones are answered.
    good = fire(stub, [fp32_request("fail", r, version="2") for r in rows if r[0][0] > 0])
    assert [oip_codec.output_array(f.result(), 0).tolist() for f in good] == [
        [[1, 2]],
        [[5, 6]],
        [[7, 8], [9, 10], [11, 12]],
    ]


def test_members_of_a_failed_batch_retry_and_fall_back_each_on_their_own(stub, gateway, proxy):
    rows = [[[k, 1]] for k in range(5)]
    # Healthy: the proxied variant batches (and its model's batch dimension is known).
    assert [oip_codec.output_array(f.result(), 0).tolist() for f in fire(
        stub, [fp32_request("failover", r, version="") for r in rows]
    )] == [np.float32(r).tolist() for r in rows]  # fmt: skip
    before = scrape(gateway.metrics_url)
    proxy.refuse()
    try:
        futures = fire(stub, [fp32_request("failover", r, version="") for r in rows])
        answers = [f.result() for f in futures]
    finally:
        proxy.heal()
    after = scrape(gateway.metrics_url)
    for r, answer, future in zip(rows, answers, futures, strict=True):
        meta = trailers(future)
        assert meta["x-tensorgate-degraded"] == "variant:backup"
        assert meta["x-tensorgate-variant"] == "backup"
        assert oip_codec.output_array(answer, 0).tolist() == np.float32(r).tolist()
    batches, batched_rows, queued = grew(before, after, "failover", "main")
    # Each member was retried on its own (5 retries), re-queued for a batch each time, then each
    # fell back on its own.
    assert metric(after, "tensorgate_retries_total", model="failover", code="UNAVAILABLE") - metric(
        before, "tensorgate_retries_total", model="failover", code="UNAVAILABLE"
    ) == len(rows)
    assert metric(
        after, "tensorgate_fallbacks_total", model="failover", step="variant:backup"
    ) - metric(
        before, "tensorgate_fallbacks_total", model="failover", step="variant:backup"
    ) == len(rows)
    assert queued == batched_rows == 2 * len(rows)  # first tries and retries, all queued
    assert batches < 2 * len(rows)  # and batched with one another
    # The fallbacks to the (batching) backup variant were batched too.
    backup = grew(before, after, "failover", "backup")
    assert backup[1:] == (len(rows), len(rows)) and backup[0] < len(rows), backup
    print(f"\nfailover: {queued:.0f} tries in {batches:.0f} batches; "
          f"{len(rows)} fallbacks in {backup[0]:.0f} batches")  # fmt: skip


def test_batch_limits(stub, gateway):
    """max_batch_size 4, preferred size 3, max_queued 5, max_queue_delay 200 ms."""
    # A preferred size is sent at once, without waiting out the queue delay.
    before = scrape(gateway.metrics_url)
    started = time.monotonic()
    futures = fire(stub, [fp32_request("limits", [[k, k]]) for k in range(3)])
    assert [oip_codec.output_array(f.result(), 0).tolist() for f in futures] == [
        [[k, k]] for k in range(3)
    ]
    preferred = time.monotonic() - started
    after = scrape(gateway.metrics_url)
    assert grew(before, after, "limits") == (1, 3, 3)
    # No batch over max_batch_size: 2 + 2 + 1 rows cannot go as one; 5 rows alone skip the queue.
    before = after
    rows = [[[1, 1], [2, 2]], [[3, 3], [4, 4]], [[5, 5]], [[6, 6]] * 5]
    futures = fire(stub, [fp32_request("limits", r) for r in rows])
    assert [oip_codec.output_array(f.result(), 0).tolist() for f in futures] == rows
    after = scrape(gateway.metrics_url)
    batches, batched_rows, queued = grew(before, after, "limits")
    assert (batched_rows, queued) == (5, 3) and batches >= 2
    le4 = "tensorgate_batch_size_bucket", {"model": "limits", "variant": "batched", "le": "4.0"}
    assert metric(after, le4[0], **le4[1]) == metric(
        after, "tensorgate_batch_size_count", model="limits", variant="batched"
    )
    # A full queue refuses at once: 7 calls that cannot share a batch (each its own width) wait
    # in 7 open batches; 5 may wait, the 6th and 7th get RESOURCE_EXHAUSTED.
    futures = fire(stub, [fp32_request("limits", [[0.0] * width]) for width in range(1, 8)])
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
            assert "the batching queue is full" in err.details()
    assert sorted(codes) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 2, codes
    print(f"\npreferred size 3 sent after {preferred * 1000:.0f} ms (queue delay 200 ms)")
    assert preferred < 0.19


def test_adaptive_dispatch_sends_idle_calls_at_once_and_batches_under_load(
    stub, gateway, batch_triton
):
    """The default dispatch (BATCH_DISPATCH_SEND_WHEN_IDLE) with a 1 s queue delay: a call to an
    idle backend is not delayed, and calls arriving while one is at the backend wait for company
    and go as one batch: Triton's own counters show the executions."""
    before = scrape(gateway.metrics_url)
    inferences, executions = triton_counts(batch_triton, "sleep_fp32")
    started = time.monotonic()
    for k in range(3):  # one at a time: each finds the backend idle
        answer = stub.ModelInfer(fp32_request("adaptive", [[0.0, k]]), timeout=TIMEOUT)
        assert oip_codec.output_array(answer, 0).tolist() == [[0.0, k]]
    idle = (time.monotonic() - started) / 3
    assert idle < 0.5, f"an idle call took {idle:.3f} s: it waited for company"
    assert triton_counts(batch_triton, "sleep_fp32") == (inferences + 3, executions + 3)
    # Under load: one call holds the backend for 0.5 s; five arriving meanwhile queue and go as
    # one batch when their 1 s delay runs out (about 1.1 s after the first).
    started = time.monotonic()
    slow = stub.ModelInfer.future(fp32_request("adaptive", [[0.5, 0.0]]), timeout=TIMEOUT)
    time.sleep(0.1)
    queued = fire(stub, [fp32_request("adaptive", [[0.0, k]]) for k in range(5)])
    answers = [oip_codec.output_array(f.result(), 0).tolist() for f in queued]
    elapsed = time.monotonic() - started
    assert slow.result() and answers == [[[0.0, k]] for k in range(5)]
    assert triton_counts(batch_triton, "sleep_fp32") == (inferences + 9, executions + 5)
    assert 1.0 <= elapsed < 2.0, f"{elapsed:.3f} s"
    batches, rows, queued_calls = grew(before, scrape(gateway.metrics_url), "adaptive")
    assert (batches, rows, queued_calls) == (5, 9, 9)
    print(
        f"\nadaptive: idle call {idle * 1000:.1f} ms; 5 queued behind a 0.5 s call: {elapsed:.2f} s"
    )


# -- 4. metrics ------------------------------------------------------------------------------------


def test_batching_metrics_per_variant(stub, gateway):
    before = scrape(gateway.metrics_url)
    futures = fire(stub, [fp32_request("t-fp32", [[k, k, k]] * (1 + k % 3)) for k in range(8)])
    for f in futures:
        f.result()
    after = scrape(gateway.metrics_url)
    batches, rows, queued = grew(before, after, "t-fp32")
    assert queued == 8 and rows == sum(1 + k % 3 for k in range(8)) and 1 <= batches < 8
    delay_sum = metric(
        after, "tensorgate_batch_queue_delay_seconds_sum", model="t-fp32", variant="batched"
    ) - metric(
        before, "tensorgate_batch_queue_delay_seconds_sum", model="t-fp32", variant="batched"
    )
    # queued at most a little over max_queue_delay (50 ms) each
    assert 0 < delay_sum < 8 * 0.5
    bucket = metric(
        after, "tensorgate_batch_size_bucket", model="t-fp32", variant="batched", le="1.0"
    ) - metric(before, "tensorgate_batch_size_bucket", model="t-fp32", variant="batched", le="1.0")
    assert bucket < batches  # some batch held more than one row
    text = "\n".join(f"{name}{dict(labels)}" for name, labels in after)
    assert "tensorgate_batch_queue_delay_seconds_bucket" in text
