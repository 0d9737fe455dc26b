"""Load a GatewayConfig from YAML and check it whole before anything starts.

The YAML file is the JSON mapping of the `tensorgate.config.v1.GatewayConfig` protobuf message
(durations as "1.5s"), so the file, the admin API and any store share one schema. Loading either
returns a complete, defaulted config or raises ConfigError listing every problem with its field
path; nothing is ever half-applied.
"""

from __future__ import annotations

import logging
import pathlib
import re

import yaml
from google.protobuf import json_format

from gateway.addresses import address_problem, is_loopback
from gateway.controlplane import schema
from gateway.controlplane.checks import ConfigError, Problem, check, warnings
from gateway.durations import seconds
from gateway.jobs.settings import check_jobs, jobs_defaults
from tensorgate.config.v1 import config_pb2

# What callers of the config module use from its parts.
__all__ = [
    "ConfigError",
    "Problem",
    "address_problem",
    "from_dict",
    "is_loopback",
    "load_file",
    "load_yaml",
    "seconds",
    "validate",
    "warnings",
]

DEFAULT_DATA_PLANE = "127.0.0.1:8001"


DEFAULT_METRICS = "127.0.0.1:9464"


DEFAULT_ROUTE_KEY_HEADER = "x-tensorgate-route-key"


DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024


DEFAULT_MAX_INPUTS = 64


DEFAULT_PER_TRY_TIMEOUT_S = 30.0


DEFAULT_SHUTDOWN_GRACE_S = 15.0


DEFAULT_HEALTH_CHECK_INTERVAL_S = 2.0


DEFAULT_ENVOY_LISTEN = "127.0.0.1:8080"


DEFAULT_ENVOY_MAX_BODY_BYTES = 4 * 1024 * 1024


DEFAULT_ETCD_PREFIX = "/tensorgate/default"


log = logging.getLogger(__name__)


def load_file(path: str | pathlib.Path, *, environment: bool = False) -> config_pb2.GatewayConfig:
    """The file's config, validated and defaulted; a relative admin.state_dir is made relative
    to the file's directory (not the working directory). `environment`: also check the
    variables and files it names (environment.py), as `serve` and `check-config` do."""
    source = str(path)
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(source, [Problem("", f"cannot read file: {err.strerror}")]) from None
    config = load_yaml(text, source=source)
    state_dir = config.admin.state_dir
    if state_dir and not pathlib.Path(state_dir).is_absolute():
        config.admin.state_dir = str(pathlib.Path(path).resolve().parent / state_dir)
    queue = config.jobs.embedded.path
    if queue and not pathlib.Path(queue).is_absolute():
        config.jobs.embedded.path = str(pathlib.Path(path).resolve().parent / queue)
    if environment:
        from gateway.controlplane import environment as machine

        missing = machine.problems(config)
        if missing:
            raise ConfigError(source, missing)
    # Startup (`serve`, `check-config`) is where an insecure choice must be heard: logged here
    # once per load, not in validate(), which also checks every admin API change.
    for warning in warnings(config):
        log.warning("%s: %s", source, warning)
    return config


def load_yaml(text: str, *, source: str = "<config>") -> config_pb2.GatewayConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = getattr(err, "problem", None) or str(err)
        raise ConfigError(source, [Problem("", f"not valid YAML: {where}{reason}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the top level must be a mapping")])
    return from_dict(data, source=source)


def from_dict(data: dict, *, source: str = "<config>") -> config_pb2.GatewayConfig:
    """Every problem at once: the file read against the schema (schema.py: field paths, enum
    values listed, "did you mean"), then what parses cleanly checked for meaning (checks.py),
    leaving out what a schema problem already explains."""
    found = [Problem(p, r) for p, r in schema.problems(data, config_pb2.GatewayConfig.DESCRIPTOR)]
    clean = schema.without(data, [p.path for p in found]) if found else data
    config = config_pb2.GatewayConfig()
    try:
        json_format.ParseDict(clean, config)
    except json_format.ParseError as err:
        path, reason = _locate_parse_error(clean, config_pb2.GatewayConfig, "", str(err))
        raise ConfigError(source, [*found, Problem(path, reason)]) from None
    if not found:
        return validate(config, source=source)
    try:
        validate(config, source=source)
    except ConfigError as err:
        found.extend(
            p for p in err.problems if not any(schema.overlaps(p.path, f.path) for f in found)
        )
    raise ConfigError(source, found)


