"""What the admin API reads and changes in the running gateway: a typed view, so admin depends on
these few attributes, not on the whole Runtime (gateway/app.py's Runtime satisfies it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from gateway.dataplane.routing import RouteTable
from gateway.observability.health import Readiness
from gateway.observability.stats import RecentStats
from tensorgate.config.v1 import config_pb2


class GatewayView(Protocol):
    config: config_pb2.GatewayConfig  # the validated config being served
    table: RouteTable  # its compiled route table
    breakers: Mapping  # backend name -> its breaker (state, for `admin backends`)
    bulkheads: Mapping  # backend name -> its bulkhead (in flight, queued)
    recent: RecentStats  # recent calls per variant and backend (p99, error ratio)
    readiness: Readiness  # health checks' verdicts, drains

    def apply(self, config: config_pb2.GatewayConfig) -> None:
        """Serve `config` (validated, same backends) from the next call on."""
