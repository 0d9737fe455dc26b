"""Prometheus metrics of the gateway, on their own registry and their own listener.

Label values come from the route table, never from raw request fields, so a caller cannot grow
the number of series: requests for unknown models are counted under model="_unrouted".
"""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.parse

import prometheus_client as prom

UNROUTED = "_unrouted"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class InFlight:
    """A gauge of calls in flight kept as a plain count that the gauge reads when scraped.
    prometheus_client's Gauge.inc/dec take a lock each; a call moves four of these, and only
    the event loop's thread ever changes them."""

    __slots__ = ("value",)

    def __init__(self, child: prom.Gauge) -> None:
        self.value = 0
        child.set_function(lambda: self.value)

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class GatewayMetrics:
    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry or prom.CollectorRegistry()
        labels = ("model", "variant", "backend", "code", "protocol")
        self.requests = prom.Counter(
            "tensorgate_requests",
            "Inference calls answered, by public model, variant, backend, gRPC code (REST calls "
            "too: the code their HTTP status maps from) and protocol (grpc, rest).",
            labels,
            registry=self.registry,
        )
        self.latency = prom.Histogram(
            "tensorgate_request_duration_seconds",
            "Inference latency seen by the gateway, from receipt to answer (grpc, rest).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = prom.Gauge(
            "tensorgate_requests_in_flight",
            "ModelInfer calls being handled, by public model.",
            ("model",),
            registry=self.registry,
        )
        self.backend_in_flight = prom.Gauge(
            "tensorgate_backend_requests_in_flight",
            "Calls waiting on a backend.",
            ("backend",),
            registry=self.registry,
        )
        self.backend_up = prom.Gauge(
            "tensorgate_backend_up",
            "1 when the backend's last readiness probe succeeded.",
            ("backend",),
            registry=self.registry,
        )
        self.route_ready = prom.Gauge(
            "tensorgate_route_ready",
            "1 when at least one variant of the route is on a ready backend.",
            ("model",),
            registry=self.registry,
        )
        self.ready = prom.Gauge(
            "tensorgate_ready", "1 when the gateway reports ready.", registry=self.registry
        )
        self.info = prom.Info("tensorgate", "Gateway build information.", registry=self.registry)
        self.undecodable = prom.Counter(
            "tensorgate_undecodable_requests",
            "Requests whose body is not a valid message of the method's type (INVALID_ARGUMENT).",
            ("method",),
            registry=self.registry,
        )
        self.request_bytes_in_flight = prom.Gauge(
            "tensorgate_request_bytes_in_flight",
            "Bytes of request bodies held by calls being handled (limits.max_in_flight_bytes).",
            registry=self.registry,
        )
        self.memory_rejections = prom.Counter(
            "tensorgate_memory_rejections",
            "Requests refused RESOURCE_EXHAUSTED because the in-flight byte budget was full.",
            registry=self.registry,
        )
        # Children are cached: labels() takes a lock and builds a tuple on every call.
        self._outcomes: dict[tuple[str, str, str, str], tuple] = {}
        # Canary views: the weights being served, and rollouts (set by their driver).
        self.variant_weight = prom.Gauge(
            "tensorgate_variant_weight",
            "Weight of each variant in the route table this process serves.",
            ("model", "variant"),
            registry=self.registry,
        )
        self.rollout_state = prom.Gauge(
            "tensorgate_rollout_state",
            "1 for the state each model's latest rollout is in (RUNNING, PROMOTED, ...).",
            ("model", "canary", "state"),
            registry=self.registry,
        )
        self.rollout_percent = prom.Gauge(
            "tensorgate_rollout_percent",
            "Canary share (%) of the running rollout's current step.",
            ("model", "canary"),
            registry=self.registry,
        )
        self.rollout_step = prom.Gauge(
            "tensorgate_rollout_step",
            "Index of the running rollout's current step.",
            ("model", "canary"),
            registry=self.registry,
        )
        # CPU, memory, file descriptors of this process (process_*), as the default registry has.
        prom.ProcessCollector(registry=self.registry)
        self._in_flight: dict[str, InFlight] = {}
        self._backend_in_flight: dict[str, InFlight] = {}

    def in_flight_for(self, model: str) -> InFlight:
        count = self._in_flight.get(model)
        if count is None:
            count = self._in_flight[model] = InFlight(self.in_flight.labels(model))
        return count

    def backend_in_flight_for(self, backend: str) -> InFlight:
        count = self._backend_in_flight.get(backend)
        if count is None:
            count = InFlight(self.backend_in_flight.labels(backend))
            self._backend_in_flight[backend] = count
        return count

    def served_weights(self, routes) -> None:
        self.variant_weight.clear()
        for route in routes:
            for variant in route.variants:
                self.variant_weight.labels(route.model, variant.name).set(variant.weight)

    def rollout(self, rollout, states) -> None:
        """`states`: (name, number) of Rollout.State."""
        for name, number in states:
            if name != "STATE_UNSPECIFIED":
                value = 1 if number == rollout.state else 0
                self.rollout_state.labels(rollout.model, rollout.canary, name[6:]).set(value)
        self.rollout_percent.labels(rollout.model, rollout.canary).set(rollout.percent)
        self.rollout_step.labels(rollout.model, rollout.canary).set(rollout.step)

    def observe(
        self,
        model: str,
        variant: str,
        backend: str,
        code: str,
        seconds: float,
        protocol: str = "grpc",
    ) -> None:
        key = (model, variant, backend, code, protocol)
        children = self._outcomes.get(key)
        if children is None:
            children = (self.requests.labels(*key), self.latency.labels(*key))
            self._outcomes[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def serve(self, address: str):
        """Start the /metrics HTTP listener on host:port; returns the server (has .shutdown())."""
        return serve_metrics(address, self.registry)


def serve_metrics(address: str, registry: prom.CollectorRegistry):
    """An HTTP listener on host:port answering GET /metrics with `registry` in Prometheus' text
    format (OpenMetrics when asked) and 404 on every other path (prometheus_client's own server
    answers metrics on any path, so a typo'd probe looked healthy). Returns the server (it has
    .server_port and .shutdown()); it runs in a daemon thread."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    base = prom.MetricsHandler.factory(registry)

    class Handler(base):
        def do_GET(self) -> None:
            if urllib.parse.urlsplit(self.path).path != "/metrics":
                body = b"404 not found: this listener serves only /metrics\n"
                self.send_response(404)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, format: str, *args) -> None:
            pass  # scrapes are not log lines

    family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)[0][0]

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    server = Server((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
