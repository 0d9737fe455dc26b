"""The data plane's OpenAPI document: the KServe v2 (Open Inference Protocol) REST routes the
gateway serves on `listeners.rest` (gateway/dataplane/rest/), with Triton's binary tensor
extension. The v2 JSON bodies are written out here as the protocol defines them; the model
configuration and statistics are the protobuf messages of the same protocol's gRPC form
(inference.ModelConfig, inference.ModelStatisticsResponse, from tritonclient), by the proto3 JSON
mapping (schemas.py)."""

from __future__ import annotations

from gateway.openapi.schemas import Components

ERRORS = {
    400: "Bad request: malformed JSON, a tensor that does not match the model, a bad header.",
    401: "The caller could not be identified (a missing or invalid `Authorization: Bearer`).",
    403: "The caller may not use this model or version.",
    404: "Unknown model, version or path.",
    413: "The body is larger than the gateway accepts.",
    429: "Rate limited: retry after `x-tensorgate-retry-after-ms` milliseconds.",
    500: "Internal error.",
    503: "Unavailable or not ready: no backend can answer now.",
    504: "The deadline (`x-tensorgate-timeout-ms` or the route's timeout) passed.",
}
# Only where there is a body to decode.
UNSUPPORTED_ENCODING = "A `Content-Encoding` other than gzip or deflate."
DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
]  # fmt: skip
DESCRIPTION = """\
The KServe v2 / Open Inference Protocol over HTTP, as Triton serves it (so `tritonclient.http` \
works unchanged), in front of the gateway's route table: every call goes through the same \
routing, validation, retries, fallback, cache and limits as the gRPC data plane.

Bodies are JSON. Inference also takes Triton's binary tensor extension: send \
`Content-Type: application/octet-stream` with header `Inference-Header-Content-Length: N`, the \
first N bytes the JSON inference request and the raw tensors after it (each input naming its size \
in parameter `binary_data_size`); outputs asked for with parameter `binary_data: true` (or request \
parameter `binary_data_output: true`) come back the same way. Errors are `{"error": "..."}`."""


