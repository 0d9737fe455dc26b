"""A protocol-faithful TensorFlow Serving STAND-IN (not the real tensorflow_model_server binary).

No TF Serving binary can be installed on these machines (not on PyPI, npm or Debian; no Docker), so
the test suite runs this instead. It serves the real gRPC API with the OFFICIAL generated stubs of
``tensorflow-serving-api`` and executes real SavedModels with TensorFlow; where TF Serving's C++
code decides something observable (status codes, error messages, which signatures metadata lists,
how output tensors are encoded, response model_spec), this file copies that decision. See
docs/backends-tfserving-standin.md for what is and is not covered.

Run it with the stand-in venv's python (``scripts/backend-venv tfserving``); it cannot run in the
gateway's venv (no TensorFlow there):

    python tests/backends/tfserving_standin.py --port 8500 --model-base DIR \\
        [--version-labels linear:stable=1,linear:canary=2] [--tensor-encoding field|content]

Model layout is TF Serving's: ``DIR/<model>/<version>/saved_model.pb`` (+ variables/). Every
numeric version directory of every model is loaded before the port opens (like TF Serving with
``model_version_policy { all {} }``); requests without a version get the highest one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

log = logging.getLogger("tfserving-standin")

DEFAULT_SIGNATURE = "serving_default"  # kDefaultServingSignatureDefKey
SERVE_TAG = "serve"  # --saved_model_tags default
SIGNATURE_DEF_FIELD = "signature_def"  # the only GetModelMetadata field TF Serving supports
ERROR_MESSAGE_LIMIT = 1024  # grpc_status_util.cc: longer messages are cut + "...TRUNCATED"

_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
T = TypeVar("T")


class ServingError(Exception):
    """A failed tensorflow::Status: the gRPC code and message TF Serving would return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def dtype_string(dtype: int) -> str:
    """TF's DataTypeString(): DT_FLOAT -> "float", DT_HALF -> "half", DT_FLOAT_REF -> "float_ref"."""
    try:
        name = types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"unknown dtype enum ({dtype})"
    return name.removeprefix("DT_").lower()


# ---------------------------------------------------------------------------------------------
# Tensor <-> TensorProto, following tensorflow::Tensor::FromProto / AsProtoField /
# AsProtoTensorContent rather than tf.make_tensor_proto (which picks tensor_content or the typed
# fields depending on size; TF Serving's output encoding does not).
# ---------------------------------------------------------------------------------------------


