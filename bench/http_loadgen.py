"""Closed-loop HTTP load generator: bench.loadgen's structure, for a REST backend (TorchServe).

N workers share one event loop; each POSTs the same prebuilt body back to back. After a warm-up,
every call that starts inside the measured window is recorded: latency (time.perf_counter around
the request, body read included) and a status code name: "OK" for HTTP 200, "HTTP_<status>"
otherwise, or the error's class name. It returns bench.loadgen.LoadResult, so the same reporting
applies.

Two clients: "raw" (default): each worker keeps one HTTP/1.1 keep-alive connection on asyncio
streams and writes a prebuilt request (a few dozen microseconds of CPU a call, so the client is
never what limits the backend); "httpx": one shared httpx.AsyncClient with the pool limits the
gateway's TorchServe adapter uses (measured here: ~1 ms of CPU a call at c=1, ~4 ms at c=16 on
the 2-vCPU VM, enough to make the client the bottleneck of a direct TorchServe leg).

    result = asyncio.run(run_http_load("http://127.0.0.1:8080/predictions/linear/1", body))

Command line:
    python -m bench.http_loadgen --url http://127.0.0.1:PORT/predictions/linear/1 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import httpx

from bench.loadgen import DEFAULT_INPUT, OK, LoadResult, add_loop_options, closed_loop, print_result

# The gateway's TorchServe adapter pools the same way (docs/adapters/torchserve.md).
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=32)
HEADERS = {"content-type": "application/json"}


def oip_json_body(values: Sequence[float] = DEFAULT_INPUT, input_name: str = "x") -> bytes:
    """A batch-1 FP32 [1, N] request in the Open Inference Protocol REST form."""
    tensor = {"name": input_name, "datatype": "FP32", "shape": [1, len(values)]}
    return json.dumps({"inputs": [{**tensor, "data": list(values)}]}).encode()


class RawConnection:
    """One HTTP/1.1 keep-alive connection: POST a prebuilt request, read status and body
    (Content-Length or chunked). Reconnects after an error or a `connection: close`."""

    def __init__(self, url: str, body: bytes) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader = self.reader
        assert reader is not None
        try:
            self.writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
            if "content-length" in headers:
                data = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    chunks.append(await reader.readexactly(size + 2))
                    if size == 0:
                        break
                data = b"".join(c[:-2] for c in chunks)
            else:
                data = await reader.read()
                headers["connection"] = "close"
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_http_load(
    url: str,
    body: bytes,
    *,
    client: str = "raw",
    concurrency: int = 16,
    duration: float = 10.0,
    warmup: float = 2.0,
    timeout: float = 5.0,
    on_window_start: Callable[[], None] | None = None,
    on_window_end: Callable[[], None] | None = None,
) -> LoadResult:
    """Closed loop of POST `url` with `body`, as bench.loadgen.run_load (same window rules)."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if client not in ("raw", "httpx"):
        raise ValueError(f"client must be raw or httpx, not {client!r}")
    async with httpx.AsyncClient(limits=LIMITS, timeout=timeout, headers=HEADERS) as shared:

        def sender() -> Callable[[], Awaitable[str]]:
            connection = RawConnection(url, body) if client == "raw" else None

            async def send() -> str:
                try:
                    if connection is None:
                        status = (await shared.post(url, content=body)).status_code
                    else:
                        async with asyncio.timeout(timeout):
                            status = (await connection.post())[0]
                except (
                    httpx.HTTPError,
                    OSError,
                    asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError,
                    TimeoutError,
                ) as err:
                    return type(err).__name__
                return OK if status == 200 else f"HTTP_{status}"

            return send

        window = await closed_loop(
            sender,
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            on_window_start=on_window_start,
            on_window_end=on_window_end,
        )
    return LoadResult(
        target=url,
        model=url.rsplit("/predictions/", 1)[-1],
        version="",
        concurrency=concurrency,
        **window,
    )


async def probe_http(url: str, body: bytes) -> dict:
    """One POST; the JSON answer. Raises httpx.HTTPStatusError on a non-2xx status."""
    async with httpx.AsyncClient(timeout=10.0, headers=HEADERS) as client:
        reply = await client.post(url, content=body)
        reply.raise_for_status()
        return reply.json()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_loadgen", description="Closed-loop HTTP POST load (httpx)."
    )
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/predictions/m/1")
    parser.add_argument("--input-name", default="x", help="input tensor name in the OIP body")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    add_loop_options(parser, "per-call timeout, seconds")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_http_load(
            args.url,
            oip_json_body(input_name=args.input_name),
            client=args.client,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            timeout=args.timeout,
        )
    )
    return print_result(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
