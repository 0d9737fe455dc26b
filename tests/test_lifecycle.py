"""SIGTERM: readiness drops, new calls are refused, in-flight calls finish, exit 0."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from tests.gateway_process import GatewayProcess, triton_backend
from tests.oip import sleep_request


def sleep_gateway(triton, *, grace: str, drain_delay: str) -> GatewayProcess:
    return GatewayProcess(
        {
            "backends": [triton_backend(triton.address)],
            "routes": [
                {"model": "sleep", "variants": [{"name": "only", "backend": "triton-a", "backend_model": "demo_sleep", "weight": 1}]}
            ],
            "lifecycle": {"shutdown_grace": grace, "drain_delay": drain_delay},
        }
    )  # fmt: skip


def _call_in_thread(stub, seconds: float, results: list) -> threading.Thread:
    def run() -> None:
        try:
            stub.ModelInfer(sleep_request(seconds), timeout=30)
            results.append("OK")
        except grpc.RpcError as err:
            results.append(err.code().name)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_drains_in_flight_calls_then_exits_zero(triton):
    gw = sleep_gateway(triton, grace="10s", drain_delay="1s").start()
    try:
        with grpc.insecure_channel(gw.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            results: list[str] = []
            threads = [_call_in_thread(stub, 2.5, results) for _ in range(3)]
            time.sleep(0.5)  # the calls are in flight at Triton
            signalled = time.monotonic()
            gw.terminate()
            time.sleep(0.3)
            # Draining: still up, but says NOT_SERVING so load balancers stop sending.
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not stub.ServerReady(oip.ServerReadyRequest(), timeout=2).ready
            alive = health.Check(
                health_pb2.HealthCheckRequest(service="tensorgate.liveness"), timeout=2
            )
            assert alive.status == health_pb2.HealthCheckResponse.SERVING  # draining, not dead
            time.sleep(1.2)  # past drain_delay: the listener refuses new calls
            with grpc.insecure_channel(gw.address) as fresh:
                refused = service_pb2_grpc.GRPCInferenceServiceStub(fresh)
                try:
                    refused.ModelInfer(sleep_request(0.0), timeout=2)
                    raise AssertionError("a new call was accepted after the drain delay")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
            for thread in threads:
                thread.join(15)
        assert results == ["OK", "OK", "OK"]
        assert gw.proc.wait(15) == 0
        # Exit soon after the last in-flight call, not after the full 10 s grace.
        assert time.monotonic() - signalled < 6.0
    finally:
        gw.stop()


def test_calls_longer_than_grace_are_cut_and_exit_is_still_zero(triton):
    gw = sleep_gateway(triton, grace="1s", drain_delay="0s").start()
    try:
        with grpc.insecure_channel(gw.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            results: list[str] = []
            thread = _call_in_thread(stub, 6.0, results)
            time.sleep(0.5)
            signalled = time.monotonic()
            gw.terminate()
            assert gw.proc.wait(10) == 0
            assert time.monotonic() - signalled < 4.0
            thread.join(10)
        assert results and results[0] != "OK"
    finally:
        gw.stop()
