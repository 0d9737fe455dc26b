"""TorchServe custom handler speaking the Open Inference Protocol (KServe v2) REST/JSON form.

One handler serves any TorchScript model: the model's interface comes from ``signature.json``,
packed into the .mar with ``torch-model-archiver --extra-files signature.json``:

    {"inputs":  [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
     "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}

- ``inputs`` lists the model's ``forward`` arguments IN ORDER. Request inputs are matched to them
  BY NAME (their order in the request does not matter); every one is required.
  ``datatype`` "ANY" (or absent) accepts any supported datatype; ``shape`` absent/null accepts
  any shape, -1 is a wildcard dimension.
- ``outputs`` names the model's results in order: a single tensor, or a tuple/list of tensors.
  The response datatype of an output comes from the tensor's torch dtype (so an identity model
  returns the datatype it was given).

Request body (POST /predictions/{model}[/{version}], Content-Type: application/json):

    {"id": "optional", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                   "data": [1, 2, 3, 4, 5, 6, 7, 8]}],
     "outputs": [{"name": "y"}]}            # optional: subset / order of the outputs

``data`` is row-major, flat (nested lists are flattened too). BOOL data are JSON true/false,
integer types JSON integers (range checked), FP16/BF16/FP32/FP64 JSON numbers. BYTES elements
are ``{"b64": "<base64>"}`` objects: the encoding is validated, but TorchScript tensors cannot
hold bytes, so a BYTES input is rejected (400), as are UINT16/UINT32/UINT64 (no torch kernels).

Response 200: {"model_name", "model_version", "id"?, "outputs": [{"name", "datatype", "shape",
"data"}]}. Errors: {"error": "<message>"} with status 400 for anything wrong with the request
(set per request, so other requests batched with it are unaffected) and 500 when the model
itself fails or returns something that does not fit its signature.

``GET <management>/models/{model}/{version}?customized=true`` returns the signature as OIP model
metadata in ``customizedMetadata``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"

# OIP datatype -> torch dtype. UINT16/32/64 exist in torch only as storage types without kernels.
OIP_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
TORCH_TO_OIP: dict[torch.dtype, str] = {v: k for k, v in OIP_TO_TORCH.items()}
PHRASES = {400: "Bad Request", 500: "Internal Server Error"}
UNSUPPORTED = {"UINT16", "UINT32", "UINT64", "BYTES"}
INT_RANGES: dict[str, tuple[int, int]] = {
    "UINT8": (0, 2**8 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}


# TorchServe wants exactly ONE class in a handler module, so errors are TorchServe's own
# PredictionException with the HTTP status as error_code: 400 = the request is wrong,
# 500 = the model failed or broke its signature.


def _bad_request(message: str) -> PredictionException:
    return PredictionException(message, 400)


def _model_error(message: str) -> PredictionException:
    return PredictionException(message, 500)


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_bytes(name: str, flat: list[Any]) -> None:
    for i, item in enumerate(flat):
        if not (isinstance(item, dict) and isinstance(item.get("b64"), str)):
            raise _bad_request(f'input "{name}": BYTES element {i} must be {{"b64": "<base64>"}}')
        try:
            base64.b64decode(item["b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad_request(f'input "{name}": BYTES element {i} is not valid base64') from e


def _to_tensor(name: str, datatype: str, shape: list[int], data: Any) -> torch.Tensor:
    if not isinstance(data, list):
        raise _bad_request(f'input "{name}": "data" must be a list')
    flat = _flatten(data)
    if len(flat) != _numel(shape):
        raise _bad_request(
            f'input "{name}": shape {shape} needs {_numel(shape)} elements, data has {len(flat)}'
        )
    if datatype == "BYTES":
        _check_bytes(name, flat)
    if datatype in UNSUPPORTED:
        raise _bad_request(
            f'input "{name}": datatype {datatype} is not supported by this TorchServe handler'
        )
    types = set(map(type, flat))
    if datatype == "BOOL":
        if not types <= {bool}:
            raise _bad_request(f'input "{name}": BOOL data must be JSON true/false')
    elif datatype in INT_RANGES:
        if not types <= {int}:
            raise _bad_request(f'input "{name}": {datatype} data must be JSON integers')
        lo, hi = INT_RANGES[datatype]
        if flat and (min(flat) < lo or max(flat) > hi):
            raise _bad_request(f'input "{name}": value out of range for {datatype}')
    elif not types <= {int, float}:
        raise _bad_request(f'input "{name}": {datatype} data must be JSON numbers')
    return torch.tensor(flat, dtype=OIP_TO_TORCH[datatype]).reshape(shape)


def _shape_matches(shape: list[int], expected: list[int] | None) -> bool:
    if expected is None:
        return True
    return len(shape) == len(expected) and all(
        e in (-1, d) for d, e in zip(shape, expected, strict=True)
    )


class OipHandler(BaseHandler):
    """Open Inference Protocol JSON in and out, for any TorchScript model with a signature.json."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, SIGNATURE_FILE), encoding="utf-8") as f:
            signature = json.load(f)
        self.inputs: list[dict[str, Any]] = signature["inputs"]
        self.outputs: list[dict[str, Any]] = signature["outputs"]
        model = context.manifest.get("model", {})
        self.model_name: str = model.get("modelName", context.model_name)
        self.model_version: str = str(model.get("modelVersion", ""))

    # -- request decoding -------------------------------------------------------------------

    @staticmethod
    def _body(request: Any) -> dict[str, Any]:
        body = request.get("body") if isinstance(request, dict) else None
        if body is None and isinstance(request, dict):
            body = request.get("data")
        if isinstance(body, (bytes, bytearray)):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad_request("request body is not UTF-8 JSON") from e
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError as e:
                raise _bad_request(f"request body is not valid JSON: {e}") from e
        if body is None:
            # A form content type (curl -d sends application/x-www-form-urlencoded) makes
            # TorchServe split the body into form fields: there is no "body" then.
            raise _bad_request("no request body: send the JSON with Content-Type: application/json")
        if not isinstance(body, dict):
            raise _bad_request('request body must be a JSON object with an "inputs" list')
        return body

    def _decode(self, body: dict[str, Any]) -> tuple[list[torch.Tensor], list[int]]:
        """Model arguments in forward order, and the indices of the outputs to return."""
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise _bad_request('"inputs" must be a non-empty list')
        by_name: dict[str, dict[str, Any]] = {}
        for i, tensor in enumerate(inputs):
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise _bad_request(f'inputs[{i}] must be an object with a "name"')
            if tensor["name"] in by_name:
                raise _bad_request(f'input "{tensor["name"]}" given twice')
            by_name[tensor["name"]] = tensor
        expected = [spec["name"] for spec in self.inputs]
        unknown = sorted(set(by_name) - set(expected))
        if unknown:
            raise _bad_request(
                f"unknown input(s) {unknown}; model {self.model_name} takes {expected}"
            )
        args = []
        for spec in self.inputs:
            name = spec["name"]
            tensor = by_name.get(name)
            if tensor is None:
                raise _bad_request(
                    f'missing input "{name}"; model {self.model_name} takes {expected}'
                )
            datatype, shape = tensor.get("datatype"), tensor.get("shape")
            if not isinstance(datatype, str):
                raise _bad_request(f'input "{name}": "datatype" must be a string')
            if datatype not in OIP_TO_TORCH and datatype not in UNSUPPORTED:
                raise _bad_request(f'input "{name}": unknown datatype {datatype!r}')
            if not (
                isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)  # bool is not a dimension
            ):
                raise _bad_request(f'input "{name}": "shape" must be a list of non-negative ints')
            want = spec.get("datatype", "ANY")
            if want not in ("ANY", datatype):
                raise _bad_request(f'input "{name}": datatype {datatype}, model expects {want}')
            if not _shape_matches(shape, spec.get("shape")):
                raise _bad_request(f'input "{name}": shape {shape}, model expects {spec["shape"]}')
            args.append(_to_tensor(name, datatype, shape, tensor.get("data")))

        names = [spec["name"] for spec in self.outputs]
        requested = body.get("outputs")
        if requested is None:
            return args, list(range(len(names)))
        if not isinstance(requested, list):
            raise _bad_request('"outputs" must be a list of {"name": ...}')
        wanted = []
        for i, out in enumerate(requested):
            name = out.get("name") if isinstance(out, dict) else None
            if name not in names:
                raise _bad_request(f"outputs[{i}]: unknown output {name!r}; model has {names}")
            wanted.append(names.index(name))
        return args, wanted

    # -- inference and encoding ---------------------------------------------------------------

    def _run(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            result = self.model(*[a.to(self.device) for a in args])
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(results) != len(self.outputs) or not all(
            isinstance(r, torch.Tensor) for r in results
        ):
            raise _model_error(
                f"model returned {len(results)} value(s), signature declares "
                f"{len(self.outputs)} tensor output(s)"
            )
        return results

    def _encode(self, name: str, tensor: torch.Tensor) -> dict[str, Any]:
        datatype = TORCH_TO_OIP.get(tensor.dtype)
        if datatype is None:
            raise _model_error(f'output "{name}" has dtype {tensor.dtype}, which OIP cannot carry')
        tensor = tensor.detach().cpu().contiguous()
        return {
            "name": name,
            "datatype": datatype,
            "shape": list(tensor.shape),
            "data": tensor.reshape(-1).tolist(),
        }

    def _predict_one(self, request: Any) -> dict[str, Any]:
        body = self._body(request)
        args, wanted = self._decode(body)
        try:
            results = self._run(args)
        except PredictionException:
            raise
        except Exception as e:  # torch.jit.Error (not a RuntimeError) for a raise in TorchScript
            # The signature checks above catch what a client can get wrong, so this is the
            # model's failure. TorchScript messages carry a code listing: keep the last line.
            logger.error("model %s failed", self.model_name, exc_info=True)
            lines = str(e).strip().splitlines()
            raise _model_error(
                f"model execution failed: {lines[-1] if lines else type(e).__name__}"
            ) from e
        response: dict[str, Any] = {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "outputs": [self._encode(self.outputs[i]["name"], results[i]) for i in wanted],
        }
        if isinstance(body.get("id"), str):
            response["id"] = body["id"]
        return response

    def describe_handle(self) -> str:
        """OIP model metadata (shown by the management API's describe with ?customized=true)."""
        meta = {
            "name": self.model_name,
            "versions": [self.model_version],
            "platform": "pytorch_torchscript",
            "inputs": [
                {"name": s["name"], "datatype": s.get("datatype", "ANY"), "shape": s.get("shape")}
                for s in self.inputs
            ],
            "outputs": [
                {"name": s["name"], "datatype": s.get("datatype", "ANY"), "shape": s.get("shape")}
                for s in self.outputs
            ],
        }
        return json.dumps(meta)

    def handle(self, data: list[Any], context: Any) -> list[str]:
        self.context = context
        if self._is_describe():
            return [self.describe_handle()]
        responses = []
        for idx, request in enumerate(data):
            try:
                body: dict[str, Any] = self._predict_one(request)
                status = 200
            except PredictionException as e:
                body, status = {"error": e.message}, e.error_code
                if status >= 500:
                    logger.error("model %s: %s", self.model_name, e.message)
            except Exception as e:
                logger.exception("model %s: inference failed", self.model_name)
                body, status = {"error": str(e) or type(e).__name__}, 500
            if status != 200:
                context.set_response_status(status, PHRASES.get(status, ""), idx)
            context.set_response_content_type(idx, "application/json")
            responses.append(json.dumps(body, separators=(",", ":")))
        return responses
