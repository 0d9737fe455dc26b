"""demo_flaky: demo_linear v1 (y = x @ W + b) that fails about 20% of calls with an error, so a
canary rollout of it must be rolled back by the gateway's analysis."""

import random

import numpy as np
import triton_python_backend_utils as pb_utils

W = np.array([[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]], dtype=np.float32)
B = np.array([1, 0, -1], dtype=np.float32)
FAILURE_RATE = 0.2


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            if random.random() < FAILURE_RATE:
                error = pb_utils.TritonError("demo_flaky: injected failure")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x @ W + B).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
