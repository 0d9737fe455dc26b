"""A REAL KServe Python model server (the `kserve` package's gRPC data plane) serving test models.

Runs with the kserve venv's python (``scripts/backend-venv kserve``), never the gateway's: kserve
pins its own protobuf and grpcio-tools. Started by tests/backends/kserve.py.

Everything that answers a call is kserve's own: its Open Inference Protocol servicer
(kserve.protocol.grpc.servicer.InferenceServicer), its exception-to-status interceptor, its
DataPlane and ModelRepository, and kserve.Model subclasses written the way kserve documents custom
models (predict() returns an array; kserve's get_predict_response names the output "output-0").
Only the listener is ours: kserve.ModelServer binds gRPC to [::] and its REST server to 0.0.0.0
with no way to choose the address, so this script builds the same grpc.aio server as kserve's
GRPCServer.start (same servicer, same interceptors) on 127.0.0.1 only, and starts no REST server.

Models:
  linear       y = 2x + 1 on one FP32 input "input-0" (any shape); the answer's one output is
               named by the server, "output-0". Other datatypes: kserve InvalidInput.
  multi        two outputs named by the model ("sum", "diff") of two FP32 inputs "a" and "b".
  failing      raises RuntimeError in predict (kserve answers INTERNAL "Internal server error"),
               or kserve's InvalidInput for an INT32 input (INVALID_ARGUMENT). Not described:
               ModelMetadata lists no tensors.
  not_ready    registered, but never becomes ready (ModelReady false; load() fails).

    python kserve_server.py --port N
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from concurrent import futures

import numpy as np

# This directory holds tests/backends/kserve.py (the harness), which would shadow the kserve
# package: drop the script's own directory from the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="KServe gRPC model server for the tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported: keep our flags from it

    from grpc import aio
    from kserve import InferRequest, Model
    from kserve.errors import InvalidInput
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import (
        ExceptionToStatusInterceptor,
        LoggingInterceptor,
    )
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.utils.utils import get_predict_response

    class Linear(Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.load()

        def get_input_types(self):
            return [{"name": "input-0", "datatype": "FP32", "shape": [-1, -1]}]

        def get_output_types(self):
            return [{"name": "output-0", "datatype": "FP32", "shape": [-1, -1]}]

        async def predict(self, payload: InferRequest, headers=None, response_headers=None):
            tensor = payload.inputs[0]
            if tensor.datatype != "FP32":
                raise InvalidInput(f"input {tensor.name!r}: FP32 expected, got {tensor.datatype}")
            x = tensor.as_numpy()
            return get_predict_response(payload, (2 * x + 1).astype(np.float32), self.name)

    class Multi(Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.load()

        def get_input_types(self):
            return [
                {"name": "a", "datatype": "FP32", "shape": [-1]},
                {"name": "b", "datatype": "FP32", "shape": [-1]},
            ]

        def get_output_types(self):
            return [
                {"name": "sum", "datatype": "FP32", "shape": [-1]},
                {"name": "diff", "datatype": "FP32", "shape": [-1]},
            ]

        async def predict(self, payload: InferRequest, headers=None, response_headers=None):
            import pandas as pd

            by_name = {t.name: t.as_numpy() for t in payload.inputs}
            a, b = by_name["a"], by_name["b"]
            # A DataFrame result: kserve makes one output per column, named by the column.
            frame = pd.DataFrame({"sum": (a + b).astype(np.float32), "diff": (a - b)})
            frame["diff"] = frame["diff"].astype(np.float32)
            return get_predict_response(payload, frame, self.name)

    class Failing(Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.load()

        async def predict(self, payload, headers=None, response_headers=None):
            if payload.inputs[0].datatype == "INT32":
                raise InvalidInput("failing refuses INT32 inputs")  # INVALID_ARGUMENT
            raise RuntimeError("the model failed on purpose")  # INTERNAL

    class NotReady(Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)

        def load(self) -> bool:
            return self.ready  # never loads

    repository = ModelRepository()
    for model in (Linear("linear"), Multi("multi"), Failing("failing"), NotReady("not_ready")):
        repository.update(model)
    data_plane = DataPlane(model_registry=repository)
    extension = ModelRepositoryExtension(model_registry=repository)

    async def serve() -> None:
        # As kserve.protocol.grpc.server.GRPCServer.start, on a loopback address.
        server = aio.server(
            futures.ThreadPoolExecutor(max_workers=4),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.so_reuseport", 0)],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(data_plane, extension), server
        )
        server.add_insecure_port(f"{args.host}:{args.port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"kserve gRPC on {args.host}:{args.port}", flush=True)
        await stop.wait()
        await server.stop(grace=2)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
