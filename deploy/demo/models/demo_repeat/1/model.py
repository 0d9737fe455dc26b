"""demo_repeat (decoupled): INPUT0 = [n] -> n responses OUTPUT0 = [i], i = 0..n-1, 10 ms apart,
then the final flag. A negative n answers with an error."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()[0])
            if n < 0:
                error = pb_utils.TritonError(f"demo_repeat: cannot repeat {n} times")
                sender.send(
                    pb_utils.InferenceResponse(error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            for i in range(n):
                out = pb_utils.Tensor("OUTPUT0", np.array([float(i)], dtype=np.float32))
                sender.send(pb_utils.InferenceResponse([out]))
                time.sleep(0.01)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
