"""Any Open Inference Protocol (KServe v2) gRPC server: `inference.GRPCInferenceService`.

The gateway's callers speak this protocol too, so requests pass through as protobuf messages, with
only the model name and version (and tensor names, when the variant renames them) set to the
backend's. What this adapter assumes of a server is what the protocol requires of every one
(ServerReady, ModelReady, ModelMetadata, ModelInfer), and no more, as measured against KServe's
Python model server 0.21 (docs/backends-oip.md):

- ModelConfig is an optional extension: forwarded, and when the server answers UNIMPLEMENTED the
  caller gets UNIMPLEMENTED saying so (a config made up from the metadata would state a batch size,
  platform and instance groups the server never declared). Request validation then works from
  ModelMetadata alone (no optional inputs, no batch dimension known).
- Versions: `model_version` is sent as the variant says; a server may ignore it (KServe answers
  every version with its one model, and lists no `versions` in ModelMetadata). Nothing here
  depends on a version list.
- Outputs are named by the server (KServe names a model's array "output-0"); the route's
  output_names map public names to those. A server that answers outputs the caller did not ask
  for (KServe returns every output whatever was requested) is trimmed to the requested ones, as
  the protocol says, when all of them are in its answer.
- No InferParameters are forwarded (`parameters.OIP`): the protocol defines none.
- Errors: the server's gRPC status and message pass through; UNKNOWN becomes INTERNAL; a
  connection failure is UNAVAILABLE naming the backend (adapters/grpc_common.py).

One grpc.aio channel per backend, opened once and reused by every call (HTTP/2 multiplexes the
concurrent calls). The channel's own retries are off: retrying is the gateway's decision, made in
a layer that can see deadlines and budgets.

Triton (adapters/triton.py) is this adapter plus Triton's extensions.
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
from gateway.observability import tracing
from tensorgate.config.v1 import config_pb2


@functools.lru_cache(maxsize=4096)
def model_fields(model: str, version: str) -> bytes:
    """ModelInferRequest fields 1 (model_name) and 2 (model_version), encoded. Appended to the
    caller's serialized request they ask for the backend's model and version: a protobuf parser
    keeps the last value of a singular field, so the request is neither copied nor edited."""
    return string_field(1, model) + string_field(2, version)


def string_field(number: int, value: str) -> bytes:
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def requested_only(
    request: oip.ModelInferRequest, response: oip.ModelInferResponse
) -> oip.ModelInferResponse:
    """`response` without the outputs `request` did not ask for (in place). Left as the server
    sent it when the request names no outputs, when one requested output is not in the answer
    (the server named its outputs otherwise: what it sent is all there is), or when its
    raw_output_contents do not pair one to one with its outputs."""
    if not request.outputs or len(response.outputs) <= len(request.outputs):
        return response
    wanted = {o.name for o in request.outputs}
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents
    if not wanted.issubset(names) or (raw and len(raw) != len(names)):
        return response
    for index in reversed(range(len(names))):
        if names[index] not in wanted:
            del response.outputs[index]
            if raw:
                del raw[index]
    return response


class OIPAdapter(NoOptions):
    """A backend of kind BACKEND_KIND_OIP (and the base of TritonAdapter)."""

    parameters = parameters.OIP
    # Whether answers are trimmed to the requested outputs (`requested_only`). Triton answers
    # only those, so it skips the work.
    trims_outputs = True

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
        self._model_ready = stub.ModelReady
        self._metadata = stub.ModelMetadata
        self._config = stub.ModelConfig
        # (model, version) -> (expires, output name -> datatype)
        self._output_types: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}

    def _error(self, err: grpc.aio.AioRpcError) -> BackendError:
        return rpc_error(err, self.name)

    async def infer(
        self, request: oip.ModelInferRequest, *, timeout: float | None, target
    ) -> oip.ModelInferResponse:
        # Validation already applied the primary variant's table; a retry, hedge, fallback or
        # shadow may bring the call here from another backend kind, so the adapter checks its own.
        rules = self.parameters
        parameters.check_parameters(request, rules)
        if rules.data_required and not request.raw_input_contents:
            parameters.check_data_present(request, rules.backend)
        backend_request = backend_tensors(request, target)
        if rules.outputs and any(o.parameters for o in backend_request.outputs):
            await self._check_output_datatypes(backend_request, target, timeout)
        body = backend_request.SerializeToString() + model_fields(
            target.backend_model, target.backend_version
        )
        try:
            response = await self._infer(body, timeout=timeout, metadata=tracing.outgoing())
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        if self.trims_outputs:
            return requested_only(backend_request, response)
        return response

    async def _check_output_datatypes(self, request, target, timeout: float | None) -> None:
        """Output parameters that the rules allow only on some datatypes (Triton's
        classification: a BYTES output kills tritonserver 2.51). Checked here, on every call that
        carries one, whatever brought it (retry, fallback, hedge, shadow, another backend kind's
        route), against this model's outputs (cached for a minute)."""
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
        """ServerReady, or ModelReady; any error is "not ready" (KServe answers NOT_FOUND for a
        model it does not have, Triton ready=false)."""
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
        """The server's ModelConfig; UNIMPLEMENTED with a message saying what to use instead when
        the server has none (KServe: "Method not found!")."""
        try:
            return await self._config(
                oip.ModelConfigRequest(name=model, version=version), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise BackendError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"backend {self.name!r} does not implement ModelConfig (an optional "
                    "extension of the Open Inference Protocol): ModelMetadata describes this "
                    "model",
                    backend=self.name,
                ) from None
            raise self._error(err) from None

    async def model_spec(self, model: str, version: str, target=None) -> ModelSpec | None:
        """From ModelMetadata (tensors; a batching model's shapes start with -1 for the batch)
        and, when the server has ModelConfig, its optional inputs and max_batch_size. None when
        the metadata lists no inputs (KServe's default for a model that does not describe
        itself): nothing can be checked then. Outputs listed as none are unknown."""
        try:
            meta = await self.metadata(model, version, timeout=5.0)
        except BackendError:
            return None
        if not meta.inputs:
            return None
        optional: set[str] = set()
        max_batch_size = 0
        decoupled = False
        try:
            config = (await self.model_config(model, version, timeout=5.0)).config
        except BackendError as err:
            if err.code is not grpc.StatusCode.UNIMPLEMENTED:
                return None
        else:
            optional = {i.name for i in config.input if i.optional}
            max_batch_size = max(0, config.max_batch_size)
            decoupled = config.model_transaction_policy.decoupled
        return ModelSpec(
            inputs=tuple(
                TensorSpec(t.name, t.datatype, tuple(t.shape), t.name in optional)
                for t in meta.inputs
            ),
            outputs=(
                tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs)
                if meta.outputs
                else None
            ),
            max_batch_size=max_batch_size,
            decoupled=decoupled,
        )

    async def close(self) -> None:
        await self._channel.close()