def _schema(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


PARAMETERS = {
    "type": "object",
    "description": "Named parameters: strings, numbers or booleans.",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}
TENSOR_DATA = {
    "type": "array",
    "description": "The tensor's elements, flat in row-major order or nested by shape. BYTES "
    "elements are strings.",
    "items": {"anyOf": [{"type": ["number", "string", "boolean"]}, _schema("v2.TensorData")]},
}
SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
V2_SCHEMAS = {
    "v2.Error": {
        "type": "object",
        "properties": {"error": {"type": "string", "description": "What was wrong."}},
        "required": ["error"],
    },
    "v2.ServerMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    "v2.TensorMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": _schema("v2.Datatype"),
            "shape": {
                "type": "array",
                "items": {"type": "integer", "minimum": -1},
                "description": "-1 where the size may vary.",
            },
        },
        "required": ["name", "datatype", "shape"],
    },
    "v2.ModelMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _schema("v2.TensorMetadata")},
            "outputs": {"type": "array", "items": _schema("v2.TensorMetadata")},
        },
        "required": ["name", "platform", "inputs", "outputs"],
    },
    "v2.ModelReady": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        "required": ["name", "ready"],
    },
    "v2.Datatype": {"type": "string", "enum": DATATYPES},
    "v2.Parameters": PARAMETERS,
    "v2.TensorData": TENSOR_DATA,
    "v2.RequestInput": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": SHAPE,
            "datatype": _schema("v2.Datatype"),
            "parameters": _schema("v2.Parameters"),
            "data": _schema("v2.TensorData"),
        },
        "required": ["name", "shape", "datatype"],
        "description": "`data` is required unless the tensor is sent binary (parameter "
        "`binary_data_size`).",
    },
    "v2.RequestOutput": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "parameters": _schema("v2.Parameters")},
        "required": ["name"],
    },
    "v2.InferenceRequest": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "Echoed in the response."},
            "parameters": _schema("v2.Parameters"),
            "inputs": {"type": "array", "items": _schema("v2.RequestInput")},
            "outputs": {
                "type": "array",
                "items": _schema("v2.RequestOutput"),
                "description": "The outputs wanted; all of them when absent.",
            },
        },
        "required": ["inputs"],
    },
    "v2.ResponseOutput": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": SHAPE,
            "datatype": _schema("v2.Datatype"),
            "parameters": _schema("v2.Parameters"),
            "data": _schema("v2.TensorData"),
        },
        "required": ["name", "shape", "datatype"],
    },
    "v2.InferenceResponse": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _schema("v2.Parameters"),
            "outputs": {"type": "array", "items": _schema("v2.ResponseOutput")},
        },
        "required": ["model_name", "outputs"],
    },
    "v2.RepositoryIndexRequest": {
        "type": "object",
        "properties": {
            "ready": {"type": "boolean", "description": "Only the models ready to answer."}
        },
    },
    "v2.RepositoryIndex": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string"},
                "reason": {"type": "string"},
            },
            "required": ["name"],
        },
    },
}
HEADERS = {
    "x-request-id": {
        "description": "The call's id: the caller's `x-request-id`, or one the gateway made.",
        "schema": {"type": "string"},
    },
    "x-tensorgate-variant": {
        "description": "The variant of the route that answered.",
        "schema": {"type": "string"},
    },
    "x-tensorgate-backend": {
        "description": "The backend that answered.",
        "schema": {"type": "string"},
    },
    "x-tensorgate-degraded": {
        "description": "Set when a fallback answered instead of the route's variants.",
        "schema": {"type": "string"},
    },
    "x-tensorgate-cache": {
        "description": "`hit` when the response cache answered.",
        "schema": {"type": "string"},
    },
}
REQUEST_HEADERS = [
    ("x-tensorgate-timeout-ms", {"type": "integer", "minimum": 1, "maximum": 86_400_000},
     "The call's deadline in "
     "milliseconds; the route's timeout when absent."),
    ("x-request-id", {"type": "string"}, "An id for the call, echoed and logged."),
    ("x-tensorgate-route-key", {"type": "string"}, "Pins the call's variant choice: calls with "
     "one key go to one variant (routes with key-based stickiness)."),
]  # fmt: skip
EXAMPLE_INPUT = {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def build() -> dict:
    from tritonclient.grpc import model_config_pb2, service_pb2

    components = Components()
    config = components.ref(model_config_pb2.ModelConfig.DESCRIPTOR)
    stats = components.ref(service_pb2.ModelStatisticsResponse.DESCRIPTOR)
    metadata = _json(_schema("v2.ServerMetadata"), "Name, version, extensions.")
    index = _op(
        "repositoryIndex",
        "The models the caller may use, with their state.",
        "repository",
        _json(_schema("v2.RepositoryIndex"), "The models."),
    )
    index["responses"]["415"] = {"$ref": "#/components/responses/415"}
    index["requestBody"] = {
        "required": False,
        "content": {"application/json": {"schema": _schema("v2.RepositoryIndexRequest")}},
    }
    paths: dict[str, dict] = {
        "/v2": {"get": _op("serverMetadata", "Server metadata.", "server", metadata)},
        "/v2/health/live": {"get": _op("serverLive", "Liveness: 200 while the gateway runs.",
                                       "health", {"description": "Live (no body)."})},
        "/v2/health/ready": {"get": _op("serverReady", "Readiness: 200 when the gateway can "
                                        "answer, 503 when not.", "health",
                                        {"description": "Ready (no body)."})},
        "/v2/models/stats": {"get": _op("modelStatisticsAll", "Statistics of every model.",
                                        "model", _json(stats, "The statistics."))},
        "/v2/repository/index": {"post": index},
    }  # fmt: skip
    model_routes = (
        ("", "modelMetadata", "Model metadata: its inputs and outputs.",
         _json(_schema("v2.ModelMetadata"), "The metadata.")),
        ("/ready", "modelReady", "Whether the model can answer (503 when not).",
         _json(_schema("v2.ModelReady"), "Ready.")),
        ("/config", "modelConfig", "The model's configuration (inference.ModelConfig).",
         _json(config, "The configuration.")),
        ("/stats", "modelStatistics", "The model's statistics.", _json(stats, "The statistics.")),
    )  # fmt: skip
    for suffix, params, name in (
        ("", [MODEL], ""),
        ("/versions/{version}", [MODEL, VERSION], "Version"),
    ):
        base = "/v2/models/{model}" + suffix
        for tail, operation_id, summary, ok in model_routes:
            paths[base + tail] = {"get": _op(operation_id + name, summary, "model", ok, params)}
        paths[base + "/infer"] = {"post": _infer(name, params)}
    paths.update(_jobs(components))
    schemas = {**dict(sorted(components.schemas.items())), **V2_SCHEMAS}
    responses = {str(status): _json(_schema("v2.Error"), text) for status, text in ERRORS.items()}
    responses["415"] = _json(_schema("v2.Error"), UNSUPPORTED_ENCODING)
    responses["429"]["headers"] = {
        "x-tensorgate-retry-after-ms": {
            "description": "When to retry, in milliseconds.",
            "schema": {"type": "integer", "minimum": 0},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tensorgate data plane (KServe v2 REST)",
            "version": "2",
            "description": DESCRIPTION,
        },
        "tags": [
            {"name": "inference", "description": "Run a model."},
            {"name": "model", "description": "Model metadata, readiness, config, statistics."},
            {"name": "server", "description": "The gateway itself."},
            {"name": "health", "description": "Liveness and readiness probes."},
            {"name": "repository", "description": "The models behind the gateway."},
            {
                "name": "jobs",
                "description": "Asynchronous inference (docs/jobs.md): served when "
                "the gateway has `jobs` configured, 404 otherwise.",
            },
        ],
        # Anonymous unless the gateway identifies callers (callers.jwt): then a bearer JWT.
        "security": [{}, {"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A caller's JWT, when the gateway identifies callers.",
                }
            },
        },
    }


