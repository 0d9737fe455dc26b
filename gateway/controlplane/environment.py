"""What a valid config needs from the machine it starts on: the environment variables and files it
names. Checked by `serve` before anything starts (nothing bound, nothing written to the store) and
by `check-config`, so that what passes check-config also starts; not by admin API changes, which
never touch these."""

from __future__ import annotations

import os
import pathlib

from gateway.controlplane.admin.auth import AuthConfigError, load_tokens, token_hint
from gateway.controlplane.checks import Problem, pem_problem
from gateway.jobs.settings import jobs_environment
from tensorgate.config.v1 import config_pb2


def problems(config: config_pb2.GatewayConfig) -> list[Problem]:
    """Every missing or unusable variable or file the (defaulted) config names."""
    found: list[Problem] = []
    if config.listeners.admin != "off":
        _admin(config.admin, found)
    _tls(config.listeners.data_plane_tls, "listeners.data_plane_tls", found)
    if config.store.HasField("etcd"):
        etcd = config.store.etcd
        for field in ("ca_file", "cert_file", "key_file"):
            path = getattr(etcd, field)
            if path and not os.access(path, os.R_OK):
                found.append(Problem(f"store.etcd.{field}", f"cannot read {path}"))
    log_file = config.observability.logging.file
    if log_file:
        directory = pathlib.Path(log_file).resolve().parent
        if not directory.is_dir() or not os.access(directory, os.W_OK):
            found.append(
                Problem("observability.logging.file", f"cannot write to directory {directory}")
            )
    found.extend(Problem(path, reason) for path, reason in jobs_environment(config))
    return found


def _admin(admin: config_pb2.Admin, found: list[Problem]) -> None:
    if not (admin.tokens_file or admin.tokens_env or admin.tls.client_ca_file):
        found.append(
            Problem(
                "admin",
                "listeners.admin is set but no credentials are configured: set admin.tokens_env "
                "(e.g. TENSORGATE_ADMIN_TOKEN), admin.tokens_file or admin.tls.client_ca_file, "
                "or listeners.admin: off",
            )
        )
    try:
        load_tokens(admin.tokens_file, admin.tokens_env)
    except AuthConfigError as err:
        path, _, reason = str(err).partition(": ")
        if not path.startswith("admin."):
            path, reason = "admin", str(err)
        if path == "admin.tokens_env":
            reason += f" ({token_hint(admin.tokens_env)})"
        found.append(Problem(path, reason))
    _tls(admin.tls, "admin.tls", found)


def _tls(tls: config_pb2.Tls, at: str, found: list[Problem]) -> None:
    for field in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, field)
        reason = pem_problem(path) if path else None
        if reason:
            found.append(Problem(f"{at}.{field}", reason))
