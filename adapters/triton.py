"""NVIDIA Triton adapter: the Open Inference Protocol adapter (adapters/oip.py) plus Triton's
extensions.

What Triton adds to the protocol, and this class to OIPAdapter:
- InferParameters Triton honours over gRPC (`parameters.TRITON`: sequence, priority, timeout;
  classification on numeric outputs, checked against the model's output datatypes), and an input
  with no elements still needs its (empty) data.
- ModelConfig is always implemented: it passes through, and its optional inputs and
  max_batch_size refine request validation.
- ModelStreamInfer (decoupled models), relayed by gateway/streaming.py through `stream` and
  `stream_request`.
- Answers carry only the requested outputs, so they are not trimmed.
"""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as oip

from adapters import parameters
from adapters.base import backend_tensors
from adapters.oip import OIPAdapter, model_fields, string_field
from tensorgate.config.v1 import config_pb2


class TritonAdapter(OIPAdapter):
    parameters = parameters.TRITON
    trims_outputs = False

    def __init__(self, backend: config_pb2.Backend, *, max_request_bytes: int) -> None:
        super().__init__(backend, max_request_bytes=max_request_bytes)
        self._stream = self._channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=oip.ModelStreamInferResponse.FromString,
        )

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
            + model_fields(target.backend_model, target.backend_version)
            + string_field(3, backend_id)
        )
