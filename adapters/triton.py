"""NVIDIA Triton adapter: Open Inference Protocol over gRPC, so requests pass through as they are.

One grpc.aio channel per backend, opened once and reused by every call (HTTP/2 multiplexes the
concurrent calls). The channel's own retries are off: retrying is the gateway's decision, made in
a layer that can see deadlines and budgets.
"""

from __future__ import annotations

import functools
import time

import grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from adapters import parameters
from adapters.base import BackendError, ModelSpec, NoOptions, TensorSpec, backend_tensors
from adapters.grpc_common import channel_options, rpc_error
from gateway import tracing
from tensorgate.config.v1 import config_pb2


@functools.lru_cache(maxsize=4096)
def _model_fields(model: str, version: str) -> bytes:
    """ModelInferRequest fields 1 (model_name) and 2 (model_version), encoded. Appended to the
    caller's serialized request they ask for the backend's model and version: a protobuf parser
    keeps the last value of a singular field, so the request is neither copied nor edited."""
    return _string_field(1, model) + _string_field(2, version)


def _string_field(number: int, value: str) -> bytes:
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class TritonAdapter(NoOptions):
    parameters = parameters.TRITON

    def __init__(self, backend: config_pb2.Backend, *, max_request_bytes: int) -> None:
        self.name = backend.name
        self._channel = grpc.aio.insecure_channel(
            backend.address, options=channel_options(backend, max_request_bytes)
        )
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # Sends bytes built by `infer` (the caller's request plus the backend's model fields).
        self._infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        self._server_ready = stub.ServerReady
        self._stream = self._channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=oip.ModelStreamInferResponse.FromString,
        )
        self._model_ready = stub.ModelReady
        self._metadata = stub.ModelMetadata
        self._config = stub.ModelConfig
        # (model, version) -> (expires, output name -> datatype)
        self._output_types: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}

    def stream(self, *, timeout: float | None, metadata=()):
        """A ModelStreamInfer stream to this Triton: write `stream_request` bytes, read
        ModelStreamInferResponse messages."""
        return self._stream(timeout=timeout, metadata=metadata)

    def stream_request(self, request: oip.ModelInferRequest, target, backend_id: str) -> bytes:
        """The bytes to write on a stream for `request`: checked as for ModelInfer, asking the
        backend's model and version, under `backend_id` (the relay's own request id)."""
        parameters.check_parameters(request, parameters.TRITON_STREAM)
        if not request.raw_input_contents:
            parameters.check_data_present(request, "Triton")
        backend_request = backend_tensors(request, target)
        return (
            backend_request.SerializeToString()
            + _model_fields(target.backend_model, target.backend_version)
            + _string_field(3, backend_id)
        )

    def _error(self, err: grpc.aio.AioRpcError) -> BackendError:
        return rpc_error(err, self.name)

    async def infer(
        self, request: oip.ModelInferRequest, *, timeout: float | None, target
    ) -> oip.ModelInferResponse:
        # Validation already applied the primary variant's table; a retry, hedge, fallback or
        # shadow may bring the call here from another backend kind, so Triton checks its own.
        parameters.check_parameters(request, self.parameters)
        if not request.raw_input_contents:
            parameters.check_data_present(request, "Triton")
        backend_request = backend_tensors(request, target)
        if any(o.parameters for o in backend_request.outputs):
            await self._check_output_datatypes(backend_request, target, timeout)
        body = backend_request.SerializeToString() + _model_fields(
            target.backend_model, target.backend_version
        )
        try:
            return await self._infer(body, timeout=timeout, metadata=tracing.outgoing())
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None

    async def _check_output_datatypes(self, request, target, timeout: float | None) -> None:
        """Output parameters such as classification only on outputs of the datatypes Triton can
        take (classification of a BYTES output kills tritonserver 2.51). Checked here, on every
        call that carries one, whatever brought it (retry, fallback, hedge, shadow, another
        backend kind's route), against this model's outputs (cached for a minute)."""
        key = (target.backend_model, target.backend_version)
        cached = self._output_types.get(key)
        if cached is None or cached[0] < time.monotonic():
            # A failure to describe the model is the call's failure (the backend is down or the
            # model unknown): raised as is, so fallback and breakers see what they would have.
            meta = await self.metadata(*key, timeout=min(timeout or 5.0, 5.0))
            types = {t.name: t.datatype for t in meta.outputs}
            cached = self._output_types[key] = (time.monotonic() + 60.0, types)
        parameters.check_output_datatypes(request, self.parameters, target.model, cached[1])

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
