"""No log line of a running gateway exceeds its documented size, whatever callers send (issue 18,
item 6): a real `tensorgate serve` in Envoy mode (listeners.xds) with the admin API and an
access log of every call, in front of a real Triton, takes an 8 MiB model name, huge request
ids, versions and metadata values, a 3 MB xDS node id from a raw ADS client, and megabyte
fields on the admin API. Every call still gets its right status; every line of the gateway's
stderr and of its log file is at most 8 KiB (gateway.observability.logs.MAX_LINE_BYTES), and a cut value says it was
cut and how long it was. Before, the access log wrote the 8 MiB model name whole (an 8 MB line
per call) and the node id was logged twice in full."""

from __future__ import annotations

import json
import pathlib
import re
import time

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import duration_pb2
from tritonclient.grpc import service_pb2 as oip

from gateway.controlplane.envoy.resources import CLUSTER
from gateway.observability import logs
from tensorgate.admin.v1 import admin_pb2
from tests.backends.triton import free_port
from tests.builders import triton_backend, variant
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess
from tests.oip import Y_V1, linear_request, output

# The documented bound (docs/observability.md#logs), which gateway.observability.logs enforces.
MAX_LINE_BYTES = 8192
MODEL_CHARS = 8 << 20  # the 8 MiB model name
NODE_CHARS = 3_000_000  # the 3 MB xDS node id
ADMIN_CHARS = 3_000_000  # under the admin listener's 4 MiB message limit
# Metadata values as long as gRPC's default 8 KiB metadata limit lets through, one per call.
METADATA_CHARS = 7000
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
OIP = "/inference.GRPCInferenceService"
ADMIN_SERVICE = "/tensorgate.admin.v1.AdminService"
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
ROUTE = {"model": "linear", "variants": [variant("stable"), variant("canary", weight=0)]}


def _config(triton, log_file: pathlib.Path, **logging) -> dict:
    return {
        "backends": [triton_backend(triton.address)],
        "routes": [ROUTE],
        # 8 MiB bodies reach the gateway's own checks (gRPC accepts twice this).
        "limits": {"max_request_bytes": 32 << 20},
        "observability": {"logging": {"access_log_sample": 1.0, "file": str(log_file), **logging}},
    }


def _unary(channel, method: str, reply_type):
    return channel.unary_unary(
        method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=reply_type.FromString,
    )


def _code(call, request, **kwargs) -> grpc.StatusCode:
    try:
        call(request, timeout=30, **kwargs)
    except grpc.RpcError as err:
        assert len(err.details() or "") < 1000, "the status message quotes the value uncut"
        return err.code()
    return grpc.StatusCode.OK


