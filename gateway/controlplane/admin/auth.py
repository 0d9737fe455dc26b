"""Admin authentication: bearer tokens (from a file or an environment variable) and/or mTLS
client certificates, checked by a server interceptor before any admin handler (reflection
included) runs. Tokens are compared in constant time and never logged or echoed.

One variable for both ends: the server reads `admin.tokens_env` as "name:role:token,..." and the
CLI reads TENSORGATE_ADMIN_TOKEN (`--token-env`) as a bare token or as one "name:role:token"
item, so `export TENSORGATE_ADMIN_TOKEN=ops:admin:<token>` serves a one-host setup whole."""

from __future__ import annotations

import contextvars
import hmac
import os
from dataclasses import dataclass

import grpc
import yaml

ROLES = ("read", "admin")
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "admin_principal", default=None
)
READ_ONLY_METHODS = frozenset({"GetRouteTable", "ListRevisions", "GetRollout", "GetBackendStatus"})
# The variable the CLI reads its token from (and the one the docs and the demo give the server).
TOKEN_ENV = "TENSORGATE_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


def token_hint(variable: str) -> str:
    """How to set a tokens variable, never with a real token in it."""
    return (
        f"set it as name:role:token, role admin or read, a token of at least {MIN_TOKEN_CHARS} "
        f"characters, e.g. export {variable}=ops:admin:$(openssl rand -hex 16)"
    )


def bearer_token(value: str) -> str:
    """The token in a CLI variable: a bare token, or the token of a "name:role:token" item (the
    server's format), so one variable can serve both."""
    parts = value.strip().split(":", 2)
    if len(parts) == 3 and parts[1] in ROLES and parts[0] and parts[2]:
        return parts[2]
    return value.strip()


class AuthConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def load_tokens(tokens_file: str, tokens_env: str) -> list[tuple[str, str, bytes]]:
    """[(name, role, token bytes)]; raises AuthConfigError naming the source (never a token)."""
    tokens: list[tuple[str, str, bytes]] = []
    if tokens_file:
        try:
            entries = yaml.safe_load(open(tokens_file, encoding="utf-8")) or []
        except OSError as err:
            raise AuthConfigError(
                f"admin.tokens_file: cannot read {tokens_file}: {err.strerror}"
            ) from None
        except yaml.YAMLError:
            raise AuthConfigError(f"admin.tokens_file: {tokens_file} is not valid YAML") from None
        if not isinstance(entries, list):
            raise AuthConfigError(
                f"admin.tokens_file: {tokens_file} must be a list of {{name, role, token}}"
            )
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), str) for k in ("name", "role", "token")
            ):
                raise AuthConfigError(
                    f"admin.tokens_file: entry {i} needs string name, role and token"
                )
            tokens.append((entry["name"], entry["role"], entry["token"].encode()))
    if tokens_env:
        raw = os.environ.get(tokens_env, "")
        if not raw:
            raise AuthConfigError(
                f"admin.tokens_env: environment variable {tokens_env} is empty or unset"
            )
        for i, item in enumerate(raw.split(",")):
            parts = item.strip().split(":", 2)
            if len(parts) != 3:
                raise AuthConfigError(
                    f"admin.tokens_env: item {i} of {tokens_env} is not name:role:token"
                )
            tokens.append((parts[0], parts[1], parts[2].encode()))
    for name, role, token in tokens:
        where = "admin.tokens_file" if tokens_file and not tokens_env else "admin tokens"
        if role not in ROLES:
            raise AuthConfigError(
                f"{where}: token {name!r}: role must be read or admin, not {role!r}"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise AuthConfigError(
                f"{where}: token {name!r} has {len(token)} characters: tokens need at least "
                f"{MIN_TOKEN_CHARS}"
            )
    return tokens


class Authenticator:
    def __init__(self, tokens: list[tuple[str, str, bytes]], client_cert_role: str = "") -> None:
        self._tokens = tokens
        self._cert_role = client_cert_role or "read"

    def principal(self, metadata, auth_context) -> Principal | None:
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            presented = token.strip().encode()
            found = None
            for name, role, expected in self._tokens:
                # compare against every token: time does not say which prefix matched
                if hmac.compare_digest(presented, expected):
                    found = Principal(name, role)
            return found
        subject = (auth_context or {}).get("x509_subject")
        if subject:
            return Principal(f"cert:{subject[0].decode()}", self._cert_role)
        return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without valid credentials; PERMISSION_DENIED for a read-only caller on a
    method that changes state."""

    def __init__(self, authenticator: Authenticator, tokens_env: str = "") -> None:
        self._auth = authenticator
        self._unauthenticated = unauthenticated_message(tokens_env)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        needs_admin = (
            handler_call_details.method.startswith("/tensorgate.admin.")
            and method not in READ_ONLY_METHODS
        )
        auth = self._auth
        refusal = self._unauthenticated

        def wrap(behavior, streaming: bool):
            async def unary(request, context):
                principal = auth.principal(context.invocation_metadata(), context.auth_context())
                await _check(principal, needs_admin, context, refusal)
                token = current_principal.set(principal)  # for the audit log
                try:
                    return await behavior(request, context)
                finally:
                    current_principal.reset(token)

            async def stream(request_or_iterator, context):
                principal = auth.principal(context.invocation_metadata(), context.auth_context())
                await _check(principal, needs_admin, context, refusal)
                async for item in behavior(request_or_iterator, context):
                    yield item

            return stream if streaming else unary

        # Every shape is wrapped: the intake registers unary methods as streaming-request ones
        # (gateway/dataplane/intake.py), and a handler passed through unwrapped would skip the
        # check.
        for kind, make, streaming in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
        ):
            behavior = getattr(handler, kind)
            if behavior:
                return make(
                    wrap(behavior, streaming),
                    handler.request_deserializer,
                    handler.response_serializer,
                )
        raise TypeError(f"admin API: a method handler with no behavior for {method}")


def unauthenticated_message(tokens_env: str = "") -> str:
    """What an UNAUTHENTICATED caller is told: where the CLI reads its token, and (a variable's
    name, never a token) where this gateway reads the tokens it accepts."""
    accepted = f" ${tokens_env} (admin.tokens_env) or" if tokens_env else ""
    return (
        "admin API: no valid credentials: send 'authorization: Bearer <token>' (tensorgate admin "
        f"reads it from ${TOKEN_ENV}, or the variable --token-env names) with a token from"
        f"{accepted} admin.tokens_file, or a trusted client certificate"
    )


async def _check(principal: Principal | None, needs_admin: bool, context, refusal: str) -> None:
    if principal is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
    if needs_admin and principal.role != "admin":
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.name!r} has read-only access: this method needs an admin token",
        )
