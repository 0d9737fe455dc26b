"""Small helpers to build Open Inference Protocol requests in tests."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2 as oip

X = [1.0, 2.0, 3.0, 4.0]
Y_V1 = [4.0, 8.0, 12.0]  # demo_linear version 1 for X (deploy/demo/models/README.md)
Y_V2 = [17.0, 22.0, 39.0]  # demo_linear version 2 for X


def linear_request(model: str = "linear", version: str = "", x=X) -> oip.ModelInferRequest:
    array = np.asarray([x], dtype=np.float32)
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


def sleep_request(seconds: float, model: str = "sleep") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.asarray([seconds], dtype=np.float32).tobytes())
    return request


def output(response: oip.ModelInferResponse, index: int = 0) -> list[float]:
    return np.frombuffer(response.raw_output_contents[index], dtype=np.float32).tolist()
