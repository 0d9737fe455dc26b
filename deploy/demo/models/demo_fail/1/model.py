"""demo_fail: INPUT0[0] < 0 -> the request fails with a TritonError; otherwise OUTPUT0 = INPUT0."""

import triton_python_backend_utils as pb_utils

ERROR_MESSAGE = "demo_fail: INPUT0 must be >= 0"


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if x[0] < 0:
                error = pb_utils.TritonError(f"{ERROR_MESSAGE}, got {float(x[0])}")
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return responses
