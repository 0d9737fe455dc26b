"""The floor of a Python gRPC hop: a bare grpc.aio proxy that forwards ModelInfer as bytes.

No protobuf parsing, no routing, no validation, no metrics, no response metadata: the request
bytes go to the backend on one shared channel and the response bytes come back. The gateway
does all of that and more, so the gap between this proxy and the gateway is the cost of the
gateway's own work, and the gap between direct and this proxy is the cost of any Python hop.
Clients address the backend's model name (nothing is rewritten).

    python -m bench.reference_proxy --listen 127.0.0.1:PORT --backend 127.0.0.1:TRITON_PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import grpc

SERVICE = "inference.GRPCInferenceService"
READY_LINE = "reference proxy ready on"


async def serve(listen: str, backend: str) -> None:
    """Forward ModelInfer from `listen` to `backend` until SIGTERM or SIGINT."""
    async with grpc.aio.insecure_channel(backend) as channel:
        forward = channel.unary_unary(f"/{SERVICE}/ModelInfer")  # bytes in, bytes out

        async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await forward(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")

        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.unary_unary_rpc_method_handler(model_infer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),)
        )
        if not server.add_insecure_port(listen):
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        print(f"{READY_LINE} {listen} -> {backend}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(2.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_proxy", description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port to serve on")
    parser.add_argument("--backend", required=True, help="host:port of the OIP gRPC backend")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
