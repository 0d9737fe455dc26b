"""A recording pass-through between the gateway and a real Triton, for tests that must show what
reached the backend (and how the backend answered it).

Triton 2.51's ModelStatistics do not count requests it rejects before execution, so statistics
cannot tell "the gateway refused it" from "Triton refused it". The gateway's backend address is
therefore this proxy: a gRPC server that forwards every inference.GRPCInferenceService call byte
for byte to the real Triton and keeps each ModelInfer request it forwarded (`infers`), with the
status Triton answered it with (`outcomes`). Every ModelInfer also lands in `raw` as the bytes
Triton got and answered (tests of bodies Python's protobuf refuses to parse, which Triton's C++
parser may still read).
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as oip

SERVICE = "/inference.GRPCInferenceService/"
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class RecordingProxy:
    """Forwards every GRPCInferenceService call to `upstream` unchanged; keeps the ModelInfer
    requests it forwarded in `infers` and (request, Triton's status code, details) in
    `outcomes`, in the order the answers came back."""

    def __init__(self, upstream: str) -> None:
        self.infers: list[oip.ModelInferRequest] = []
        self.metadata: list[dict[str, str]] = []  # each ModelInfer's invocation metadata
        self.outcomes: list[tuple[oip.ModelInferRequest, grpc.StatusCode, str]] = []
        # (request bytes, Triton's status code, response bytes or b"")
        self.raw: list[tuple[bytes, grpc.StatusCode, bytes]] = []
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream, options=UNLIMITED)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(8), options=[*UNLIMITED, ("grpc.so_reuseport", 0)]
        )
        self._server.add_generic_rpc_handlers((_Forward(self),))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def forward(self, method: str, request: bytes, context) -> bytes:
        if not method.endswith("/ModelInfer"):
            return self._call(method, request, context)
        try:
            infer = oip.ModelInferRequest.FromString(request)
        except DecodeError:
            infer = None  # forwarded all the same: only `raw` shows it
        if infer is not None:
            with self._lock:
                self.infers.append(infer)
                self.metadata.append(dict(context.invocation_metadata() or ()))
        code, details, response = grpc.StatusCode.OK, "", b""
        try:
            response = self._channel.unary_unary(method)(request, timeout=context.time_remaining())
            return response
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            context.abort(code, details)
        finally:
            with self._lock:
                self.raw.append((request, code, response))
                if infer is not None:
                    self.outcomes.append((infer, code, details))

    def _call(self, method: str, request: bytes, context) -> bytes:
        try:
            return self._channel.unary_unary(method)(request, timeout=context.time_remaining())
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    def close(self) -> None:
        self._server.stop(0)
        self._channel.close()


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: RecordingProxy) -> None:
        self._proxy = proxy

    def service(self, details):
        method = details.method
        if not method.startswith(SERVICE):
            return None
        return grpc.unary_unary_rpc_method_handler(  # no (de)serializers: bytes in, bytes out
            lambda request, context: self._proxy.forward(method, request, context)
        )
