"""demo_identity: OUTPUT0 = INPUT0 (INT32), OUTPUT1 = INPUT1 (BYTES), or an empty [0] BYTES tensor
when the optional INPUT1 is absent."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            in0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out1 = in1.as_numpy() if in1 is not None else np.empty((0,), dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUTPUT0", in0), pb_utils.Tensor("OUTPUT1", out1)]
                )
            )
        return responses
