"""TensorFlow Serving adapter: Open Inference Protocol <-> tensorflow.serving.PredictionService.

Speaks TF Serving's gRPC protocol through the wire-compatible subset in
protos/tensorgate/tfserving/ (the official tensorflow-serving-api package drags in all of
TensorFlow). Per variant (`tfserving:` options): `signature_name` (default serving_default), and
`backend_version` or `version_label`. Tensors use `tensor_content`, the fast path TF itself uses
for numeric types.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from tritonclient.grpc import service_pb2 as oip

from adapters import parameters
from adapters.base import BackendError, ModelSpec, NoOptions, TensorSpec, backend_tensors
from adapters.codecs import oip as oip_codec
from adapters.codecs import tensorproto
from adapters.grpc_common import channel_options, rpc_error
from gateway.errors import shown
from gateway.observability import tracing
from tensorgate.config.v1 import config_pb2
from tensorgate.tfserving import serving_pb2, serving_pb2_grpc

DEFAULT_SIGNATURE = "serving_default"
_SIGNATURE_TTL_S = 60.0
_AVAILABLE = serving_pb2.ModelVersionStatus.AVAILABLE


_NO_OPTIONS = config_pb2.TFServingVariant()


def _options(target) -> config_pb2.TFServingVariant:
    """The variant's TF Serving options (signature, version label); defaults when unset."""
    return (target.options if target is not None else None) or _NO_OPTIONS


