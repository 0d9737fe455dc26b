"""What the gRPC adapters (Triton, TF Serving) share: channel options and error mapping."""

from __future__ import annotations

import grpc

from adapters.base import BackendError
from tensorgate.config.v1 import config_pb2

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

# Codes Triton uses that mean "the backend is broken" are kept; UNKNOWN says nothing to a caller,
# so it becomes INTERNAL (the backend failed while handling a valid request).
_REMAP = {grpc.StatusCode.UNKNOWN: grpc.StatusCode.INTERNAL}


def channel_options(backend: config_pb2.Backend, max_request_bytes: int) -> list[tuple[str, int]]:
    conn = backend.connection
    max_bytes = conn.max_message_bytes or max(max_request_bytes, DEFAULT_MAX_RESPONSE_BYTES)
    options = [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.enable_retries", 0),
        # Several backends may share a host; distinct channels must not share one subchannel pool
        # or one sick backend's reconnect backoff would be felt by the others.
        ("grpc.use_local_subchannel_pool", 1),
        # gRPC's default reconnect backoff grows to 120 s; a restarted backend must be noticed
        # within seconds.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if conn.HasField("keepalive_time"):
        options.append(("grpc.keepalive_time_ms", conn.keepalive_time.ToMilliseconds()))
        options.append(("grpc.keepalive_permit_without_calls", 1))
    return options


def rpc_error(err: grpc.aio.AioRpcError, backend: str) -> BackendError:
    """The caller-facing error for a failed backend call: the backend's code and message, except
    UNKNOWN (says nothing) -> INTERNAL; a dead connection stays UNAVAILABLE, never UNKNOWN."""
    code = _REMAP.get(err.code(), err.code())
    details = err.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"backend {backend!r} unavailable: {details}"
    return BackendError(code, details, backend=backend)
