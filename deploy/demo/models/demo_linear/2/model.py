"""demo_linear version 2: OUTPUT0 = INPUT0 @ W + b (FP32, INPUT0 [N, 4] -> OUTPUT0 [N, 3]).

Both versions, so a test can tell which one answered (also in deploy/demo/models/README.md):
  version 1: W = [[1, 2, 0], [0, 1, -1], [2, 0, 1], [-1, 1, 3]]  b = [1, 0, -1]
  version 2: W = [[0, 1, 1], [1, 0, 2], [-1, 3, 0], [2, -2, 1]]  b = [10, 20, 30]
  x = [1, 2, 3, 4] -> version 1: [4, 8, 12], version 2: [17, 22, 39]
"""

import numpy as np
import triton_python_backend_utils as pb_utils

W = np.array([[0, 1, 1], [1, 0, 2], [-1, 3, 0], [2, -2, 1]], dtype=np.float32)
B = np.array([10, 20, 30], dtype=np.float32)


class TritonPythonModel:
    def execute(self, requests):
        # Dynamic batching hands over several requests at once: answer each one separately.
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x @ W + B).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
