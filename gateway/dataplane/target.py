"""One variant of a route resolved to what its backend must be asked: the value every layer and
adapter passes around (a leaf module: adapters import it without importing the route table)."""

from __future__ import annotations

from dataclasses import dataclass

from tensorgate.config.v1 import config_pb2


@dataclass(frozen=True, slots=True)
class Target:
    """One variant of a route, resolved to what the backend must be asked."""

    model: str  # public model name
    variant: str
    backend: str
    backend_model: str
    backend_version: str
    version: str  # public version, "" when the variant is unversioned
    weight: int
    # The variant's per-kind options message (Variant.options; read only by its adapter), and
    # its serialized form: a hashable key for what the backend is asked (caches of model specs).
    options: object = None
    options_key: bytes = b""
    schema: config_pb2.ModelSchema | None = None  # the route's declared tensors, if any
    input_names: tuple[tuple[str, str], ...] = ()  # (public, backend) where they differ
    output_names: tuple[tuple[str, str], ...] = ()
    # The response trailers naming this variant, built once (they go out with every answer).
    trailers: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """What health checks probe: (backend, backend model, backend version)."""
        return (self.backend, self.backend_model, self.backend_version)
