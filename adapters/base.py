"""The narrow interface every backend adapter implements, and the error type they raise.

An adapter speaks Open Inference Protocol (OIP) messages on the gateway side, so the layers around
it (validation, routing, metrics, later retries and breakers) never depend on a backend's protocol.
Like an httpx transport, it does one thing: carry a request to its backend and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from tritonclient.grpc import service_pb2 as oip

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.routing import Target


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
    """One input a model accepts, as far as the backend tells us."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None  # -1 = any size; None = any shape at all
    optional: bool = False


class Adapter(Protocol):
    """What the gateway needs from a backend. Model names and versions are the backend's own."""

    name: str

    async def infer(
        self, request: oip.ModelInferRequest, *, timeout: float | None, target: Target
    ) -> oip.ModelInferResponse:
        """`request` already names the backend's model and version; `target` carries the
        variant's backend-specific options (signature, version label, body contract, schema)."""
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

    async def input_specs(
        self, model: str, version: str, target: Target | None = None
    ) -> tuple[TensorSpec, ...] | None:
        """The model's inputs for request validation; None when the backend cannot say."""
        ...

    async def close(self) -> None: ...
