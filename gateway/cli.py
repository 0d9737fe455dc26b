"""tensorgate: a gRPC inference gateway. Callers speak the Open Inference Protocol (KServe v2)
to it as to NVIDIA Triton; a route table (a YAML file, the protobuf GatewayConfig) decides which
backend (Triton, any OIP server, TF Serving, TorchServe) and which model version answers.

  tensorgate check-config -c gateway.yaml --probe   validate a config, and its backends' models
  tensorgate serve -c gateway.yaml                  run the gateway
  tensorgate admin routes                           operate a running gateway (admin API)
  tensorgate smoke -c gateway.yaml                  run the config's smoke examples against it

README.md and docs/ in the source tree say more; every command has --help."""

from __future__ import annotations

import os
import sys

if sys.argv[1:2] == ["admin"]:
    # The admin CLI reports each failure itself, in one line. gRPC core's own log lines (an
    # epoll error printed while a Ctrl-C tore the channel down, seen in CI) would only add noise
    # to a terminal; gRPC reads this once, when it is first imported, hence before any import.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import logging
import pathlib

from gateway import __version__
from gateway.controlplane.config import ConfigError, load_file
from gateway.helptext import HelpFormatter, command
from gateway.workers import MAX_WORKERS, supervise, worker_count

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _config_option(parser: argparse.ArgumentParser, help: str = "gateway YAML file") -> None:
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorgate", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"tensorgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = command(
        sub, "serve", "run the gateway",
        "Serves the Open Inference Protocol on listeners.data_plane, metrics on "
        "listeners.metrics,\nthe admin API on listeners.admin (when set), until SIGTERM or "
        "Ctrl-C, then drains.\nThe config is checked whole first, with the environment "
        "variables and files it names:\nnothing is bound or stored when it is invalid.",
    )  # fmt: skip
    _config_option(serve)
    serve.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="least severe log records written (stderr)",
    )
    serve.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        metavar="N",
        help="gateway processes sharing the data-plane port (SO_REUSEPORT; balanced per "
        f"connection), 1 to {MAX_WORKERS}; 1 is one process (gateway/workers.py)",
    )
    check = command(
        sub, "check-config", "validate a gateway YAML file and exit",
        "Lists every problem at once, each with its field path, and exits 1; prints OK and what\n"
        "the config declares otherwise (exit 0). Also checks the environment variables and\n"
        "files the config names (admin.tokens_env, TLS files, ...). With --probe it connects\n"
        "to every backend and checks that every routed model and version is there and ready.",
    )  # fmt: skip
    check.add_argument("file", nargs="?", help="gateway YAML file (or -c FILE)")
    check.add_argument("--config", "-c", metavar="FILE", help="gateway YAML file")
    check.add_argument(
        "--probe",
        action="store_true",
        help="also connect to each backend: every routed model and version must exist and be "
        "ready there, and match the route's schema where one is declared",
    )
    check.add_argument(
        "--skip-environment",
        action="store_true",
        help="check the file only, not the environment variables and files it names: for a "
        "config written for another machine (e.g. a pod's mounted Secrets)",
    )
    check.add_argument(
        "--probe-timeout", type=float, default=5.0, metavar="SECONDS",
        help="how long each probe waits for a backend's answer",
    )  # fmt: skip
    boot = command(
        sub, "envoy-bootstrap",
        "write the bootstrap of an Envoy that takes its config from this gateway (xDS)",
        "Envoy mode (listeners.xds): docs/envoy.md.",
    )  # fmt: skip
    _config_option(boot, "gateway YAML file (listeners.xds set)")
    boot.add_argument(
        "--output", "-o", default="-", metavar="FILE", help="file to write; - for stdout"
    )
    boot.add_argument("--node-id", default="envoy", help="this Envoy's name in the fleet")
    boot.add_argument("--admin", default="127.0.0.1:9901", metavar="HOST:PORT",
                      help="Envoy's own admin address")  # fmt: skip
    boot.add_argument(
        "--xds-address", metavar="HOST:PORT",
        help="where Envoy reaches the control plane; default: listeners.xds",
    )  # fmt: skip
    boot.add_argument(
        "--xds-ca",
        metavar="FILE",
        help="TLS to the control plane (envoy.xds_tls): the CA that signed its certificate",
    )
    boot.add_argument(
        "--xds-cert", metavar="FILE", help="this Envoy's client certificate (mTLS), PEM"
    )
    boot.add_argument("--xds-key", metavar="FILE", help="the key of --xds-cert, PEM")
    boot.add_argument(
        "--xds-server-name",
        metavar="NAME",
        help="the name the control plane's certificate must carry (SAN; SNI for a DNS name); "
        "default: the host of the xDS address",
    )
    drift = command(
        sub, "drift", "drift monitoring: write a reference (baseline)",
        "Input and prediction drift (RoutePolicy.drift): docs/observability.md.",
    )  # fmt: skip
    drift_sub = drift.add_subparsers(dest="drift_command", required=True, metavar="COMMAND")
    base = command(
        drift_sub, "baseline",
        "write a drift reference file (RoutePolicy.drift.reference_file) from a sample",
    )  # fmt: skip
    _config_option(base)
    base.add_argument("--model", required=True, help="the route whose drift policy applies")
    base.add_argument("--sample", required=True, metavar="FILE",
                      help="newline-delimited JSON ModelInferRequests")  # fmt: skip
    base.add_argument(
        "--gateway", metavar="HOST:PORT",
        help="a gateway serving the model (for output features)",
    )  # fmt: skip
    base.add_argument("--limit", type=int, default=10_000, help="requests read at most")
    base.add_argument(
        "--output", "-o", required=True, metavar="FILE", help="reference file to write"
    )
    from gateway.controlplane import smoke

    smoke.add_parser(sub, command)
    from gateway.controlplane.admin import cli as admin_cli

    admin_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "admin":
        from gateway.controlplane.admin import cli as admin_cli

        return admin_cli.run(args)

    if args.command == "check-config":
        return _check_config(parser, args)

    if args.command == "drift":
        return _drift_baseline(args)

    if args.command == "smoke":
        from gateway.controlplane import smoke

        return smoke.main(args)

    if args.command == "envoy-bootstrap":
        return _envoy_bootstrap(args)

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_file(args.config, environment=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    from gateway.app import serve as run

    state_dir = str(pathlib.Path(args.config).resolve().parent / ".tensorgate-state")
    if args.workers > 1:
        return supervise(config, state_dir, workers=args.workers, log_level=args.log_level)
    try:
        asyncio.run(run(config, state_dir, source=args.config))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"tensorgate: {err}", file=sys.stderr)
        return 1
    return 0


