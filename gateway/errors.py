"""The one error type that crosses layers: a gRPC status the caller should see."""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """Raised anywhere on the request path; the servicer turns it into the RPC's status.

    `message` is shown to the caller as is, so it must say what was wrong and must never carry
    secrets (tokens, credentials in addresses).
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # True when the caller's own deadline (or the route timeout), not the backend's per-try
        # timeout, ended the call: the backend was not shown to be slow, so breakers ignore it.
        self.budget_ran_out = False

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.NOT_FOUND, message)
