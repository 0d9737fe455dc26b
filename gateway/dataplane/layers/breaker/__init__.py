"""Per-backend circuit breakers: stop calling a backend that keeps failing, fail fast instead.

Built on pybreaker (consecutive-failure counting, open timeout, half-open success threshold);
each outcome is replayed through its synchronous call path after the await. Added here what
pybreaker lacks for asyncio: a limit on concurrent half-open trials (otherwise every waiting
coroutine rushes the recovering backend at once), neutral handling of cancelled calls, and an
optional failure-ratio trigger over a sliding window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import prometheus_client as prom
import pybreaker

from gateway.dataplane.layers.breaker.window import WindowCounter
from gateway.dataplane.pipeline import Layer, per_backend
from gateway.durations import seconds
from gateway.errors import BACKEND_FAILURES, GatewayError
from tensorgate.config.v1 import config_pb2


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    consecutive_failures: int = 5
    failure_ratio: float = 0.0
    window: float = 10.0
    minimum_calls: int = 20
    open_duration: float = 5.0
    half_open_max_calls: int = 1
    half_open_successes: int = 1
    disabled: bool = False


def breaker_settings(
    backend: config_pb2.Backend, defaults: config_pb2.CircuitBreaker
) -> BreakerSettings:
    b = backend.circuit_breaker if backend.HasField("circuit_breaker") else defaults
    base = BreakerSettings()
    return BreakerSettings(
        consecutive_failures=b.consecutive_failures or base.consecutive_failures,
        failure_ratio=b.failure_ratio,
        window=seconds(b.window) if b.HasField("window") else base.window,
        minimum_calls=b.minimum_calls or base.minimum_calls,
        open_duration=(
            seconds(b.open_duration) if b.HasField("open_duration") else base.open_duration
        ),
        half_open_max_calls=b.half_open_max_calls or base.half_open_max_calls,
        half_open_successes=b.half_open_successes or base.half_open_successes,
        disabled=b.disabled,
    )


class BreakerMetrics:
    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.breaker_state = prom.Gauge(
            "tensorgate_breaker_state",
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
            ("backend",),
            registry=registry,
        )
        self.breaker_transitions = prom.Counter(
            "tensorgate_breaker_transitions",
            "Circuit breaker state changes, by the state entered.",
            ("backend", "state"),
            registry=registry,
        )
        self.breaker_rejections = prom.Counter(
            "tensorgate_breaker_rejections",
            "Calls failed fast because the backend's breaker was open (or half-open and full).",
            ("backend",),
            registry=registry,
        )


STATE_VALUE = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}
_CALLS, _FAILURES = 0, 1


class _StateToMetrics(pybreaker.CircuitBreakerListener):
    def __init__(self, metrics: BreakerMetrics) -> None:
        self._metrics = metrics

    def state_change(self, cb, old_state, new_state) -> None:
        self._metrics.breaker_state.labels(cb.name).set(STATE_VALUE[new_state.name])
        self._metrics.breaker_transitions.labels(cb.name, new_state.name).inc()


class BackendBreaker:
    def __init__(self, backend: str, settings: BreakerSettings, metrics: BreakerMetrics) -> None:
        self.backend = backend
        self.settings = settings
        self._metrics = metrics
        # Our own reference to the state storage: when the breaker opened is read from it.
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            state_storage=self._storage,
            fail_max=settings.consecutive_failures,
            reset_timeout=settings.open_duration,
            success_threshold=settings.half_open_successes,
            # Keep the backend's own error for the caller; the breaker just records the trip.
            throw_new_error_on_trip=False,
            listeners=[_StateToMetrics(metrics)],
            name=backend,
        )
        self._trials = 0
        self._open_for = timedelta(seconds=settings.open_duration)
        self._window = WindowCounter(settings.window, fields=2)
        metrics.breaker_state.labels(backend).set(0)

    @property
    def state(self) -> str:
        return self._cb.current_state

    def _reject(self) -> GatewayError:
        self._metrics.breaker_rejections.labels(self.backend).inc()
        error = GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            f"circuit breaker for backend {self.backend!r} is {self._cb.current_state}: failing "
            f"fast (it admits a trial call every {self.settings.open_duration:g}s)",
        )
        # Never sent: retry must not try this backend again (it would only be refused again),
        # but move to another backend's variant or hand the call to fallback, without backoff.
        error.fail_fast = True
        return error

    def _admit(self) -> bool:
        """True when a call may go to the backend now; moves an expired open breaker to
        half-open, as pybreaker's own call path does."""
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN:
            opened_at = self._storage.opened_at
            if opened_at and datetime.now(UTC) < opened_at + self._open_for:
                return False
            self._cb.half_open()
        return self._trials < self.settings.half_open_max_calls

    def _account(self, error: GatewayError | None) -> None:
        """Replay the outcome through pybreaker so it applies its own state machine."""

        def outcome() -> None:
            if error is not None:
                raise error

        try:
            self._cb.call(outcome)
        except (GatewayError, pybreaker.CircuitBreakerError):
            pass

    async def call(self, fn: Callable[[], object]):
        # The await runs outside pybreaker: its calling() would count a cancelled call (a hedge
        # loser, a caller that went away) as a failure or a success, and in half-open state
        # either would wrongly open or close the breaker. A cancelled call is not accounted.
        if not self._admit():
            raise self._reject()
        trial = self._cb.current_state == pybreaker.STATE_HALF_OPEN
        if trial:
            self._trials += 1
        try:
            result = await fn()
        except GatewayError as err:
            failed = err.code in BACKEND_FAILURES and not err.budget_ran_out
            self._account(err if failed else None)  # a backend that answers is healthy
            self._record(failed=failed)
            raise
        finally:
            if trial:
                self._trials -= 1
        if trial or self._cb.fail_counter:
            # A success only changes pybreaker's state when half-open or after failures; the
            # common case (closed, no failures) skips its lock and bookkeeping.
            self._account(None)
        self._record(failed=False)
        return result

    def _record(self, *, failed: bool) -> None:
        ratio = self.settings.failure_ratio
        if ratio <= 0:
            return
        self._window.add(_CALLS)
        if failed:
            self._window.add(_FAILURES)
            calls = self._window.total(_CALLS)
            if (
                calls >= self.settings.minimum_calls
                and self._window.total(_FAILURES) / calls >= ratio
                and self._cb.current_state == pybreaker.STATE_CLOSED
            ):
                self._cb.open()  # its listener (_StateToMetrics) records the transition


def breaker(breakers: Callable[[], Mapping[str, BackendBreaker]]) -> Layer:
    return per_backend(breakers)
