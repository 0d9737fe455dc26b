"""`tensorgate check-config --probe`: connect to every backend the config names and check that
every routed model and version exists and is ready there, and that a route's declared schema
matches the model's own description where the backend gives one. What a wrong `backend_model`
would otherwise only show once callers fail."""

from __future__ import annotations

import asyncio

from adapters.registry import build_adapter
from gateway.controlplane.checks import Problem
from tensorgate.config.v1 import config_pb2


async def probe(
    config: config_pb2.GatewayConfig, timeout: float = 5.0
) -> tuple[list[Problem], list[str]]:
    """(problems, one line per backend and variant found fine)."""
    adapters = {
        b.name: build_adapter(b, max_request_bytes=config.limits.max_request_bytes)
        for b in config.backends
    }
    problems: list[Problem] = []
    fine: list[str] = []
    try:
        names = list(adapters)
        answers = await asyncio.gather(*(adapters[n].ready(timeout=timeout) for n in names))
        up = dict(zip(names, answers, strict=True))
        for i, backend in enumerate(config.backends):
            if up[backend.name]:
                fine.append(f"backend {backend.name} ({backend.address}): ready")
            else:
                problems.append(
                    Problem(
                        f"backends[{i}].address",
                        f"backend {backend.name} at {backend.address} did not answer ready "
                        f"within {timeout:g} s (not running, another port, or not ready)",
                    )
                )
        checks = [
            _variant(route, i, variant, j, adapters[variant.backend], timeout)
            for i, route in enumerate(config.routes)
            for j, variant in enumerate(route.variants)
            if up.get(variant.backend)
        ]
        for found, line in await asyncio.gather(*checks):
            problems.extend(found)
            if line:
                fine.append(line)
    finally:
        await asyncio.gather(*(a.close() for a in adapters.values()), return_exceptions=True)
    return problems, fine


async def _variant(route, i, variant, j, adapter, timeout) -> tuple[list[Problem], str]:
    at = f"routes[{i}].variants[{j}]"
    model, version = variant.backend_model, variant.backend_version
    named = f"{model!r}" + (f" version {version}" if version else "")
    if not await adapter.ready(model, version, timeout=timeout):
        field = "backend_version" if version and await adapter.ready(model, "", timeout=timeout) \
            else "backend_model"  # fmt: skip
        return [
            Problem(
                f"{at}.{field}",
                f"backend {variant.backend} has no ready model {named} (ModelReady is false: "
                f"no such model or version, or not loaded); route {route.model!r} variant "
                f"{variant.name!r} could not answer",
            )
        ], ""
    problems = []
    if route.schema.inputs:
        spec = await adapter.model_spec(model, version)
        if spec is not None:
            inputs = {t.name: t for t in spec.inputs}
            renamed = dict(variant.input_names)
            for k, tensor in enumerate(route.schema.inputs):
                name = renamed.get(tensor.name, tensor.name)
                have = inputs.get(name)
                where = f"routes[{i}].schema.inputs[{k}]"
                if have is None:
                    problems.append(
                        Problem(
                            f"{where}.name",
                            f"{model!r} on {variant.backend} has no input {name!r} (it has: "
                            f"{', '.join(sorted(inputs)) or 'none'})",
                        )
                    )
                elif have.datatype and have.datatype != tensor.datatype:
                    problems.append(
                        Problem(
                            f"{where}.datatype",
                            f"declared {tensor.datatype}, but {model!r} on {variant.backend} "
                            f"takes {have.datatype}",
                        )
                    )
    line = f"route {route.model} variant {variant.name}: {variant.backend} has {named}"
    return problems, "" if problems else line
