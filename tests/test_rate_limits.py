"""Rate limits per caller and per route, on every path (ModelInfer, ModelStreamInfer, Envoy mode
handing the route to the gateway), counted in one process or in a real Redis shared by two
gateway processes, and what happens when that Redis goes away (fail open by default, fail
closed when configured)."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc

from tests.backends.process import free_port
from tests.backends.redis import RedisServer
from tests.builders import triton_backend, variant
from tests.callers import Signer, bearer, callers_config
from tests.gateway_process import GatewayProcess
from tests.loadgen import scrape
from tests.oip import linear_request, sleep_request
from tests.test_caller_auth import Caller
from tests.test_envoy_dataplane import envoy_in_front

PATHS = ("unary", "stream", "envoy")


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return Signer(tmp_path_factory.mktemp("jwks"))


def _limited_routes() -> list[dict]:
    return [
        *({"model": f"limited_{path}", "variants": [variant("v1")],
           "rate_limits": [{"name": "per-caller", "calls_per_second": 2, "burst": 4}]}
          for path in PATHS),
        {"model": "concurrent",
         "variants": [variant("s", backend_model="demo_sleep", backend_version=None)],
         "rate_limits": [{"name": "two-at-once", "max_concurrent": 2}]},
        {"model": "small_only", "variants": [variant("v1")],
         "rate_limits": [{"name": "bytes", "bytes_per_second": 24}]},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stack(triton, signer):
    xds, listen = free_port(), free_port()
    config = {
        "listeners": {"xds": f"127.0.0.1:{xds}"},
        "envoy": {"listen": f"127.0.0.1:{listen}"},
        "backends": [triton_backend(triton.address)],
        "callers": callers_config(signer, metric_labels=["noisy"]),
        "routes": _limited_routes(),
    }
    gateway = GatewayProcess(config)
    with envoy_in_front(gateway, "envoy-limits", 47) as envoy:
        yield gateway, envoy, f"127.0.0.1:{listen}"


@pytest.mark.parametrize("path", PATHS)
def test_a_caller_over_its_limit_is_told_when_to_retry_and_others_are_not(stack, signer, path):
    caller = Caller(path, stack)
    noisy, quiet = bearer(signer.token("noisy")), bearer(signer.token("quiet"))
    model = f"limited_{path}"
    outcomes = [caller(linear_request(model), noisy) for _ in range(12)]
    codes = [o[0] for o in outcomes]
    # a burst of 4 (plus what refills at 2/s while the calls run), then refusals
    assert 4 <= codes.count("OK") <= 7, codes
    limited = [o for o in outcomes if o[0] != "OK"]
    assert limited and all(
        o[0] in ("RESOURCE_EXHAUSTED", "ERROR") and "rate limit 'per-caller'" in o[1]
        and "retry after" in o[1] for o in limited
    ), limited  # fmt: skip
    assert caller(linear_request(model), quiet)[0] == "OK"  # a bucket of its own
    time.sleep(1.1)  # 2 calls/s refill
    assert caller(linear_request(model), noisy)[0] == "OK"
    caller.channel.close()
    limited_total = sum(
        value
        for (sample, labels), value in scrape(stack[0].metrics_url).items()
        if sample == "tensorgate_rate_limited_total" and ("model", model) in labels
        and ("caller", "noisy") in labels
    )  # fmt: skip
    assert limited_total == len(limited)


def test_the_retry_after_trailer(stack, signer):
    with grpc.insecure_channel(stack[0].address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        token = bearer(signer.token("trailer-reader"))
        for _ in range(10):
            try:
                stub.ModelInfer(linear_request("limited_unary"), metadata=token, timeout=5)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                trailers = dict(err.trailing_metadata() or ())
                assert 1 <= int(trailers["x-tensorgate-retry-after-ms"]) <= 1000
                return
    pytest.fail("never limited")


def test_calls_in_flight_and_bytes_per_second(stack, signer):
    with grpc.insecure_channel(stack[0].address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        token = bearer(signer.token("parallel"))

        def call(request):
            try:
                stub.ModelInfer(request, metadata=token, timeout=10)
            except grpc.RpcError as err:
                return err.code().name, err.details()
            return "OK", ""

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(call, [sleep_request(0.5, "concurrent")] * 4))
        assert sorted(o[0] for o in outcomes) == ["OK", "OK", "RESOURCE_EXHAUSTED",
                                                  "RESOURCE_EXHAUSTED"], outcomes  # fmt: skip
        assert any("2 calls in flight" in o[1] for o in outcomes)
        code, message = call(linear_request("small_only"))  # ~50 bytes: over 24 bytes/s
        assert code == "RESOURCE_EXHAUSTED" and "can never pass" in message


def _redis_config(triton, signer, redis: RedisServer, **limiter) -> dict:
    redis_limiter = {"address": redis.address, "timeout": "0.2s", **limiter}
    limit = {"name": "fleet", "per": "PER_ROUTE", "calls_per_second": 1, "burst": 10}
    return {
        "backends": [triton_backend(triton.address)],
        "callers": callers_config(signer, rate_limiter={"redis": redis_limiter}),
        "routes": [{"model": "shared", "variants": [variant("v1")], "rate_limits": [limit]}],
    }


def _count_ok(gateway, token, n: int) -> list[str]:
    with grpc.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        codes = []
        for _ in range(n):
            try:
                stub.ModelInfer(linear_request("shared"), metadata=token, timeout=5)
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
        return codes


def test_a_route_limit_shared_by_two_processes_through_redis(triton, signer):
    with RedisServer() as redis:
        config = _redis_config(triton, signer, redis)
        with GatewayProcess(config) as a, GatewayProcess(config) as b:
            token = bearer(signer.token("anyone"))
            codes = _count_ok(a, token, 8) + _count_ok(b, token, 8)
            # one bucket of 10 for the fleet (+1/s refill): two local buckets would pass 16
            assert 10 <= codes.count("OK") <= 12, codes
            assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}
            # Redis gone: fail open (the default), counted
            redis.kill()
            assert _count_ok(a, token, 5) == ["OK"] * 5
            errors = sum(
                value
                for (sample, labels), value in scrape(a.metrics_url).items()
                if sample == "tensorgate_rate_limiter_errors_total"
                and ("outcome", "allowed") in labels
            )  # fmt: skip
            assert errors == 5


def test_fail_closed_refuses_what_it_cannot_count(triton, signer):
    with RedisServer() as redis:
        config = _redis_config(triton, signer, redis, fail_closed=True)
        with GatewayProcess(config) as gateway:
            token = bearer(signer.token("anyone"))
            assert _count_ok(gateway, token, 1) == ["OK"]
            redis.kill()
            with grpc.insecure_channel(gateway.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(linear_request("shared"), metadata=token, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "rate limiter (Redis)" in err.value.details()
            redis.start()  # the same port: the limiter reconnects
            deadline = time.monotonic() + 10
            while _count_ok(gateway, token, 1) != ["OK"]:
                assert time.monotonic() < deadline, "never reconnected to Redis"
                time.sleep(0.2)
