"""The one error type that crosses layers: a gRPC status the caller should see."""

from __future__ import annotations

import traceback

import grpc

# Caller-controlled strings (model, tensor and parameter names, versions) are quoted in error
# messages at most this long: a status message travels in a header, and an unbounded echo would
# turn the caller's mistake into RESOURCE_EXHAUSTED (gRPC's metadata limit) or a log flood.
SHOWN_CHARS = 80


class GatewayError(Exception):
    """Raised anywhere on the request path; the servicer turns it into the RPC's status.

    `message` is shown to the caller as is, so it must say what was wrong and must never carry
    secrets (tokens, credentials in addresses). Quote caller-supplied strings with `shown`.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # True when the caller's own deadline (or the route timeout), not the backend's per-try
        # timeout, ended the call: the backend was not shown to be slow, so breakers ignore it.
        self.budget_ran_out = False
        # True when the gateway refused to call the backend at all (an open breaker): retrying
        # the same backend can only fail the same way, so retry moves on or gives up at once.
        self.fail_fast = False
        # The variant (gateway.dataplane.routing.Target) whose try failed, once routing has chosen
        # one: for the caller's trailers and the metrics' labels.
        self.target = None
        # Trailers the caller gets with this status (a rate limit's retry-after).
        self.trailers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def shown(value: str | bytes, limit: int = SHOWN_CHARS) -> str:
    """`repr` of a caller-supplied string, cut to `limit` characters with a marker saying how
    much was left out, so any message quoting it stays small whatever the caller sent."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}...(+{len(value) - limit} more)"


def invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.NOT_FOUND, message)


# A gRPC code as an HTTP status, for every REST surface (the KServe v2 listener, /v2/jobs, the
# admin API over HTTP): the v2 protocol's and Triton's mapping, with 429 and 504 where HTTP has a
# closer word than 400/500. Anything else is 500.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# Outcomes that say the backend (not the request) is in trouble: they count against breakers and
# are what fallback rescues. Caller errors (INVALID_ARGUMENT, NOT_FOUND, ...) never are.
BACKEND_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
    }
)
# Codes a route may never retry: retrying cannot change the answer.
NEVER_RETRY = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.OK,
    }
)


def settled(raised: BaseException, answer: GatewayError | None = None) -> tuple:
    """(code, message, target that failed or None) to answer `raised` (or `answer`) with, after
    clearing the locals of every frame its traceback holds. Otherwise an exception kept in a
    layer's local (fallback's primary error, hedge's errors) closes a cycle through its own
    traceback (exception -> frames -> request), and a rejected 40 MiB request stays resident
    until the cycle collector happens to run. Plain values, not the exception, for the same
    reason (a local holding it would close a cycle through the caller's frame); and a gRPC abort
    is raised outside the `except` block so the abort exception has no __context__ to hold
    either."""
    answer = answer or raised
    error: BaseException | None = raised
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__context__
    return answer.code, answer.message, getattr(answer, "target", None)
