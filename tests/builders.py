"""Config builders and the data-plane stub the tests share, so each test module states only what
is particular to it.

Every keyword of a builder fills the config key of the same name (the fields of
protos/tensorgate/config/v1/config.proto); a keyword set to None leaves its key out, so a test can
say "no backend_version" as a config file would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import grpc
from tritonclient.grpc import service_pb2_grpc


def backend(kind: str, address: str, name: str, **fields) -> dict:
    """A `backends` entry: `kind` is the config's enum name, e.g. "BACKEND_KIND_OIP"."""
    return {"name": name, "kind": kind, "address": address, **fields}


def triton_backend(address: str, name: str = "triton-a", **fields) -> dict:
    return backend("BACKEND_KIND_TRITON", address, name, **fields)


def tfserving_backend(address: str, name: str = "tfs", **fields) -> dict:
    return backend("BACKEND_KIND_TFSERVING", address, name, **fields)


def torchserve_backend(server, name: str = "ts", **fields) -> dict:
    """`server`: a tests.backends.torchserve.TorchServe; its inference and management APIs."""
    return backend(
        "BACKEND_KIND_TORCHSERVE",
        server.inference_url.removeprefix("http://"),
        name,
        torchserve={"management_address": server.management_url.removeprefix("http://")},
        **fields,
    )


def variant(
    name: str,
    *,
    backend: str | None = "triton-a",
    backend_model: str | None = "demo_linear",
    backend_version: str | None = "1",
    version: str | None = None,
    weight: int = 1,
    **fields,
) -> dict:
    """A route's variant: by default version 1 of demo_linear on backend "triton-a", weight 1, no
    public version of its own. Other keywords (`batching`, `input_names`, ...) are copied in."""
    named = {
        "backend": backend,
        "backend_model": backend_model,
        "backend_version": backend_version,
        "version": version,
    }
    return {
        "name": name,
        **{key: value for key, value in named.items() if value is not None},
        "weight": weight,
        **fields,
    }


@contextlib.contextmanager
def oip_stub(
    address: str, options: Sequence[tuple[str, object]] = ()
) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """An Open Inference Protocol stub on a plaintext channel to `address`, closed on exit."""
    with grpc.insecure_channel(address, options=options) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