class TFServingAdapter(NoOptions):
    parameters = parameters.TFSERVING

    def __init__(self, backend: config_pb2.Backend, *, max_request_bytes: int) -> None:
        self.name = backend.name
        self._channel = grpc.aio.insecure_channel(
            backend.address, options=channel_options(backend, max_request_bytes)
        )
        predict = serving_pb2_grpc.PredictionServiceStub(self._channel)
        self._predict = predict.Predict
        self._get_metadata = predict.GetModelMetadata
        self._get_status = serving_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus
        # Output order follows the signature (a protobuf map has none): cached per model.
        self._output_order: dict[tuple[str, str, str], tuple[float, tuple[str, ...]]] = {}

    @classmethod
    def check_variant(
        cls, variant: config_pb2.Variant, route: config_pb2.Route, at: str
    ) -> Iterator[tuple[str, str]]:
        if variant.tfserving.version_label and variant.backend_version:
            yield (
                f"{at}.tfserving.version_label",
                "set backend_version or tfserving.version_label, not both",
            )

    @staticmethod
    def _spec(model: str, version: str, target=None) -> serving_pb2.ModelSpec:
        spec = serving_pb2.ModelSpec(name=model)
        options = _options(target)
        if version:
            spec.version.value = int(version)
        elif options.version_label:
            spec.version_label = options.version_label
        if target is not None:
            spec.signature_name = options.signature_name or DEFAULT_SIGNATURE
        return spec

    async def infer(
        self, request: oip.ModelInferRequest, *, timeout: float | None, target
    ) -> oip.ModelInferResponse:
        request = backend_tensors(request, target)
        model, version = target.backend_model, target.backend_version
        predict = serving_pb2.PredictRequest(model_spec=self._spec(model, version, target))
        for index, tensor in enumerate(request.inputs):
            array = oip_codec.input_array(request, index)
            tensorproto.to_tensor_proto(array, tensor.datatype, predict.inputs[tensor.name])
        predict.output_filter.extend(o.name for o in request.outputs)
        try:
            reply = await self._predict(predict, timeout=timeout, metadata=tracing.outgoing())
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, self.name) from None
        response = oip.ModelInferResponse(
            model_name=model,
            model_version=str(reply.model_spec.version.value)
            if reply.model_spec.HasField("version")
            else "",
            id=request.id,
        )
        for name in await self._ordered_outputs(request, reply, target):
            array, datatype = tensorproto.from_tensor_proto(reply.outputs[name], name)
            oip_codec.add_output(response, name, array, datatype)
        return response

    async def _ordered_outputs(self, request, reply, target) -> list[str]:
        if request.outputs:
            return [o.name for o in request.outputs if o.name in reply.outputs]
        model, version = target.backend_model, target.backend_version
        key = (model, version, _options(target).signature_name)
        cached = self._output_order.get(key)
        if cached is None or time.monotonic() > cached[0]:
            try:
                signature = await self._signature(model, version, target, 5.0)
                order = tuple(signature.outputs)
            except BackendError:
                order = ()
            self._output_order[key] = (time.monotonic() + _SIGNATURE_TTL_S, order)
            cached = self._output_order[key]
        known = [n for n in cached[1] if n in reply.outputs]
        return known + sorted(n for n in reply.outputs if n not in known)

    async def _signature(self, model: str, version: str, target, timeout: float | None):
        request = serving_pb2.GetModelMetadataRequest(
            model_spec=self._spec(model, version, target), metadata_field=["signature_def"]
        )
        try:
            reply = await self._get_metadata(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, self.name) from None
        signatures = serving_pb2.SignatureDefMap()
        if not reply.metadata["signature_def"].Unpack(signatures):
            raise BackendError(
                grpc.StatusCode.INTERNAL,
                "TF Serving metadata without signature_def",
                backend=self.name,
            )
        name = _options(target).signature_name or DEFAULT_SIGNATURE
        if name not in signatures.signature_def:
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {shown(model)} has no signature {shown(name)} "
                f"(signatures: {', '.join(sorted(signatures.signature_def))})",
                backend=self.name,
            )
        return signatures.signature_def[name]

    async def ready(self, model: str = "", version: str = "", *, timeout: float = 2.0) -> bool:
        request = serving_pb2.GetModelStatusRequest(model_spec=self._spec(model, version))
        try:
            reply = await self._get_status(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            # TF Serving has no server-level readiness RPC: for the server, any answer at all
            # (NOT_FOUND for an empty model name included) means it is up.
            return not model and err.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        return any(s.state == _AVAILABLE for s in reply.model_version_status)

    async def metadata(
        self, model: str, version: str, *, timeout: float | None, target=None
    ) -> oip.ModelMetadataResponse:
        signature = await self._signature(model, version, target, timeout)
        reply = oip.ModelMetadataResponse(name=model, platform="tensorflow_serving")
        if version:
            reply.versions.append(version)
        for infos, out in ((signature.inputs, reply.inputs), (signature.outputs, reply.outputs)):
            for name, info in infos.items():
                datatype = tensorproto.OIP_DATATYPE.get(info.dtype)
                if datatype is None:
                    continue
                shape = (
                    [-1]
                    if info.tensor_shape.unknown_rank
                    else [d.size for d in info.tensor_shape.dim]
                )
                out.add(name=name, datatype=datatype, shape=shape)
        return reply

    async def model_config(self, model: str, version: str, *, timeout: float | None, target=None):
        raise BackendError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"ModelConfig is a Triton extension; backend {self.name!r} is TF Serving "
            "(ModelMetadata describes the model)",
            backend=self.name,
        )

    async def model_spec(self, model: str, version: str, target=None) -> ModelSpec | None:
        """From the variant's SignatureDef. A signature says nothing of server-side batching
        limits, so max_batch_size stays 0 (unknown); a batch dimension shows as -1."""
        try:
            signature = await self._signature(model, version, target, 5.0)
        except BackendError:
            return None

        def specs(infos) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(
                    name,
                    tensorproto.OIP_DATATYPE.get(info.dtype, ""),
                    None
                    if info.tensor_shape.unknown_rank
                    else tuple(d.size for d in info.tensor_shape.dim),
                )
                for name, info in infos.items()
            )

        return ModelSpec(specs(signature.inputs), specs(signature.outputs))

    async def close(self) -> None:
        await self._channel.close()