def _op(operation_id: str, summary: str, tag: str, ok: dict, parameters=()) -> dict:
    responses = {"200": ok}
    for status in ERRORS:
        responses[str(status)] = {"$ref": f"#/components/responses/{status}"}
    operation = {"tags": [tag], "operationId": operation_id, "summary": summary}
    if parameters:
        operation["parameters"] = list(parameters)
    operation["responses"] = responses
    return operation


def _infer(name: str, params: list[dict]) -> dict:
    headers = [
        {"name": header, "in": "header", "required": False, "schema": schema, "description": text}
        for header, schema, text in REQUEST_HEADERS
    ]
    binary_length = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "Binary tensor extension: the length of the JSON header at the start of "
        "an `application/octet-stream` body (request) or of the response.",
    }
    binary = {
        "schema": {
            "type": "string",
            "contentMediaType": "application/octet-stream",
            "description": "The JSON inference request/response, then the binary tensors.",
        }
    }
    ok = _json(_schema("v2.InferenceResponse"), "The outputs.")
    ok["content"]["application/octet-stream"] = binary
    ok["headers"] = {
        **HEADERS,
        "Inference-Header-Content-Length": {
            "description": binary_length["description"],
            "schema": binary_length["schema"],
        },
    }
    operation = _op(
        f"modelInfer{name}",
        "Run the model" + (" at this version." if name else " (the route picks the variant)."),
        "inference",
        ok,
        [*params, *headers, binary_length],
    )
    operation["responses"]["415"] = {"$ref": "#/components/responses/415"}
    operation["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {
                "schema": _schema("v2.InferenceRequest"),
                "example": {"inputs": [EXAMPLE_INPUT]},
            },
            "application/octet-stream": binary,
        },
    }
    return operation


def _jobs(components) -> dict[str, dict]:
    """/v2/jobs (gateway/jobs/rest.py): bodies are tensorgate.jobs.v1's messages by the proto3
    JSON mapping, as over gRPC."""
    from tensorgate.jobs.v1 import jobs_pb2

    def message(m, text: str) -> dict:
        return _json(components.ref(m.DESCRIPTOR), text)

    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    summary = "Submit a job: its id at once (200 when the idempotency key named an existing job)."
    submit = _op("jobSubmit", summary, "jobs", message(jobs_pb2.SubmitResponse, "The job."))
    submit["responses"]["201"] = message(jobs_pb2.SubmitResponse, "The job, created.")
    submit["responses"]["415"] = {"$ref": "#/components/responses/415"}
    submit["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": components.ref(
            jobs_pb2.SubmitRequest.DESCRIPTOR)}},
    }  # fmt: skip
    query = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (("model", {"type": "string"}), ("state", {"type": "string"}),
                             ("page_size", {"type": "integer", "minimum": 0}),
                             ("page_token", {"type": "string"}))
    ]  # fmt: skip
    listed = _op("jobList", "The caller's jobs, by model and state, a page at a time.", "jobs",
                 message(jobs_pb2.ListResponse, "A page of jobs."), query)  # fmt: skip
    job = message(jobs_pb2.Job, "The job.")
    cancel = _op("jobCancel", "Cancel a queued or running job.", "jobs", job, [job_id])
    cancel["responses"]["415"] = {"$ref": "#/components/responses/415"}
    get = _op("jobGet", "A job: its state, and its result once done.", "jobs", job, [job_id])
    return {
        "/v2/jobs": {"post": submit, "get": listed},
        "/v2/jobs/{id}": {"get": get},
        "/v2/jobs/{id}/cancel": {"post": cancel},
    }
