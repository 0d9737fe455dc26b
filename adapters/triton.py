"""NVIDIA Triton adapter: the Open Inference Protocol adapter (adapters/oip.py) plus Triton's
extensions.

What Triton adds to the protocol, and this class to OIPAdapter:
- InferParameters Triton honours over gRPC (`parameters.TRITON`: sequence, priority, timeout;
  classification on numeric outputs, checked against the model's output datatypes), and an input
  with no elements still needs its (empty) data.
- ModelConfig is always implemented: it passes through, and its optional inputs and
  max_batch_size refine request validation.
- ModelStreamInfer (decoupled models), relayed by gateway/dataplane/streaming.py through `stream`
and
  `stream_request`; every request forwarded on a stream asks for the empty final response that
  ends a decoupled model's answers (the relay needs it; docs/streaming.md).
- Answers carry only the requested outputs, so they are not trimmed.
"""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as oip

from adapters import parameters
from adapters.base import backend_tensors
from adapters.oip import OIPAdapter, model_fields, string_field
from tensorgate.config.v1 import config_pb2


def _ask_empty_final() -> bytes:
    request = oip.ModelInferRequest()
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request.SerializeToString()


# The parameter `triton_enable_empty_final_response` = true, encoded: appended to a request's
# bytes it overrides the caller's own value (a parser keeps the last entry of a map key).
ASK_EMPTY_FINAL = _ask_empty_final()


def _sized(data: bytes) -> tuple[int, oip.ModelStreamInferResponse]:
    return len(data), oip.ModelStreamInferResponse.FromString(data)


class TritonAdapter(OIPAdapter):
    parameters = parameters.TRITON
    trims_outputs = False

    def __init__(self, backend: config_pb2.Backend, *, max_request_bytes: int) -> None:
        super().__init__(backend, max_request_bytes=max_request_bytes)
        self._stream = self._channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=_sized,
        )

    def stream(self, *, timeout: float | None, metadata=()):
        """A ModelStreamInfer stream to this Triton: write `stream_request` bytes, read
        (bytes on the wire, ModelStreamInferResponse) pairs: the relay bounds what it queues by
        the first without serializing the message again."""
        return self._stream(timeout=timeout, metadata=metadata)

    def stream_request(self, request: oip.ModelInferRequest, target, backend_id: str) -> bytes:
        """The bytes to write on a stream for `request`: checked as for ModelInfer, asking the
        backend's model and version, under `backend_id` (the relay's own request id), with
        `triton_enable_empty_final_response` set whatever the caller set (the relay drops the
        empty final response when the caller did not ask for it)."""
        parameters.check_parameters(request, parameters.TRITON_STREAM)
        if not request.raw_input_contents:
            parameters.check_data_present(request, "Triton")
        backend_request = backend_tensors(request, target)
        return (
            backend_request.SerializeToString()
            + model_fields(target.backend_model, target.backend_version)
            + string_field(3, backend_id)
            + ASK_EMPTY_FINAL
        )