def _read_varint32(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 28:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _write_varint32(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _decode_string_list(content: bytes, n: int) -> list[bytes]:
    """port::DecodeStringList: n varint32 lengths, then the n strings back to back."""
    lengths = []
    pos = 0
    for _ in range(n):
        length, pos = _read_varint32(content, pos)
        lengths.append(length)
    if pos + sum(lengths) != len(content):
        raise ValueError("string tensor_content size mismatch")
    out = []
    for length in lengths:
        out.append(content[pos : pos + length])
        pos += length
    return out


def tensor_from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """Tensor::FromProto; raises ValueError where FromProto returns false."""
    shape_proto = proto.tensor_shape
    if shape_proto.unknown_rank or any(d.size < 0 for d in shape_proto.dim):
        raise ValueError("invalid shape")
    if proto.dtype in (types_pb2.DT_INVALID, types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT):
        raise ValueError(f"unsupported dtype {dtype_string(proto.dtype)}")
    shape = [d.size for d in shape_proto.dim]
    if proto.dtype == types_pb2.DT_STRING and proto.tensor_content:
        values = _decode_string_list(proto.tensor_content, int(np.prod(shape, dtype=np.int64)))
        return np.array(values, dtype=object).reshape(shape)
    return tf.make_ndarray(proto)


_INT_VAL_TYPES = (
    types_pb2.DT_INT32,
    types_pb2.DT_INT16,
    types_pb2.DT_INT8,
    types_pb2.DT_UINT8,
    types_pb2.DT_UINT16,
)
_SIMPLE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    **dict.fromkeys(_INT_VAL_TYPES, "int_val"),
}


def _proto_header(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def tensor_as_proto_field(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    """Tensor::AsProtoField: every element in the typed repeated field (TF Serving's default)."""
    proto = _proto_header(array, dtype)
    flat = array.reshape(-1)
    if flat.size == 0:
        return proto
    if dtype in _SIMPLE_FIELDS:
        getattr(proto, _SIMPLE_FIELDS[dtype]).extend(flat.tolist())
    elif dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        proto.half_val.extend(flat.view(np.uint16).tolist())  # raw 16-bit patterns
    elif dtype == types_pb2.DT_COMPLEX64:
        proto.scomplex_val.extend(flat.view(np.float32).tolist())
    elif dtype == types_pb2.DT_COMPLEX128:
        proto.dcomplex_val.extend(flat.view(np.float64).tolist())
    else:
        return tensor_as_proto_content(array, dtype)
    return proto


def tensor_as_proto_content(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    """Tensor::AsProtoTensorContent: raw little-endian bytes (strings: varint lengths + bytes)."""
    proto = _proto_header(array, dtype)
    flat = array.reshape(-1)
    if dtype == types_pb2.DT_STRING:
        items = [v if isinstance(v, bytes) else str(v).encode() for v in flat.tolist()]
        out = bytearray()
        for item in items:
            _write_varint32(len(item), out)
        for item in items:
            out += item
        proto.tensor_content = bytes(out)
    else:
        proto.tensor_content = np.ascontiguousarray(flat).tobytes()
    return proto


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class Servable:
    name: str
    version: int
    path: Path
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]
    functions: dict[str, Any]  # signature name -> ConcreteFunction (loaded.signatures)
    loaded: Any = field(repr=False)  # keeps the restored object (and its variables) alive


def load_servable(name: str, version: int, path: Path) -> Servable:
    """Loads one SavedModel version; signature defs come from the saved MetaGraphDef itself."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    meta_graphs = [m for m in saved_model.meta_graphs if set(m.meta_info_def.tags) == {SERVE_TAG}]
    if not meta_graphs:
        raise RuntimeError(f"{path}: no MetaGraphDef tagged {{{SERVE_TAG}}}")
    loaded = tf.saved_model.load(str(path), tags=[SERVE_TAG])
    return Servable(
        name=name,
        version=version,
        path=path,
        signature_defs=dict(meta_graphs[0].signature_def),
        functions=dict(loaded.signatures),
        loaded=loaded,
    )


class ModelRegistry:
    def __init__(self) -> None:
        self.models: dict[str, dict[int, Servable]] = {}
        self.labels: dict[str, dict[str, int]] = {}

    @classmethod
    def from_directory(cls, base: Path) -> ModelRegistry:
        registry = cls()
        for model_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue  # e.g. make_tf_models.py's temporary dirs
            # FileSystemStoragePathSource: a version is a child dir whose name is an int64.
            versions = sorted(
                int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
            )
            for version in versions:
                path = model_dir / str(version)
                if not (path / "saved_model.pb").is_file():
                    log.warning("skipping %s: no saved_model.pb", path)
                    continue
                started = time.monotonic()
                servable = load_servable(model_dir.name, version, path)
                registry.models.setdefault(model_dir.name, {})[version] = servable
                log.info(
                    "Successfully loaded servable version {name: %s version: %d} in %.2f s "
                    "(signatures: %s)",
                    model_dir.name,
                    version,
                    time.monotonic() - started,
                    ", ".join(sorted(servable.signature_defs)),
                )
        return registry

    def set_labels(self, spec: str) -> None:
        """``model:label=version,...``; like ServerCore::UpdateModelVersionLabelMap, a label may
        only point at a version that is available."""
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                model, rest = item.split(":", 1)
                label, version_text = rest.split("=", 1)
                version = int(version_text)
            except ValueError:
                raise SystemExit(
                    f"bad --version-labels entry {item!r} (want model:label=N)"
                ) from None
            if version not in self.models.get(model, {}):
                raise SystemExit(
                    f"FAILED_PRECONDITION: Request to assign label to version {version} of model "
                    f"{model}, which is not currently available for inference"
                )
            self.labels.setdefault(model, {})[label] = version

    def resolve(self, spec: model_pb2.ModelSpec) -> Servable:
        """ServerCore::GetServableHandle(model_spec)."""
        if not spec.name:
            raise _invalid("ModelSpec has no name specified.")
        choice = spec.WhichOneof("version_choice")
        versions = self.models.get(spec.name, {})
        if choice == "version_label":
            version = self.labels.get(spec.name, {}).get(spec.version_label)
            if version is None:
                raise _invalid(f"Unrecognized servable version label: {spec.version_label}")
            request = f"Specific({spec.name}, {version})"
        elif choice == "version":
            version = spec.version.value
            request = f"Specific({spec.name}, {version})"
        else:
            version = max(versions) if versions else None
            request = f"Latest({spec.name})"
        servable = versions.get(version) if version is not None else None
        if servable is None:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}"
            )
        return servable


# ---------------------------------------------------------------------------------------------
# Predict (predict_util.cc: RunPredict / PreProcessPrediction / PostProcessPredictionResult)
# ---------------------------------------------------------------------------------------------


def _keys(mapping: Any) -> str:
    return ",".join(sorted(mapping))  # absl::StrJoin over a std::set: sorted


def _shape_str(dims: Any) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def run_predict(
    registry: ModelRegistry, request: predict_pb2.PredictRequest, tensor_encoding: str
) -> predict_pb2.PredictResponse:
    servable = registry.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = servable.signature_defs.get(signature_name)
    if signature is None:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f'Serving signature key "{signature_name}" not found.',
        )
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.signature_name = signature_name
    response.model_spec.version.value = servable.version

    # VerifyRequestInputsSize
    if len(request.inputs) != len(signature.inputs):
        sent, wanted = set(request.inputs), set(signature.inputs)
        raise _invalid(
            f"input size does not match signature: {len(request.inputs)}!={len(signature.inputs)}"
            f" len({{{_keys(sent)}}}) != len({{{_keys(wanted)}}})."
            f" Sent extra: {{{_keys(sent - wanted)}}}."
            f" Missing but required: {{{_keys(wanted - sent)}}}."
        )
    arrays: dict[str, np.ndarray] = {}
    for alias in sorted(request.inputs):
        if alias not in signature.inputs:
            raise _invalid(
                f"input tensor alias not found in signature: {alias}. "
                f"Inputs expected to be in the set {{{_keys(signature.inputs)}}}."
            )
        try:
            arrays[alias] = tensor_from_proto(request.inputs[alias])
        except Exception:
            raise _invalid(f"tensor parsing error: {alias}") from None

    aliases: list[str] = []
    for alias in request.output_filter:
        if alias not in signature.outputs:
            raise _invalid(
                f"output tensor alias not found in signature: {alias} "
                f"Outputs expected to be in the set {{{_keys(signature.outputs)}}}."
            )
        if alias in aliases:
            raise _invalid(f"duplicate output tensor alias: {alias}")
        aliases.append(alias)
    if not aliases:
        aliases = list(signature.outputs)

    # Session::Run's feed check (FunctionCallFrame::SetArgs): feeds are numbered in the sorted
    # order of their tensor names, and the first dtype mismatch is reported.
    fed = sorted(signature.inputs.items(), key=lambda item: item[1].name)
    for index, (alias, info) in enumerate(fed):
        got = request.inputs[alias].dtype
        if got != info.dtype:
            raise _invalid(
                f"Expects arg[{index}] to be {dtype_string(info.dtype)} but "
                f"{dtype_string(got)} is provided"
            )
    # Not a TF Serving check (there, the graph's ops fail with op-specific messages); the
    # signature's ConcreteFunction refuses incompatible shapes, so say so up front.
    for alias, info in fed:
        expected = info.tensor_shape
        actual = arrays[alias].shape
        if expected.unknown_rank:
            continue
        dims = [d.size for d in expected.dim]
        if len(dims) != len(actual) or any(
            e not in (-1, a) for e, a in zip(dims, actual, strict=True)
        ):
            raise _invalid(
                f"input tensor alias {alias}: shape {_shape_str(actual)} is not compatible "
                f"with the signature's shape {_shape_str(dims)}"
            )

    function = servable.functions.get(signature_name)
    if function is None:  # e.g. __saved_model_init_op: listed in metadata, nothing to run
        raise _invalid(f'Signature "{signature_name}" has no runnable function')
    feeds = {
        alias: tf.constant(array, dtype=tf.as_dtype(signature.inputs[alias].dtype))
        for alias, array in arrays.items()
    }
    try:
        outputs = function(**feeds)
    except tf.errors.OpError as e:
        code = _GRPC_CODES.get(e.error_code, grpc.StatusCode.UNKNOWN)
        raise ServingError(code, e.message) from None
    encode = tensor_as_proto_content if tensor_encoding == "content" else tensor_as_proto_field
    for alias in aliases:
        tensor = outputs[alias]
        response.outputs[alias].CopyFrom(encode(tensor.numpy(), tensor.dtype.as_datatype_enum))
    return response


# ---------------------------------------------------------------------------------------------
# gRPC services
# ---------------------------------------------------------------------------------------------


class _Handlers:
    def __init__(self, registry: ModelRegistry, pool: ThreadPoolExecutor) -> None:
        self.registry = registry
        self.pool = pool

    async def _call(self, context: grpc.aio.ServicerContext, method: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
        except ServingError as e:
            message = e.message
            if len(message) > ERROR_MESSAGE_LIMIT:
                message = message[:ERROR_MESSAGE_LIMIT] + "...TRUNCATED"
            log.info("%s -> %s: %s", method, e.code.name, message)
            await context.abort(e.code, message)
            raise  # unreachable: abort() raises
        except Exception as e:
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"stand-in error: {e!r}")
            raise


class PredictionService(_Handlers, prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, registry: ModelRegistry, pool: ThreadPoolExecutor, encoding: str) -> None:
        super().__init__(registry, pool)
        self.encoding = encoding

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        return await self._call(
            context, "Predict", lambda: run_predict(self.registry, request, self.encoding)
        )

    async def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.aio.ServicerContext,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return await self._call(context, "GetModelMetadata", lambda: self._metadata(request))

    def _metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        # get_model_metadata_impl.cc
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        if not request.metadata_field:
            raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for name in request.metadata_field:
            if name != SIGNATURE_DEF_FIELD:
                raise _invalid(f"Metadata field {name} is not supported")
        servable = self.registry.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in servable.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response

    # Classify / Regress / MultiInference are not implemented: the servicer base class answers
    # UNIMPLEMENTED for them.


class ModelService(_Handlers, model_service_pb2_grpc.ModelServiceServicer):
    async def GetModelStatus(
        self,
        request: get_model_status_pb2.GetModelStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return await self._call(context, "GetModelStatus", lambda: self._status(request))

    def _status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        # get_model_status_impl.cc: no name check, and version labels are ignored.
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        spec = request.model_spec
        versions = self.registry.models.get(spec.name, {})
        if spec.HasField("version"):
            wanted = [spec.version.value]
            if spec.version.value not in versions:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {spec.version.value} of model {spec.name}",
                )
        else:
            if not versions:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
                )
            # ServableStateMonitor::VersionMap is ordered newest first.
            wanted = sorted(versions, reverse=True)
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in wanted:
            status = response.model_version_status.add(
                version=version, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE
            )
            status.status.SetInParent()  # StatusProto{error_code: OK, error_message: ""}
        return response


# ---------------------------------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> int:
    registry = ModelRegistry.from_directory(args.model_base)
    if not registry.models:
        log.error("no models found under %s", args.model_base)
        return 2
    if args.version_labels:
        registry.set_labels(args.version_labels)
    pool = ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="predict")
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),  # a busy port must fail, not be silently shared
            # TF Serving: builder.SetMaxMessageSize(kint32max)
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.max_send_message_length", 2**31 - 1),
        ]
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(registry, pool, args.tensor_encoding), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(registry, pool), server)
    address = f"127.0.0.1:{args.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises when the bind fails
        log.error("cannot bind %s: %s", address, e)
        return 3
    if not port:
        log.error("cannot bind %s", address)
        return 3
    await server.start()
    print(f"Running gRPC ModelServer at 127.0.0.1:{port} ... (tfserving stand-in)", flush=True)

    stop = asyncio.Event()
    if args.on_sigterm == "drain":
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    else:
        # tensorflow_model_server installs no signal handler (tensorflow/serving#356, #1853):
        # SIGTERM/SIGINT end it on the spot and in-flight calls fail (UNAVAILABLE on clients).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
    await stop.wait()
    log.info("draining: refusing new calls, in-flight calls get up to 5 s")
    await server.stop(grace=5)
    pool.shutdown(wait=False, cancel_futures=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TensorFlow Serving stand-in (gRPC only).")
    parser.add_argument("--port", type=int, required=True, help="gRPC port on 127.0.0.1 (0: any)")
    parser.add_argument("--model-base", type=Path, required=True, help="DIR/<model>/<version>/")
    parser.add_argument(
        "--version-labels", default="", help="model:label=version,... (TF Serving version_labels)"
    )
    parser.add_argument(
        "--tensor-encoding",
        choices=("field", "content"),
        default="field",
        help="Predict output encoding: typed *_val fields (TF Serving's default, AsProtoField) "
        "or tensor_content bytes (AsProtoTensorContent)",
    )
    parser.add_argument(
        "--on-sigterm",
        choices=("exit", "drain"),
        default="exit",
        help="exit: die at once like tensorflow_model_server (no signal handler); "
        "drain: grpc graceful stop (new calls refused, in-flight calls get 5 s)",
    )
    parser.add_argument("--threads", type=int, default=4, help="concurrent model executions")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    if not args.model_base.is_dir():
        parser.error(f"--model-base {args.model_base} is not a directory")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