def _check_config(parser: argparse.ArgumentParser, args) -> int:
    if bool(args.file) == bool(args.config):
        parser.error("check-config: name the config file once: check-config FILE or -c FILE")
    path = args.file or args.config
    try:
        config = load_file(path, environment=not args.skip_environment)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    variants = sum(len(r.variants) for r in config.routes)
    print(
        f"{path}: OK ({len(config.backends)} backends, {len(config.routes)} routes, "
        f"{variants} variants)"
    )
    if config.listeners.xds != "off":
        _print_paths(config)
    if not args.probe:
        return 0
    from gateway.controlplane.probe import probe

    problems, fine = asyncio.run(probe(config, args.probe_timeout))
    for line in fine:
        print(f"  probe: {line}")
    if problems:
        print(ConfigError(f"{path} (--probe)", problems), file=sys.stderr)
        return 1
    print(f"{path}: probe OK (every routed model and version answers ready)")
    return 0


def _print_paths(config) -> None:
    """Envoy mode: which data plane answers each route, and why (gRPC, and REST with
    envoy.rest_listen)."""
    from gateway.controlplane.envoy.decide import decide, decide_rest

    print(f"Envoy mode: xDS on {config.listeners.xds}, Envoys listen on {config.envoy.listen}")
    _print_decisions(decide(config))
    rest = decide_rest(config)
    if rest:
        print(
            f"Envoy REST: Envoys listen on {config.envoy.rest_listen}, hand the rest to "
            f"{config.envoy.gateway_rest_address}"
        )
        _print_decisions(rest)


def _print_decisions(decisions) -> None:
    for decision in decisions:
        where = "envoy  " if decision.path == "envoy" else "gateway"
        print(f"  {where} {decision.model}")
        for reason in decision.reasons:
            print(f"            - {reason}")


def _envoy_bootstrap(args) -> int:
    from gateway.controlplane.envoy.bootstrap import bootstrap, render

    try:
        config = load_file(args.config)
        text = render(
            bootstrap(
                config,
                node_id=args.node_id,
                admin=args.admin,
                xds_address=args.xds_address,
                xds_ca=args.xds_ca,
                xds_cert=args.xds_cert,
                xds_key=args.xds_key,
                xds_server_name=args.xds_server_name,
            )
        )
    except (ConfigError, ValueError) as err:
        print(err, file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _drift_baseline(args) -> int:
    import json

    from gateway.dataplane.layers.drift import monitor as drift

    try:
        config = load_file(args.config)
        reference = drift.baseline(config, args.model, args.sample, args.gateway, args.limit)
    except (ConfigError, ValueError, OSError) as err:
        print(f"drift baseline: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # e.g. the gateway refused a sample request
        print(f"drift baseline: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(reference, f)
    counts = ", ".join(f"{k} ({len(v)})" for k, v in reference["features"].items())
    print(f"{args.output}: {reference['samples']} requests; features: {counts}")
    return 0
