"""`tensorgate` command line: serve, check-config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import sys

from gateway import __version__
from gateway.config import ConfigError, load_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tensorgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", required=True, help="gateway YAML file")
    serve.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate a gateway YAML file and exit")
    check.add_argument("file")
    from gateway.admin import cli as admin_cli

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
        return 0

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
    try:
        asyncio.run(run(config, state_dir))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"tensorgate: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
