"""TorchServe handler for the "instances" body contract (BODY_CONTRACT_INSTANCES_JSON):
{"instances": <nested list>} in, a JSON list out — the shape of TorchServe's stock handlers'
bodies. One FP32 input, one output; the gateway names and types the output from the route's
declared schema. A minimal example: the OIP handler (oip_handler.py) is the richer contract."""

from __future__ import annotations

import json
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler


class InstancesHandler(BaseHandler):
    def handle(self, data: list[Any], context: Any) -> list[str]:
        self.context = context
        responses = []
        for idx, request in enumerate(data):
            body = request.get("body") or request.get("data")
            try:
                if isinstance(body, (bytes, bytearray)):
                    body = json.loads(body.decode("utf-8"))
                elif isinstance(body, str):
                    body = json.loads(body)
                instances = body["instances"]
                x = torch.tensor(instances, dtype=torch.float32)
            except (ValueError, KeyError, TypeError) as err:
                context.set_response_status(400, "Bad Request", idx)
                responses.append(json.dumps({"error": f'expected {{"instances": [[...]]}}: {err}'}))
                continue
            with torch.inference_mode():
                y = self.model(x)
            responses.append(json.dumps(y.tolist()))
        return responses
