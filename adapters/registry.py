"""Which adapter serves each backend kind, and which per-kind options it owns.

A backend kind is one row here plus its module: the config proto declares the kind's option
messages (a `oneof options` on Backend and on Variant, like Envoy's typed_config), and the
adapter class validates them (`check_backend`, `check_variant`). Nothing in gateway/ names a
backend-specific field.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

from adapters.base import Adapter
from tensorgate.config.v1 import config_pb2


@dataclass(frozen=True, slots=True)
class Kind:
    label: str  # for messages: "TF Serving"
    adapter: str  # "module:Class", imported on first use
    backend_options: str = ""  # the Backend.options field this kind may set ("" = none)
    variant_options: str = ""  # the Variant.options field this kind may set

    def adapter_class(self) -> type:
        module, _, name = self.adapter.partition(":")
        return getattr(importlib.import_module(module), name)


KINDS: dict[int, Kind] = {
    config_pb2.BACKEND_KIND_TRITON: Kind("Triton", "adapters.triton:TritonAdapter"),
    config_pb2.BACKEND_KIND_TFSERVING: Kind(
        "TF Serving", "adapters.tfserving:TFServingAdapter", variant_options="tfserving"
    ),
    config_pb2.BACKEND_KIND_TORCHSERVE: Kind(
        "TorchServe",
        "adapters.torchserve:TorchServeAdapter",
        backend_options="torchserve",
        variant_options="torchserve",
    ),
    # Any other Open Inference Protocol gRPC server; Triton is this kind plus its extensions.
    config_pb2.BACKEND_KIND_OIP: Kind("OIP", "adapters.oip:OIPAdapter"),
}


def build_adapter(backend: config_pb2.Backend, *, max_request_bytes: int) -> Adapter:
    kind = KINDS.get(backend.kind)
    if kind is None:
        raise ValueError(
            f"backend {backend.name!r}: kind {config_pb2.BackendKind.Name(backend.kind)} has no "
            "adapter"
        )
    return kind.adapter_class()(backend, max_request_bytes=max_request_bytes)


def variant_options(variant: config_pb2.Variant):
    """The variant's per-kind options message, or None when it sets none."""
    field = variant.WhichOneof("options")
    return getattr(variant, field) if field else None


def check_backend(backend: config_pb2.Backend, at: str) -> Iterator[tuple[str, str]]:
    """(field path, problem) for the backend's kind-specific parts."""
    kind = KINDS.get(backend.kind)
    if kind is None:
        return
    field = backend.WhichOneof("options")
    if field and field != kind.backend_options:
        yield f"{at}.{field}", f"options for another backend kind than {kind.label}"
        return
    yield from kind.adapter_class().check_backend(backend, at)


def check_variant(
    variant: config_pb2.Variant,
    backend: config_pb2.Backend,
    route: config_pb2.Route,
    at: str,
) -> Iterator[tuple[str, str]]:
    """(field path, problem) for a variant's kind-specific parts, given its backend."""
    kind = KINDS.get(backend.kind)
    if kind is None:
        return
    field = variant.WhichOneof("options")
    if field and field != kind.variant_options:
        yield (
            f"{at}.{field}",
            f"options for another backend kind: backend {backend.name!r} is {kind.label}",
        )
        return
    yield from kind.adapter_class().check_variant(variant, route, at)
