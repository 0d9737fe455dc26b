"""tests/faults/proxy.py against a real gRPC server: every fault, with its status code and timing."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.faults.proxy import FaultProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
# Short reconnect backoff so a channel recovers within a test after refuse()/reset().
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as p:
        yield p


@pytest.fixture
def stub(proxy: FaultProxy) -> Iterator[health_pb2_grpc.HealthStub]:
    with grpc.insecure_channel(proxy.address, options=CHANNEL_OPTIONS) as channel:
        yield health_pb2_grpc.HealthStub(channel)


def check(stub: health_pb2_grpc.HealthStub, timeout: float = 2.0) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status


def timed_failure(
    stub: health_pb2_grpc.HealthStub, timeout: float = 5.0
) -> tuple[grpc.StatusCode, float]:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        check(stub, timeout)
    return err.value.code(), time.monotonic() - start


def check_eventually(stub: health_pb2_grpc.HealthStub, within: float = 3.0) -> None:
    """Retry while the channel backs off from earlier failures; fail if it never recovers."""
    deadline = time.monotonic() + within
    while True:
        try:
            assert check(stub, timeout=0.5) == SERVING
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_forwards_grpc_and_counts(proxy: FaultProxy, stub: health_pb2_grpc.HealthStub) -> None:
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    for _ in range(3):
        assert check(stub) == SERVING
    assert proxy.connections_accepted == 1  # HTTP/2: one connection carries all calls
    assert proxy.active_connections == 1
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0


def test_latency_delays_each_direction(proxy: FaultProxy, stub: health_pb2_grpc.HealthStub) -> None:
    assert check(stub) == SERVING  # connect first, so only the call itself is timed
    proxy.set_latency(0.2)
    start = time.monotonic()
    assert check(stub) == SERVING
    elapsed = time.monotonic() - start
    # The request and the response are each held 0.2 s.
    assert 0.4 <= elapsed < 1.5
    proxy.heal()
    start = time.monotonic()
    assert check(stub) == SERVING
    assert time.monotonic() - start < 0.2


def test_reset_fails_fast_until_heal(proxy: FaultProxy, stub: health_pb2_grpc.HealthStub) -> None:
    assert check(stub) == SERVING
    accepted = proxy.connections_accepted
    proxy.reset()
    assert proxy.active_connections == 0
    code, elapsed = timed_failure(stub)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 1.0
    # New connections are reset right after accept.
    with grpc.insecure_channel(proxy.address, options=CHANNEL_OPTIONS) as channel:
        code, elapsed = timed_failure(health_pb2_grpc.HealthStub(channel))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 1.0
    assert proxy.connections_accepted > accepted
    assert proxy.active_connections == 0
    proxy.heal()
    check_eventually(stub)


def test_reset_kills_a_call_in_flight(proxy: FaultProxy, stub: health_pb2_grpc.HealthStub) -> None:
    assert check(stub) == SERVING
    proxy.blackhole()  # park the next call on the open connection
    call = stub.Check.future(health_pb2.HealthCheckRequest(service=""), timeout=5)
    time.sleep(0.1)
    start = time.monotonic()
    proxy.reset()
    with pytest.raises(grpc.RpcError) as err:
        call.result()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 1.0


def test_blackhole_hangs_until_deadline_then_heals(
    proxy: FaultProxy, stub: health_pb2_grpc.HealthStub
) -> None:
    assert check(stub) == SERVING
    proxy.blackhole()
    code, elapsed = timed_failure(stub, timeout=0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.5 <= elapsed < 1.0
    assert proxy.active_connections == 1  # hung, not closed
    proxy.heal()  # held bytes are delivered in order, so the same connection works again
    assert check(stub) == SERVING
    assert proxy.connections_accepted == 1


def test_blackhole_new_connection(proxy: FaultProxy) -> None:
    proxy.blackhole()
    with grpc.insecure_channel(proxy.address, options=CHANNEL_OPTIONS) as channel:
        code, elapsed = timed_failure(health_pb2_grpc.HealthStub(channel), timeout=0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.5 <= elapsed < 1.0
    assert proxy.connections_accepted == 1
    assert proxy.bytes_up == proxy.bytes_down == 0


def test_refuse_then_heal_on_same_port(proxy: FaultProxy, stub: health_pb2_grpc.HealthStub) -> None:
    assert check(stub) == SERVING
    port = proxy.port
    proxy.refuse()
    assert proxy.active_connections == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    code, elapsed = timed_failure(stub)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 1.0
    proxy.heal()
    assert proxy.port == port
    check_eventually(stub)


async def test_usable_from_an_async_test(proxy: FaultProxy) -> None:
    """Fault calls from a pytest-asyncio loop; the proxy's own loop keeps forwarding."""
    async with grpc.aio.insecure_channel(proxy.address, options=CHANNEL_OPTIONS) as channel:
        aio_stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        assert (await aio_stub.Check(request, timeout=2)).status == SERVING
        proxy.set_latency(0.2)
        start = time.monotonic()
        assert (await aio_stub.Check(request, timeout=2)).status == SERVING
        assert 0.4 <= time.monotonic() - start < 1.5
        proxy.reset()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await aio_stub.Check(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
