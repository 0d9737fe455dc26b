"""The narrow interface every backend adapter implements, and the error type they raise.

An adapter speaks Open Inference Protocol (OIP) messages on the gateway side, so the layers around
it (validation, routing, metrics, later retries and breakers) never depend on a backend's protocol.
Like an httpx transport, it does one thing: carry a request to its backend and back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from tritonclient.grpc import service_pb2 as oip

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from adapters.parameters import ParameterRules
    from gateway.dataplane.target import Target


class BackendError(GatewayError):
    """A failed backend call, already mapped to the gRPC status the caller should see.

    `message` must be safe to show the caller: adapters never put credentials or addresses with
    user info into it.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, backend: str = "") -> None:
        super().__init__(code, message)
        self.backend = backend


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input a model accepts (or one output it produces), as far as the backend tells us."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None  # -1 = any size; None = any shape at all
    optional: bool = False


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What request validation knows about one model version, in the backend's tensor names.

    `outputs` is None when the backend does not list its outputs (then any requested output
    name is left to the backend). `max_batch_size` > 0 means the model batches: the first
    dimension of every input (included in its `shape`, as -1) is the batch size, between 1 and
    `max_batch_size`, the same for every input. 0 means no batch dimension, or none known.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] | None = None
    max_batch_size: int = 0
    # Answers 0..N times per request (Triton's model_transaction_policy.decoupled): only a
    # stream can carry it (gateway/dataplane/streaming.py).
    decoupled: bool = False


def declared_spec(schema) -> ModelSpec:
    """The ModelSpec a route's declared schema (config_pb2.ModelSchema) gives, in public names."""

    def specs(tensors) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(t.name, t.datatype, tuple(t.shape) or None, t.optional) for t in tensors
        )

    return ModelSpec(
        specs(schema.inputs),
        specs(schema.outputs) if schema.outputs else None,
        schema.max_batch_size,
    )


def backend_tensors(request: oip.ModelInferRequest, target: Target) -> oip.ModelInferRequest:
    """`request` with input and requested-output names as the variant's backend knows them:
    `request` itself when the variant renames nothing, else a renamed copy."""
    if not (target.input_names or target.output_names):
        return request
    copy = oip.ModelInferRequest()
    copy.CopyFrom(request)
    for tensors, names in ((copy.inputs, target.input_names), (copy.outputs, target.output_names)):
        if names:
            backend = dict(names)
            for tensor in tensors:
                tensor.name = backend.get(tensor.name, tensor.name)
    return copy


class Adapter(Protocol):
    """What the gateway needs from a backend. Model names and versions are the backend's own."""

    name: str
    # Which InferParameters this backend is sent (an allowlist; adapters/parameters.py).
    parameters: ParameterRules

    async def infer(
        self, request: oip.ModelInferRequest, *, timeout: float | None, target: Target
    ) -> oip.ModelInferResponse:
        """`request` is the caller's, in the route's public names, and must not be edited: the
        adapter builds its backend's request from it, asking for `target.backend_model` and
        `target.backend_version`, with tensors under their backend names (`backend_tensors`).
        `target` also carries the variant's backend-specific options."""
        ...

    async def ready(self, model: str = "", version: str = "", *, timeout: float = 2.0) -> bool:
        """Server readiness when `model` is empty, else readiness of that model (version)."""
        ...

    async def metadata(
        self, model: str, version: str, *, timeout: float | None, target: Target | None = None
    ) -> oip.ModelMetadataResponse: ...

    async def model_config(
        self, model: str, version: str, *, timeout: float | None, target: Target | None = None
    ) -> oip.ModelConfigResponse:
        """Backends without a model config raise BackendError(UNIMPLEMENTED)."""
        ...

    async def model_spec(
        self, model: str, version: str, target: Target | None = None
    ) -> ModelSpec | None:
        """The model's inputs, outputs and batching for request validation, in the backend's
        tensor names; None when the backend cannot say."""
        ...

    async def close(self) -> None: ...

    # Validation of the kind's own options (config_pb2 Backend.options / Variant.options), run
    # by the config checker through adapters/registry.py: (field path, problem) pairs.
    @classmethod
    def check_backend(cls, backend, at: str) -> Iterator[tuple[str, str]]: ...

    @classmethod
    def check_variant(cls, variant, route, at: str) -> Iterator[tuple[str, str]]: ...


class NoOptions:
    """The checks of an adapter whose kind has no options of its own (override either one when
    it has some: backend options, variant options)."""

    @classmethod
    def check_backend(cls, backend, at: str) -> Iterator[tuple[str, str]]:
        return iter(())

    @classmethod
    def check_variant(cls, variant, route, at: str) -> Iterator[tuple[str, str]]:
        return iter(())
