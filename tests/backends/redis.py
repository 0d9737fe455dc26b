"""Runs a REAL redis-server (Debian's redis-server package; scripts/system-tools installs it) on
127.0.0.1 for the shared rate limiter's tests: a free port picked once (kept across restarts),
no persistence unless asked (`appendonly=True` writes an AOF in its work directory).

    with RedisServer() as redis:
        redis.address        # "127.0.0.1:PORT"
        redis.kill()         # SIGKILL; redis.start() brings it back on the same port
"""

from __future__ import annotations

import shutil
import socket
from types import TracebackType

from tests.backends.process import BackendProcess, free_port


class RedisServer(BackendProcess):
    name = "redis-server"

    def __init__(self, *, appendonly: bool = False, startup_timeout: float = 15.0) -> None:
        super().__init__("tensorgate-redis-", "redis.log", startup_timeout)
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/system-tools")
        self._binary = binary
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._appendonly = appendonly

    def _command(self):
        args = [self._binary, "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "yes" if self._appendonly else "no",
                "--dir", str(self._workdir), "--protected-mode", "yes"]  # fmt: skip
        return args, None

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_ready(self) -> None:
        import time

        self._poll(self._ping, time.monotonic() + self.startup_timeout, "redis-server not ready")

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
