"""The one way the gateway opens a Redis client (the job queue and the shared rate limiter).

Both want the same failure behaviour: when Redis is down, the call that needed it hears so at once
and answers UNAVAILABLE; the caller retries on its own terms. redis-py's default retry policy
(3 retries, backoff up to 10 s) held one operation ~6 s against a refused port, which outlived
callers' deadlines (a job submit answered DEADLINE_EXCEEDED instead of naming the queue). One quick
retry is kept: it covers a pooled connection that Redis closed when it restarted.
"""

from __future__ import annotations


def redis_client(address: str, *, connect_timeout: float, socket_timeout: float, **options):
    """An asyncio Redis client for "host:port" (IPv6 in brackets); options go to redis.Redis."""
    import redis.asyncio as redis  # only configs with Redis parts load the client
    from redis.asyncio.retry import Retry
    from redis.backoff import ConstantBackoff

    host, _, port = address.rpartition(":")
    return redis.Redis(
        host=host.strip("[]"),
        port=int(port),
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry_on_timeout=False,
        retry=Retry(ConstantBackoff(0.05), 1),
        **options,
    )
