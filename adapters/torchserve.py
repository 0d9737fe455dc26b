"""TorchServe adapter: Open Inference Protocol <-> TorchServe's REST inference API, over httpx.

One pooled keep-alive connection set per backend (adapters.http1.HTTP1Transport, bounded): an
inference call is an httpx.Request handed straight to that transport, readiness and metadata go
through an httpx.AsyncClient on it. httpx's default transport plus its client cost ~1.9 ms of
CPU per call at 16 calls in flight, this ~0.25 ms (bench/ts_client.py, docs/benchmarks.md).
Bodies are written and read by orjson (kserve_json.dumps/loads), numpy arrays straight to JSON
text. The HTTP body follows the variant's body contract: by default the OIP JSON form spoken by
the example handler deploy/torchserve/oip_handler.py, or {"instances": ...} for TorchServe's
stock handlers. Outputs are typed and checked by the route's declared schema, since TorchServe
has no tensor metadata.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from urllib.parse import quote

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2 as oip

from adapters import parameters
from adapters.base import BackendError, ModelSpec, backend_tensors, declared_spec
from adapters.codecs import kserve_json
from adapters.codecs import oip as oip_codec
from adapters.http1 import HTTP1Transport
from gateway.addresses import address_problem
from gateway.errors import invalid, shown
from gateway.observability import tracing
from tensorgate.config.v1 import config_pb2

# torch has no unsigned integer types wider than 8 bits.
UNSUPPORTED = frozenset({"UINT16", "UINT32", "UINT64"})
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
}
_MAX_MESSAGE = 500


def _contract(target) -> int:
    options = target.options
    return (options.body_contract if options else 0) or config_pb2.BODY_CONTRACT_OIP_JSON


class TorchServeAdapter:
    parameters = parameters.TORCHSERVE

    def __init__(
        self,
        backend: config_pb2.Backend,
        *,
        max_request_bytes: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport`: the inference API's, for measuring another one (bench/ts_client.py)."""
        self.name = backend.name
        management_address = backend.torchserve.management_address
        conn = backend.connection
        connect = (
            conn.connect_timeout.ToMilliseconds() / 1000
            if conn.HasField("connect_timeout")
            else 5.0
        )
        timeout = httpx.Timeout(30.0, connect=connect)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=32)
        self._base = f"http://{backend.address}"
        self._transport = transport or HTTP1Transport(limits=limits)
        # Readiness goes through the client; inference hands its requests to the transport, so
        # neither reads HTTP(S)_PROXY from the environment: backend calls go to the address the
        # route table names (trust_env=False).
        self._client = httpx.AsyncClient(
            base_url=self._base, timeout=timeout, transport=self._transport, trust_env=False
        )
        self._urls: dict[tuple[str, str], httpx.URL] = {}
        self._management = (
            httpx.AsyncClient(
                base_url=f"http://{management_address}",
                timeout=timeout,
                transport=HTTP1Transport(limits=httpx.Limits()),
                trust_env=False,
            )
            if management_address
            else None
        )

    @classmethod
    def check_backend(cls, backend: config_pb2.Backend, at: str) -> Iterator[tuple[str, str]]:
        address = backend.torchserve.management_address
        reason = address_problem(address) if address else None
        if reason:
            yield f"{at}.torchserve.management_address", reason

    @classmethod
    def check_variant(
        cls, variant: config_pb2.Variant, route: config_pb2.Route, at: str
    ) -> Iterator[tuple[str, str]]:
        if variant.torchserve.body_contract == config_pb2.BODY_CONTRACT_INSTANCES_JSON and (
            len(route.schema.inputs) != 1 or len(route.schema.outputs) != 1
        ):
            yield (
                f"{at}.torchserve.body_contract",
                "BODY_CONTRACT_INSTANCES_JSON needs the route schema to declare one input and "
                "one output",
            )

    def _error(self, code: grpc.StatusCode, message: str) -> BackendError:
        return BackendError(code, message, backend=self.name)

    def _http_error(self, response: httpx.Response) -> BackendError:
        try:
            body = kserve_json.loads(response.content)
            message = body.get("message") or body.get("error") or response.text
        except (ValueError, AttributeError):
            message = response.text
        message = str(message).strip()[:_MAX_MESSAGE] or response.reason_phrase
        code = STATUS_CODES.get(response.status_code, grpc.StatusCode.INTERNAL)
        return self._error(code, f"TorchServe {response.status_code}: {message}")

    async def _send(
        self, method: str, url: str, client: httpx.AsyncClient, **kwargs
    ) -> httpx.Response:
        return await self._mapped(client.request(method, url, **kwargs))

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        # Straight to the transport: the client's per-call work (merging URL, headers and
        # cookies, auth and redirect flows, event hooks, logging) measured ~130 us a call and
        # does nothing for this adapter (bench/ts_client.py, docs/benchmarks.md).
        reply = await self._transport.handle_async_request(request)
        try:
            await reply.aread()
        finally:
            await reply.aclose()
        return reply

    async def _mapped(self, call: Awaitable[httpx.Response]) -> httpx.Response:
        try:
            return await call
        except httpx.TimeoutException:
            raise self._error(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"backend {self.name!r} did not answer in time"
            ) from None
        except httpx.TransportError as err:
            raise self._error(
                grpc.StatusCode.UNAVAILABLE,
                f"backend {self.name!r} unavailable: {type(err).__name__}",
            ) from None

    def _body(self, request: oip.ModelInferRequest, contract: int) -> bytes:
        arrays = []
        for index, tensor in enumerate(request.inputs):
            if tensor.datatype in UNSUPPORTED:
                raise invalid(
                    f"input {shown(tensor.name)}: datatype {tensor.datatype} is not supported by "
                    f"TorchServe backend {self.name!r} (torch has no such type)"
                )
            arrays.append((tensor, oip_codec.input_array(request, index)))
        if contract == config_pb2.BODY_CONTRACT_INSTANCES_JSON:
            if len(arrays) != 1:
                raise invalid(
                    f"the instances body contract of backend {self.name!r} takes exactly one "
                    f"input, the request has {len(arrays)}"
                )
            tensor, array = arrays[0]
            if tensor.datatype == "BYTES":
                values = [v.decode("utf-8", "replace") for v in array.reshape(-1)]
                instances = np.asarray(values, dtype=object).reshape(array.shape).tolist()
            else:
                instances = kserve_json.json_array(array)
            return kserve_json.dumps({"instances": instances})
        body = {
            "inputs": [
                kserve_json.to_json_tensor(t.name, a, t.datatype, lists=False) for t, a in arrays
            ],
        }
        if request.id:
            body["id"] = request.id
        if request.outputs:
            body["outputs"] = [{"name": o.name} for o in request.outputs]
        return kserve_json.dumps(body)

    async def infer(
        self, request: oip.ModelInferRequest, *, timeout: float | None, target
    ) -> oip.ModelInferResponse:
        request = backend_tensors(request, target)
        model, version = target.backend_model, target.backend_version
        contract = _contract(target)
        url = self._url(model, version)
        call = httpx.Request(
            "POST",
            url,
            content=self._body(request, contract),
            headers=[("content-type", "application/json"), *tracing.outgoing()],
            # httpx.Timeout(timeout): every phase bounded by the deadline, or none.
            extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout)},
        )
        reply = await self._mapped(self._exchange(call))
        if reply.status_code != 200:
            raise self._http_error(reply)
        try:
            payload = kserve_json.loads(reply.content)
        except ValueError:
            raise self._error(
                grpc.StatusCode.INTERNAL, "TorchServe answered with a body that is not JSON"
            ) from None
        schema = target.schema
        response = oip.ModelInferResponse(model_name=model, model_version=version, id=request.id)
        if contract == config_pb2.BODY_CONTRACT_INSTANCES_JSON:
            outputs = self._instances_outputs(payload, schema)
        else:
            outputs = self._oip_outputs(payload)
        wanted = {o.name for o in request.outputs}
        declared = {t.name: t for t in schema.outputs} if schema else {}
        for name, array, datatype in outputs:
            if wanted and name not in wanted:
                continue
            spec = declared.get(name)
            if spec is not None:
                array, datatype = self._conform(name, array, spec)
            oip_codec.add_output(response, name, array, datatype)
        return response

    def _url(self, model: str, version: str) -> httpx.URL:
        url = self._urls.get((model, version))
        if url is None:
            path = f"/predictions/{quote(model, safe='')}"
            if version:
                path += f"/{quote(version, safe='')}"
            if len(self._urls) >= 4096:  # targets come from the route table: bounded, but
                self._urls.clear()  # the table changes at run time
            url = self._urls[(model, version)] = httpx.URL(self._base + path)
        return url

    def _oip_outputs(self, payload) -> list[tuple[str, np.ndarray, str]]:
        tensors = payload.get("outputs") if isinstance(payload, dict) else None
        if not isinstance(tensors, list):
            raise self._error(grpc.StatusCode.INTERNAL, 'TorchServe answer has no "outputs" list')
        try:
            return [kserve_json.from_json_tensor(t, "TorchServe answer") for t in tensors]
        except BackendError:
            raise
        except Exception as err:  # a malformed answer is the backend's fault, not the caller's
            raise self._error(grpc.StatusCode.INTERNAL, getattr(err, "message", str(err))) from None

    def _instances_outputs(self, payload, schema) -> list[tuple[str, np.ndarray, str]]:
        if schema is None or len(schema.outputs) != 1:
            raise self._error(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the instances body contract needs the route schema to declare exactly one output",
            )
        spec = schema.outputs[0]
        values = payload.get("predictions", payload) if isinstance(payload, dict) else payload
        dtype = oip_codec.NUMPY_DTYPE.get(spec.datatype)
        array = np.asarray(values, dtype=dtype if spec.datatype != "BYTES" else object)
        if spec.datatype == "BYTES":
            array = np.vectorize(lambda v: str(v).encode(), otypes=[object])(array)
        return [(spec.name, array, spec.datatype)]

    def _conform(self, name: str, array: np.ndarray, spec) -> tuple[np.ndarray, str]:
        """Give an output the datatype and check the shape the route's schema declares."""
        want = tuple(spec.shape)
        if want and (
            len(want) != array.ndim
            or any(w not in (-1, g) for w, g in zip(want, array.shape, strict=True))
        ):
            raise self._error(
                grpc.StatusCode.INTERNAL,
                f"TorchServe output {shown(name)} has shape {list(array.shape)}, the route schema "
                f"declares {list(want)}",
            )
        if spec.datatype == "BYTES" or array.dtype == oip_codec.NUMPY_DTYPE[spec.datatype]:
            return array, spec.datatype
        converted = array.astype(oip_codec.NUMPY_DTYPE[spec.datatype])
        if not np.array_equal(
            converted.astype(array.dtype), array, equal_nan=array.dtype.kind == "f"
        ):
            raise self._error(
                grpc.StatusCode.INTERNAL,
                f"TorchServe output {shown(name)} does not fit the declared datatype "
                f"{spec.datatype}",
            )
        return converted, spec.datatype

    async def ready(self, model: str = "", version: str = "", *, timeout: float = 2.0) -> bool:
        try:
            if not model or self._management is None:
                reply = await self._send("GET", "/ping", self._client, timeout=timeout)
                return reply.status_code == 200
            url = f"/models/{quote(model, safe='')}" + (
                f"/{quote(version, safe='')}" if version else ""
            )
            reply = await self._send("GET", url, self._management, timeout=timeout)
        except BackendError:
            return False
        if reply.status_code != 200:
            return False
        try:
            described = reply.json()
        except ValueError:
            return False
        return any(w.get("status") == "READY" for d in described for w in d.get("workers", ()))

    async def metadata(self, model: str, version: str, *, timeout: float | None, target=None):
        reply = oip.ModelMetadataResponse(name=model, platform="torchserve")
        if self._management is None:
            return reply
        url = f"/models/{quote(model, safe='')}" + (
            f"/{quote(version, safe='')}" if version else "/all"
        )
        answer = await self._send("GET", url, self._management, timeout=timeout)
        if answer.status_code != 200:
            raise self._http_error(answer)
        reply.versions.extend(str(d.get("modelVersion", "")) for d in answer.json())
        return reply

    async def model_config(self, model: str, version: str, *, timeout: float | None, target=None):
        raise self._error(
            grpc.StatusCode.UNIMPLEMENTED,
            f"ModelConfig is a Triton extension; backend {self.name!r} is TorchServe "
            "(ModelMetadata describes the model from the route schema)",
        )

    async def model_spec(self, model: str, version: str, target=None) -> ModelSpec | None:
        """TorchServe cannot describe tensors: the route's declared schema, when there is one
        (in public names, which is what a schema declares)."""
        if target is None or target.schema is None or not target.schema.inputs:
            return None
        return declared_spec(target.schema)

    async def close(self) -> None:
        await self._client.aclose()
        if self._management is not None:
            await self._management.aclose()
