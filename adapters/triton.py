"""NVIDIA Triton adapter: Open Inference Protocol over gRPC, so requests pass through unchanged.

One grpc.aio channel per backend, opened once and reused by every call (HTTP/2 multiplexes the
concurrent calls). The channel's own retries are off: retrying is the gateway's decision, made in
a layer that can see deadlines and budgets.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from adapters import parameters
from adapters.base import BackendError, ModelSpec, TensorSpec
from adapters.grpc_common import channel_options, rpc_error
from tensorgate.config.v1 import config_pb2


class TritonAdapter:
    parameters = parameters.TRITON

    def __init__(self, backend: config_pb2.Backend, *, max_request_bytes: int) -> None:
        self.name = backend.name
        self._channel = grpc.aio.insecure_channel(
            backend.address, options=channel_options(backend, max_request_bytes)
        )
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer = stub.ModelInfer
        self._server_ready = stub.ServerReady
        self._model_ready = stub.ModelReady
        self._metadata = stub.ModelMetadata
        self._config = stub.ModelConfig

    def _error(self, err: grpc.aio.AioRpcError) -> BackendError:
        return rpc_error(err, self.name)

    async def infer(
        self, request: oip.ModelInferRequest, *, timeout: float | None, target=None
    ) -> oip.ModelInferResponse:
        # Validation already applied the primary variant's table; a retry, hedge, fallback or
        # shadow may bring the call here from another backend kind, so Triton checks its own.
        parameters.check_parameters(request, self.parameters)
        try:
            return await self._infer(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None

    async def ready(self, model: str = "", version: str = "", *, timeout: float = 2.0) -> bool:
        try:
            if not model:
                reply = await self._server_ready(oip.ServerReadyRequest(), timeout=timeout)
            else:
                reply = await self._model_ready(
                    oip.ModelReadyRequest(name=model, version=version), timeout=timeout
                )
        except grpc.aio.AioRpcError:
            return False
        return reply.ready

    async def metadata(
        self, model: str, version: str, *, timeout: float | None, target=None
    ) -> oip.ModelMetadataResponse:
        try:
            return await self._metadata(
                oip.ModelMetadataRequest(name=model, version=version), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None

    async def model_config(
        self, model: str, version: str, *, timeout: float | None, target=None
    ) -> oip.ModelConfigResponse:
        try:
            return await self._config(
                oip.ModelConfigRequest(name=model, version=version), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None

    async def model_spec(self, model: str, version: str, target=None) -> ModelSpec | None:
        """From ModelMetadata (tensors; a batching model's shapes start with -1 for the batch)
        and ModelConfig (optional inputs, max_batch_size)."""
        try:
            meta = await self.metadata(model, version, timeout=5.0)
            config = await self.model_config(model, version, timeout=5.0)
        except BackendError:
            return None
        optional = {i.name for i in config.config.input if i.optional}
        return ModelSpec(
            inputs=tuple(
                TensorSpec(t.name, t.datatype, tuple(t.shape), t.name in optional)
                for t in meta.inputs
            ),
            outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs),
            max_batch_size=max(0, config.config.max_batch_size),
        )

    async def close(self) -> None:
        await self._channel.close()
