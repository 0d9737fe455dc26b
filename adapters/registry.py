"""Builds the adapter for a configured backend from its kind."""

from __future__ import annotations

from adapters.base import Adapter
from tensorgate.config.v1 import config_pb2


def build_adapter(backend: config_pb2.Backend, *, max_request_bytes: int) -> Adapter:
    kind = backend.kind
    if kind == config_pb2.BACKEND_KIND_TRITON:
        from adapters.triton import TritonAdapter

        return TritonAdapter(backend, max_request_bytes=max_request_bytes)
    if kind == config_pb2.BACKEND_KIND_TFSERVING:
        from adapters.tfserving import TFServingAdapter

        return TFServingAdapter(backend, max_request_bytes=max_request_bytes)
    if kind == config_pb2.BACKEND_KIND_TORCHSERVE:
        from adapters.torchserve import TorchServeAdapter

        return TorchServeAdapter(backend)
    raise ValueError(
        f"backend {backend.name!r}: kind {config_pb2.BackendKind.Name(kind)} has no adapter yet"
    )