def _data_plane(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        infer = _unary(channel, f"{OIP}/ModelInfer", oip.ModelInferResponse)
        huge = "m" * MODEL_CHARS
        for _ in range(3):  # the 3 calls
            assert _code(infer, linear_request(model=huge)) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(infer, linear_request(version="9" * MODEL_CHARS)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        request = linear_request()
        request.id = "i" * MODEL_CHARS
        assert _code(infer, request) == grpc.StatusCode.INVALID_ARGUMENT
        # caller metadata: an unusable request id is replaced, the others are passed or ignored
        for key in ("x-request-id", "traceparent", "tracestate", "x-tensorgate-route-key"):
            reply = infer(linear_request(), metadata=((key, "k" * METADATA_CHARS),), timeout=30)
            assert output(reply) == Y_V1, key
        for method, request, reply in (
            ("ModelMetadata", oip.ModelMetadataRequest(name=huge), oip.ModelMetadataResponse),
            ("ModelConfig", oip.ModelConfigRequest(name=huge), oip.ModelConfigResponse),
            ("ModelReady", oip.ModelReadyRequest(name=huge), oip.ModelReadyResponse),
            (
                "ModelStatistics",
                oip.ModelStatisticsRequest(name=huge),
                oip.ModelStatisticsResponse,
            ),
        ):
            call = _unary(channel, f"{OIP}/{method}", reply)
            assert _code(call, request) == grpc.StatusCode.INVALID_ARGUMENT, method


def _admin(address: str) -> None:
    huge = "a" * ADMIN_CHARS
    with grpc.insecure_channel(address) as channel:
        weights = _unary(
            channel, f"{ADMIN_SERVICE}/SetVariantWeights", admin_pb2.SetVariantWeightsResponse
        )
        changes = (
            (admin_pb2.SetVariantWeightsRequest(model=huge, weights={"stable": 1}), "NOT_FOUND"),
            (admin_pb2.SetVariantWeightsRequest(model="linear", weights={huge: 1}), "INVALID_ARGUMENT"),
        )  # fmt: skip
        for request, code in changes:
            assert _code(weights, request, metadata=ADMIN).name == code
        drain = _unary(channel, f"{ADMIN_SERVICE}/DrainBackend", admin_pb2.DrainBackendResponse)
        request = admin_pb2.DrainBackendRequest(backend=huge)
        assert _code(drain, request, metadata=ADMIN) == grpc.StatusCode.NOT_FOUND
        start = _unary(channel, f"{ADMIN_SERVICE}/StartRollout", admin_pb2.StartRolloutResponse)
        rollout = admin_pb2.StartRolloutRequest(
            model="linear",
            canary="canary",
            baseline="stable",
            min_step_duration=duration_pb2.Duration(seconds=600),
        )
        start(rollout, metadata=ADMIN, timeout=30)
        abort = _unary(channel, f"{ADMIN_SERVICE}/AbortRollout", admin_pb2.AbortRolloutResponse)
        # the reason is logged ("rollout of linear/canary: STATE_ABORTED (aborted by ops: ...)")
        ended = abort(
            admin_pb2.AbortRolloutRequest(model="linear", reason=huge), metadata=ADMIN, timeout=30
        )
        assert ended.rollout.state == admin_pb2.Rollout.STATE_ABORTED


def _xds(address: str) -> None:
    """A raw ADS client (no Envoy) naming itself with a 3 MB node id, then NACKing the
    clusters it is sent with a 3 MB error message."""
    with grpc.insecure_channel(address) as channel:
        ads = channel.stream_stream(
            ADS,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        first = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
        first.node.id = "n" * NODE_CHARS
        outbox: list = [first]
        responses = ads(iter(_Feed(outbox)), timeout=30)
        clusters = next(responses)
        assert clusters.type_url == CLUSTER and clusters.resources
        nack = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, response_nonce=clusters.nonce)
        nack.error_detail.message = "e" * NODE_CHARS
        outbox.append(nack)
        outbox.append(None)  # end of the stream
        assert list(responses) == []  # the server ends the stream once the client has


class _Feed:
    """Messages for a stream, taken from `box` as they are appended; None ends the stream."""

    def __init__(self, box: list) -> None:
        self._box = box

    def __iter__(self):
        while True:
            while not self._box:
                time.sleep(0.01)
            item = self._box.pop(0)
            if item is None:
                return
            yield item


def _lines(text: str) -> list[str]:
    return text.splitlines()


def _check(text: str, where: str) -> list[dict]:
    """Every line at most MAX_LINE_BYTES; the JSON ones parsed."""
    records = []
    for line in _lines(text):
        size = len(line.encode("utf-8", "backslashreplace"))
        assert size <= MAX_LINE_BYTES, f"{where}: a {size}-byte line: {line[:300]}..."
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


@pytest.fixture(scope="module")
def logged(triton, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("log-bounds") / "gateway.jsonl"
    xds = free_port()
    config = {**_config(triton, log_file), "listeners": {"xds": f"127.0.0.1:{xds}"}}
    with GatewayProcess(config, admin=True) as gw:
        _data_plane(gw.address)
        _admin(gw.admin_address)
        _xds(f"127.0.0.1:{xds}")
    return {"stderr": gw.log(), "file": log_file.read_text(errors="replace")}


def test_no_line_exceeds_the_documented_size(logged):
    for where in ("stderr", "file"):
        _check(logged[where], where)
        # 3 x 8 MiB model names, 2 x 3 MB node ids, ... came to 25 MB of log before
        assert len(logged[where]) < 1 << 20, f"{where}: {len(logged[where])} bytes of log"
    assert getattr(logs, "MAX_LINE_BYTES", None) == MAX_LINE_BYTES  # the code says the same


def test_cut_values_say_they_were_cut_and_how_long_they_were(logged):
    records = _check(logged["stderr"], "stderr")
    access = [r for r in records if r["logger"] == "tensorgate.access"]
    refused = [r for r in access if r["model"].startswith("mmmm")]
    assert len(refused) == 3, access
    for record in refused:
        assert record["code"] == "INVALID_ARGUMENT"
        assert record["model"].endswith(f"...(cut: {MODEL_CHARS} chars)")
    assert sum(r["code"] == "OK" for r in access) >= 4  # the calls with huge metadata
    nodes = [r["message"] for r in records if r["message"].startswith("xds: Envoy n")]
    assert len(nodes) >= 2, [r["message"] for r in records if "xds" in r["message"]]
    for message in nodes:
        assert f"...(cut: {NODE_CHARS} chars)" in message, message[:300]
    aborted = [r["message"] for r in records if "STATE_ABORTED" in r["message"]]
    assert aborted, [r["message"] for r in records]
    assert int(re.search(r"\.\.\.\(cut: (\d+) chars\)$", aborted[0])[1]) > ADMIN_CHARS


def test_text_format_lines_are_bounded_too(triton, tmp_path):
    """FORMAT_TEXT has no fields: caller values reach it through messages (the rollout's
    reason, here)."""
    log_file = tmp_path / "gateway.log"
    config = _config(triton, log_file, format="FORMAT_TEXT")
    with GatewayProcess(config, admin=True) as gw:
        _admin(gw.admin_address)
    for text in (gw.log(), log_file.read_text(errors="replace")):
        for line in _lines(text):
            size = len(line.encode("utf-8", "backslashreplace"))
            assert size <= MAX_LINE_BYTES, f"a {size}-byte line: {line[:300]}..."
        cuts = [int(n) for n in re.findall(r"\.\.\.\(cut: (\d+) chars\)", text)]
        assert cuts and max(cuts) > ADMIN_CHARS, cuts
