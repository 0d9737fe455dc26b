"""A unary call carries exactly one request message (issue 18, item 7), against a real gateway
in front of a real Triton: a call half-closed with no message, or with two messages, is
answered INVALID_ARGUMENT at once on every listener (data plane, health, admin API), and such
calls do not hold a SIGTERM drain. Before, grpcio left a message-less call unanswered until the
caller's deadline and dropped a second message unseen."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as oip

from tensorgate.admin.v1 import admin_pb2
from tests.gateway_process import ADMIN_TOKEN, READ_TOKEN, GatewayProcess, triton_backend
from tests.oip import Y_V1, linear_request, output

LINEAR = {
    "model": "linear",
    "variants": [
        {"name": "a", "backend": "triton-a", "backend_model": "demo_linear",
         "backend_version": "1", "weight": 1},
    ],
}  # fmt: skip
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
# The caller's deadline: far above how fast a refusal must come.
DEADLINE_S = 30.0
AT_ONCE_S = 3.0
NONE = "a unary call carries exactly one request message; got none"
SEVERAL = "a unary call carries exactly one request message; got several"

OIP = "/inference.GRPCInferenceService"
ADMIN_SERVICE = "/tensorgate.admin.v1.AdminService"
UNARY = [
    # (method, request, admin listener)
    (f"{OIP}/ModelInfer", linear_request(), False),
    (f"{OIP}/ModelMetadata", oip.ModelMetadataRequest(name="linear"), False),
    (f"{OIP}/ServerLive", oip.ServerLiveRequest(), False),
    ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(), False),
    (f"{ADMIN_SERVICE}/GetRouteTable", admin_pb2.GetRouteTableRequest(), True),
    (
        f"{ADMIN_SERVICE}/SetVariantWeights",
        admin_pb2.SetVariantWeightsRequest(model="linear", weights={"a": 2}),
        True,
    ),
]


@pytest.fixture(scope="module")
def gateway(triton):
    config = {"backends": [triton_backend(triton.address)], "routes": [LINEAR]}
    with GatewayProcess(config, admin=True) as gw:
        yield gw


def _refused(channel, method: str, messages: list, *, metadata=()) -> tuple[grpc.RpcError, float]:
    """Send `messages` on a call to a unary method; the error it ended with and how long
    that took."""
    call = channel.stream_unary(method, request_serializer=lambda m: m.SerializeToString())
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call(iter(messages), timeout=DEADLINE_S, metadata=metadata)
    return caught.value, time.monotonic() - started


@pytest.mark.parametrize("count", [0, 2, 3])
@pytest.mark.parametrize(("method", "request_", "admin"), UNARY, ids=[m for m, _, _ in UNARY])
def test_zero_or_several_messages_are_invalid_argument_at_once(
    gateway, method, request_, admin, count
):
    address = gateway.admin_address if admin else gateway.address
    with grpc.insecure_channel(address) as channel:
        error, took = _refused(channel, method, [request_] * count, metadata=ADMIN if admin else ())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.details().startswith(NONE if count == 0 else SEVERAL), error.details()
        assert took < AT_ONCE_S, f"{method}: answered after {took:.1f}s"
        # the same method with one message still works on the same channel
        call = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString())
        call(request_, timeout=10, metadata=ADMIN if admin else ())


def test_health_watch_with_no_message_is_invalid_argument(gateway):
    """Health Watch (unary request, streamed answers) too."""
    with grpc.insecure_channel(gateway.address) as channel:
        watch = channel.stream_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(watch(iter([]), timeout=DEADLINE_S))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(NONE)
        assert time.monotonic() - started < AT_ONCE_S
        # one message: the stream answers as before
        answers = watch(iter([health_pb2.HealthCheckRequest()]), timeout=DEADLINE_S)
        assert next(answers).status == health_pb2.HealthCheckResponse.SERVING
        answers.cancel()


def test_two_infer_messages_run_neither(gateway):
    """The first of two messages is not answered either: the call is refused as a whole."""
    with grpc.insecure_channel(gateway.address) as channel:
        infer = channel.stream_unary(
            f"{OIP}/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            infer(iter([linear_request(), linear_request()]), timeout=DEADLINE_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # written the same way, one message is an ordinary call
        assert output(infer(iter([linear_request()]), timeout=10)) == Y_V1


def test_admin_credentials_are_still_checked_first(gateway):
    """The admin API's unary methods are registered as streaming-request ones underneath: the
    authentication interceptor must still guard them (and before reading any message)."""
    method = f"{ADMIN_SERVICE}/SetVariantWeights"
    change = admin_pb2.SetVariantWeightsRequest(model="linear", weights={"a": 1})
    with grpc.insecure_channel(gateway.admin_address) as channel:
        for metadata, messages, code in (
            ((), [change], grpc.StatusCode.UNAUTHENTICATED),
            ((), [], grpc.StatusCode.UNAUTHENTICATED),
            (
                (("authorization", "Bearer wrong-token-0123456789"),),
                [change],
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            (
                (("authorization", f"Bearer {READ_TOKEN}"),),
                [change],
                grpc.StatusCode.PERMISSION_DENIED,
            ),
        ):
            error, _ = _refused(channel, method, messages, metadata=metadata)
            assert error.code() == code, (metadata, error)
        read = channel.unary_unary(
            f"{ADMIN_SERVICE}/GetRouteTable",
            request_serializer=admin_pb2.GetRouteTableRequest.SerializeToString,
            response_deserializer=admin_pb2.GetRouteTableResponse.FromString,
        )
        table = read(
            admin_pb2.GetRouteTableRequest(), metadata=(("authorization", f"Bearer {READ_TOKEN}"),)
        )
        assert [r.model for r in table.routes] == ["linear"]


def test_sigterm_during_message_less_calls_exits_well_within_grace(triton):
    """Three calls half-closed with no message, then SIGTERM: they are answered at once, and
    the gateway exits in a few seconds, not after its 20 s shutdown_grace."""
    config = {
        "backends": [triton_backend(triton.address)],
        "routes": [LINEAR],
        "lifecycle": {"drain_delay": "0s", "shutdown_grace": "20s"},
    }
    with GatewayProcess(config) as gw, grpc.insecure_channel(gw.address) as channel:
        infer = channel.stream_unary(
            f"{OIP}/ModelInfer", request_serializer=oip.ModelInferRequest.SerializeToString
        )
        calls = [infer.future(iter([]), timeout=60) for _ in range(3)]
        time.sleep(0.5)
        signalled = time.monotonic()
        gw.terminate()
        assert gw.proc.wait(15) == 0
        took = time.monotonic() - signalled
        assert took < 5.0, f"exit {took:.1f}s after SIGTERM"
        for call in calls:
            assert call.exception(timeout=1).code() == grpc.StatusCode.INVALID_ARGUMENT
