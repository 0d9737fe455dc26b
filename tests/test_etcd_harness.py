"""The real-etcd harness (tests/backends/etcd.py, the `etcd` fixture) with the aetcd client: what
was committed before a SIGKILL is there after a restart on the same data dir and port."""

from __future__ import annotations

import asyncio
import time

import aetcd
import pytest

from tests.backends.etcd import etcd_tool

KEY = b"/tensorgate/smoke"
# gRPC's default reconnect backoff (1 s, x1.6, up to 120 s) left a client unable to reach a
# restarted etcd for up to ~15 s here; capped at 1 s it reconnects within ~0.2 s.
FAST_RECONNECT = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}


async def get_when_back(client: aetcd.Client, key: bytes, timeout: float = 10.0) -> aetcd.Get:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await client.get(key)
            assert got is not None, f"{key!r} lost"
            return got
        except aetcd.ConnectionFailedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_value_survives_kill_9_and_restart(etcd) -> None:
    assert etcd.endpoint == f"127.0.0.1:{etcd.port}"
    client = aetcd.Client(etcd.host, etcd.port, timeout=2, options=FAST_RECONNECT)
    try:
        put = await client.put(KEY, b"committed")
        got = await client.get(KEY)
        assert (got.value, got.mod_revision) == (b"committed", put.header.revision)

        pid, endpoint = etcd.pid, etcd.endpoint
        etcd.kill()  # SIGKILL: no chance to flush anything more
        assert not etcd.running
        with pytest.raises(aetcd.ConnectionFailedError):
            await client.get(KEY)

        etcd.start()  # same data dir, same ports
        assert etcd.endpoint == endpoint and etcd.pid != pid
        # The same client object reconnects by itself.
        got = await get_when_back(client, KEY)
        assert (got.value, got.mod_revision) == (b"committed", put.header.revision)
        assert etcd.etcdctl("get", KEY.decode(), "--print-value-only").strip() == "committed"
    finally:
        await client.close()


async def test_paused_etcd_times_out_and_recovers(etcd) -> None:
    client = aetcd.Client(etcd.host, etcd.port, timeout=0.5)
    try:
        await client.put(KEY, b"v")
        etcd.pause()  # SIGSTOP: connections are accepted, nothing answers
        try:
            with pytest.raises(aetcd.ConnectionTimeoutError):
                await client.get(KEY)
        finally:
            etcd.resume()
        assert (await client.get(KEY)).value == b"v"
    finally:
        await client.close()


def test_missing_etcd_names_the_fix(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="run scripts/system-tools"):
        etcd_tool("etcd")
