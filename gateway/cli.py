"""`tensorgate` command line: serve, check-config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import sys

from gateway import __version__
from gateway.controlplane.config import ConfigError, load_file
from gateway.workers import MAX_WORKERS, supervise, worker_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tensorgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", required=True, help="gateway YAML file")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="gateway processes sharing the data-plane port (SO_REUSEPORT; balanced per "
        f"connection); 1 to {MAX_WORKERS}, default 1: one process (gateway/workers.py)",
    )
    check = sub.add_parser("check-config", help="validate a gateway YAML file and exit")
    check.add_argument("file")
    boot = sub.add_parser(
        "envoy-bootstrap",
        help="write the bootstrap of an Envoy that takes its config from this gateway (xDS)",
    )
    boot.add_argument("--config", "-c", required=True, help="gateway YAML file (listeners.xds)")
    boot.add_argument("--output", "-o", default="-", help="file to write; - for stdout")
    boot.add_argument("--node-id", default="envoy", help="this Envoy's name in the fleet")
    boot.add_argument("--admin", default="127.0.0.1:9901", help="Envoy's own admin address")
    boot.add_argument("--xds-address", help="where Envoy reaches the control plane")
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
    drift = sub.add_parser("drift", help="drift monitoring: write a reference (baseline)")
    drift_sub = drift.add_subparsers(dest="drift_command", required=True)
    base = drift_sub.add_parser(
        "baseline",
        help="write a drift reference file (RoutePolicy.drift.reference_file) from a sample",
    )
    base.add_argument("--config", "-c", required=True, help="gateway YAML file")
    base.add_argument("--model", required=True, help="the route whose drift policy applies")
    base.add_argument("--sample", required=True, help="newline-delimited JSON ModelInferRequests")
    base.add_argument(
        "--gateway", help="host:port of a gateway serving the model (for output features)"
    )
    base.add_argument("--limit", type=int, default=10_000, help="requests read at most")
    base.add_argument("--output", "-o", required=True, help="reference file to write")
    from gateway.controlplane.admin import cli as admin_cli

    admin_cli.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "admin":
        return admin_cli.run(args)

    if args.command == "check-config":
        try:
            config = load_file(args.file)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{args.file}: OK ({len(config.backends)} backends, {len(config.routes)} routes)")
        if config.listeners.xds != "off":
            _print_paths(config)
        return 0

    if args.command == "drift":
        return _drift_baseline(args)

    if args.command == "envoy-bootstrap":
        return _envoy_bootstrap(args)

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_file(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    from gateway.app import serve as run

    state_dir = str(pathlib.Path(args.config).resolve().parent / ".tensorgate-state")
    if args.workers > 1:
        return supervise(config, state_dir, workers=args.workers, log_level=args.log_level)
    try:
        asyncio.run(run(config, state_dir))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"tensorgate: {err}", file=sys.stderr)
        return 1
    return 0


def _print_paths(config) -> None:
    """Envoy mode: which data plane answers each route, and why."""
    from gateway.controlplane.envoy.decide import decide

    print(f"Envoy mode: xDS on {config.listeners.xds}, Envoys listen on {config.envoy.listen}")
    for decision in decide(config):
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