def _locate_parse_error(data, message_type, path: str, reason: str) -> tuple[str, str]:
    """Narrow a json_format.ParseError down to the field path that caused it.

    json_format reports nested failures as a chain of "Failed to parse X field" without list
    indices; re-parsing one key (and one list element) at a time finds the exact field.
    """
    if not isinstance(data, dict):
        return path, _innermost(reason)
    descriptor = message_type.DESCRIPTOR
    for key, value in data.items():
        try:
            json_format.ParseDict({key: value}, message_type())
            continue
        except json_format.ParseError as err:
            reason = str(err)
        here = f"{path}.{key}" if path else str(key)
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if (
            field is None
            or field.message_type is None
            or field.message_type.full_name.startswith("google.protobuf.")
        ):
            return here, _innermost(reason)
        child = field.message_type._concrete_class
        if isinstance(value, list):
            for i, item in enumerate(value):
                try:
                    json_format.ParseDict(item, child())
                except (json_format.ParseError, AttributeError, TypeError) as err:
                    return _locate_parse_error(item, child, f"{here}[{i}]", str(err))
        return _locate_parse_error(value, child, here, reason)
    return path, _innermost(reason)


def _innermost(reason: str) -> str:
    reason = reason.split("\n")[0]
    reason = re.sub(r"^(Failed to parse \w+ field: )+", "", reason)
    reason = re.sub(r"\s*at \"?[\w.\[\]]+\"?\.?$", "", reason)
    return reason.rstrip(".") or "invalid value"


def validate(
    config: config_pb2.GatewayConfig, *, source: str = "<config>"
) -> config_pb2.GatewayConfig:
    """Return a defaulted copy of `config`, or raise ConfigError with every problem found."""
    problems: list[Problem] = []
    checked = config_pb2.GatewayConfig()
    checked.CopyFrom(config)
    _apply_defaults(checked)
    problems.extend(check(checked))
    problems.extend(Problem(path, reason) for path, reason in check_jobs(checked))
    if problems:
        raise ConfigError(source, problems)
    return checked


def _loopback_for_any(address: str) -> str:
    """A listener's address as a local client reaches it: 127.0.0.1 in place of any-address."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _apply_defaults(config: config_pb2.GatewayConfig) -> None:
    if not config.listeners.data_plane:
        config.listeners.data_plane = DEFAULT_DATA_PLANE
    if not config.listeners.metrics:
        config.listeners.metrics = DEFAULT_METRICS
    if not config.listeners.admin:
        config.listeners.admin = "off"
    if not config.listeners.xds:
        config.listeners.xds = "off"
    if not config.listeners.rest:
        config.listeners.rest = "off"
    if config.listeners.xds != "off":
        envoy = config.envoy
        if not envoy.listen:
            envoy.listen = DEFAULT_ENVOY_LISTEN
        if not envoy.gateway_address:
            envoy.gateway_address = _loopback_for_any(config.listeners.data_plane)
        if not envoy.rest_listen:
            envoy.rest_listen = "off"
        if not envoy.gateway_rest_address and config.listeners.rest != "off":
            envoy.gateway_rest_address = _loopback_for_any(config.listeners.rest)
        if not envoy.max_body_bytes:
            envoy.max_body_bytes = DEFAULT_ENVOY_MAX_BODY_BYTES
    if config.store.WhichOneof("kind") is None:
        config.store.file.SetInParent()
    if config.store.HasField("etcd"):
        etcd = config.store.etcd
        if not etcd.prefix:
            etcd.prefix = DEFAULT_ETCD_PREFIX
        if not etcd.HasField("timeout"):
            etcd.timeout.FromMilliseconds(2000)
        if not etcd.HasField("lease_ttl"):
            etcd.lease_ttl.FromSeconds(10)
    d = config.defaults
    if not d.HasField("per_try_timeout"):
        d.per_try_timeout.FromMilliseconds(int(DEFAULT_PER_TRY_TIMEOUT_S * 1000))
    if not d.route_key_header:
        d.route_key_header = DEFAULT_ROUTE_KEY_HEADER
    if not config.limits.max_request_bytes:
        config.limits.max_request_bytes = DEFAULT_MAX_REQUEST_BYTES
    jobs_defaults(config)  # after limits: the payload limit defaults within max_request_bytes
    if not config.limits.max_inputs:
        config.limits.max_inputs = DEFAULT_MAX_INPUTS
    if not config.limits.max_in_flight_bytes:
        config.limits.max_in_flight_bytes = 8 * config.limits.max_request_bytes
    life = config.lifecycle
    if not life.HasField("shutdown_grace"):
        life.shutdown_grace.FromMilliseconds(int(DEFAULT_SHUTDOWN_GRACE_S * 1000))
    if not life.HasField("drain_delay"):
        life.drain_delay.FromMilliseconds(0)
    if not life.HasField("health_check_interval"):
        life.health_check_interval.FromMilliseconds(int(DEFAULT_HEALTH_CHECK_INTERVAL_S * 1000))
    for backend in config.backends:
        if not backend.HasField("per_try_timeout"):
            backend.per_try_timeout.CopyFrom(d.per_try_timeout)
    for route in config.routes:
        for variant in route.variants:
            if not variant.backend_model:
                variant.backend_model = route.model
