"""`tensorgate admin ...`: the admin RPCs with readable output. The token is read from an
environment variable (default TENSORGATE_ADMIN_TOKEN), never from the command line, so it does
not end up in shell history or `ps`.

Every command prints its RPC's reply as JSON with `--json`; every RPC has a deadline
(`--timeout`). Exit status: 0 done, 1 the call failed (an RPC error, a timeout, an unreadable
certificate), 2 usage; `rollout ... --watch` says how the rollout ended: 0 promoted,
3 rolled back, 4 aborted; 5 a route change whose outcome is still unknown (the store did not
answer the write, nor a read within --resolve-wait); 130 interrupted (Ctrl-C).
docs/admin.md, "CLI".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc
from google.protobuf import json_format

from gateway.controlplane.admin import outcome
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_TIMEOUT = 10.0
WATCH_INTERVAL = 2.0  # seconds between two GetRollout calls of `rollout --watch`

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ROLLED_BACK = 3
EXIT_ABORTED = 4
EXIT_UNKNOWN = outcome.EXIT_UNKNOWN
DEFAULT_RESOLVE_WAIT = 30.0
# The trailer naming the revision a change tried to write when the store did not answer
# (gateway/controlplane/admin/routes.py OutcomeUnknown).
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

# How `rollout --watch` exits once the rollout has ended.
WATCH_EXIT = {
    admin_pb2.Rollout.STATE_PROMOTED: EXIT_OK,
    admin_pb2.Rollout.STATE_ROLLED_BACK: EXIT_ROLLED_BACK,
    admin_pb2.Rollout.STATE_ABORTED: EXIT_ABORTED,
}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _output_options(parser: argparse.ArgumentParser, default) -> None:
    """--json and --timeout: on `admin` (with their defaults) and again on every command, so they
    may follow the command too (`admin routes --json`); there SUPPRESS keeps `admin`'s value."""
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the RPC reply as JSON (proto field names; one line per reply with --watch)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of every RPC (each poll of --watch), default {DEFAULT_TIMEOUT:g}",
    )


def add_parser(sub) -> None:
    admin = sub.add_parser(
        "admin",
        help="operate a running gateway through its admin API",
        description="Operate a running gateway through its admin API. Exit status: 0 done, "
        "1 the call failed (RPC error or timeout) or a change was not applied, 2 usage; "
        "rollout --watch: 0 promoted, 3 rolled back, 4 aborted; 5 a change whose outcome is "
        "still unknown (the store did not answer); 130 interrupted.",
    )
    admin.add_argument(
        "--address", default=os.environ.get("TENSORGATE_ADMIN_ADDRESS", "127.0.0.1:8002")
    )
    admin.add_argument(
        "--token-env", default="TENSORGATE_ADMIN_TOKEN", help="variable holding the bearer token"
    )
    admin.add_argument("--ca", help="PEM CA to verify the admin server (TLS)")
    admin.add_argument("--cert", help="client certificate (mTLS)")
    admin.add_argument("--key", help="client key (mTLS)")
    _output_options(admin, lambda value: value)
    common = argparse.ArgumentParser(add_help=False)
    _output_options(common, lambda value: argparse.SUPPRESS)
    cmd = admin.add_subparsers(dest="admin_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return cmd.add_parser(name, help=help, parents=[common])

    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument(
        "--resolve-wait",
        type=float,
        default=DEFAULT_RESOLVE_WAIT,
        metavar="SECONDS",
        help="when the store did not answer the write (outcome unknown): how long to wait for "
        f"it to answer a read, to say whether the change was applied (default "
        f"{DEFAULT_RESOLVE_WAIT:g}; 0: do not wait)",
    )

    def change(name: str, help: str) -> argparse.ArgumentParser:
        return cmd.add_parser(name, help=help, parents=[common, writes])

    command("routes", help="the live route table")
    weights = change("set-weights", help="set variant weights: MODEL name=weight ...")
    weights.add_argument("model")
    weights.add_argument("weights", nargs="+")
    weights.add_argument("--expect", type=int, default=0, help="only if this is the live revision")
    shadow = change("shadow", help="mirror FRACTION of MODEL's calls to VARIANT (or --off)")
    shadow.add_argument("model")
    shadow.add_argument("variant", nargs="?", default="")
    shadow.add_argument("fraction", nargs="?", type=float, default=0.0)
    shadow.add_argument("--off", action="store_true")
    revisions = command("revisions", help="stored revisions, newest first")
    revisions.add_argument("--limit", type=int, default=20)
    rollback = change("rollback", help="make revision N live again")
    rollback.add_argument("revision", type=int)
    rollout = command("rollout", help="progressive canary: start | status | abort")
    rollout.add_argument("action", choices=["start", "status", "abort"])
    rollout.add_argument("model")
    rollout.add_argument("canary", nargs="?")
    rollout.add_argument("baseline", nargs="?")
    rollout.add_argument("--steps", default="5,25,50,100")
    rollout.add_argument("--min-step", type=float, default=30.0, help="seconds per step")
    rollout.add_argument("--min-requests", type=int, default=100)
    rollout.add_argument(
        "--max-error-ratio-factor", type=float, default=0.0, help="gateway default: 2"
    )
    rollout.add_argument("--max-p99-factor", type=float, default=0.0, help="gateway default: 2")
    rollout.add_argument("--reason", default="")
    rollout.add_argument(
        "--watch",
        action="store_true",
        help="follow until it ends; exit 0 promoted, 3 rolled back, 4 aborted",
    )
    command("backends", help="health, breaker, in-flight and error ratio per backend")
    for name in ("drain", "undrain"):
        drain = command(name, help=f"{name} a backend")
        drain.add_argument("backend")


def _channel(args) -> grpc.Channel:
    if args.ca or args.cert:

        def read(path):
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
        return grpc.secure_channel(args.address, creds)
    return grpc.insecure_channel(args.address)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _print_json(reply, *, one_line: bool = False) -> None:
    print(
        json_format.MessageToJson(
            reply,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            indent=None if one_line else 2,
        ),
        flush=True,
    )


def _print_rollout(rollout) -> None:
    state = admin_pb2.Rollout.State.Name(rollout.state).removeprefix("STATE_").lower()
    steps = " -> ".join(
        f"[{s}%]" if i == rollout.step and state == "running" else f"{s}%"
        for i, s in enumerate(rollout.steps)
    )
    print(f"{rollout.model}: {rollout.canary} vs {rollout.baseline}: {state}  {steps}")
    for a in rollout.analyses:
        print(
            f"  {a.percent:>3}%  canary {a.canary_requests} calls, "
            f"errors {a.canary_error_ratio:.1%}, p99 {a.canary_p99_seconds * 1000:.1f} ms | "
            f"baseline {a.baseline_requests} calls, errors {a.baseline_error_ratio:.1%}, "
            f"p99 {a.baseline_p99_seconds * 1000:.1f} ms  "
            f"{'pass' if a.passed else 'FAIL'}"
        )
    if rollout.reason:
        print(f"  {rollout.reason}")
    sys.stdout.flush()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(args) -> int:
    token = os.environ.get(args.token_env, "")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        with _channel(args) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            return _dispatch(args, _Calls(stub, metadata, args.timeout))
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            problem = (
                f"no reply from the admin API at {args.address} within {args.timeout:g} s "
                "(--timeout)"
            )
        else:
            problem = err.details() or ""
        print(f"error: {err.code().name}: {_one_line(problem)}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # --ca / --cert / --key unreadable
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class _Calls:
    """The stub's methods with the caller's credentials and deadline on every call."""

    def __init__(self, stub, metadata, timeout: float) -> None:
        self._stub = stub
        self._metadata = metadata
        self._timeout = timeout

    def __getattr__(self, method: str):
        call = getattr(self._stub, method)
        return lambda request: call(request, metadata=self._metadata, timeout=self._timeout)


def _print_revision(reply) -> None:
    print(f"revision {reply.revision.number}: {reply.revision.summary}")


def _print_routes(reply) -> None:
    r = reply.revision
    print(f"revision {r.number} by {r.author}: {r.summary}")
    rows = [["MODEL", "VARIANT", "BACKEND", "BACKEND MODEL", "VERSION", "WEIGHT", "SHARE"]]
    for route in reply.routes:
        total = sum(v.weight for v in route.variants) or 1
        for v in route.variants:
            target = v.backend_model + (f":{v.backend_version}" if v.backend_version else "")
            rows.append(
                [
                    route.model,
                    v.name,
                    v.backend,
                    target,
                    v.version or "-",
                    v.weight,
                    f"{100 * v.weight / total:.0f}%",
                ]
            )
        if route.policy.shadow.variant:
            rows.append(
                [
                    route.model,
                    f"(shadow {route.policy.shadow.variant})",
                    "",
                    "",
                    "",
                    "",
                    f"{route.policy.shadow.fraction:.0%} mirrored",
                ]
            )
    print(_table(rows))


def _print_revisions(reply) -> None:
    rows = [["REVISION", "WHEN (UTC)", "WHO", "WHAT"]]
    for r in reply.revisions:
        rows.append(
            [
                r.number,
                r.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                r.author,
                r.summary,
            ]
        )
    print(_table(rows))


def _print_backends(reply) -> None:
    rows = [["BACKEND", "HEALTHY", "BREAKER", "IN FLIGHT", "DRAINED", "CALLS/1m", "ERRORS"]]
    for b in reply.backends:
        rows.append(
            [
                b.name,
                "yes" if b.healthy else "NO",
                b.breaker_state,
                b.in_flight,
                "yes" if b.drained else "",
                b.recent_requests,
                f"{b.recent_error_ratio:.1%}",
            ]
        )
    print(_table(rows))


def _print_drained(reply) -> None:
    print(f"drained: {', '.join(reply.drained) or 'none'}")


def _dispatch(args, calls: _Calls) -> int:
    """One RPC, its reply printed as JSON (--json) or as text; `rollout --watch` follows. A
    route change the store did not answer is resolved here (`_resolve`)."""
    try:
        return _dispatch_one(args, calls)
    except grpc.RpcError as err:
        attempted = outcome.attempted(err)
        if attempted is None:
            raise
        return outcome.resolve(args, calls, err, attempted)


def _dispatch_one(args, calls: _Calls) -> int:
    c = args.admin_command
    if c == "routes":
        reply, text = calls.GetRouteTable(admin_pb2.GetRouteTableRequest()), _print_routes
    elif c == "set-weights":
        weights = {}
        for item in args.weights:
            name, _, value = item.partition("=")
            if not value.isdigit():
                print(
                    f"error: {item!r} is not name=weight (weights are whole numbers >= 0)",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            weights[name] = int(value)
        request = admin_pb2.SetVariantWeightsRequest(
            model=args.model, weights=weights, expected_revision=args.expect
        )
        reply, text = calls.SetVariantWeights(request), _print_revision
    elif c == "shadow":
        shadow = {} if args.off else {"variant": args.variant, "fraction": args.fraction}
        request = admin_pb2.SetShadowRequest(model=args.model, shadow=shadow)
        reply, text = calls.SetShadow(request), _print_revision
    elif c == "revisions":
        request = admin_pb2.ListRevisionsRequest(limit=args.limit)
        reply, text = calls.ListRevisions(request), _print_revisions
    elif c == "rollback":
        request = admin_pb2.RollbackRequest(to_revision=args.revision)
        reply, text = calls.Rollback(request), _print_revision
    elif c == "rollout":
        if args.action == "start":
            if not (args.canary and args.baseline):
                print("error: rollout start MODEL CANARY BASELINE", file=sys.stderr)
                return EXIT_USAGE
            request = admin_pb2.StartRolloutRequest(
                model=args.model, canary=args.canary, baseline=args.baseline,
                steps=[int(s) for s in args.steps.split(",")], min_requests=args.min_requests,
                max_error_ratio_factor=args.max_error_ratio_factor,
                max_p99_factor=args.max_p99_factor,
            )  # fmt: skip
            request.min_step_duration.FromMilliseconds(int(args.min_step * 1000))
            reply = calls.StartRollout(request)
        elif args.action == "abort":
            reply = calls.AbortRollout(
                admin_pb2.AbortRolloutRequest(model=args.model, reason=args.reason)
            )
        else:
            reply = calls.GetRollout(admin_pb2.GetRolloutRequest(model=args.model))
        text = lambda reply: _print_rollout(reply.rollout)  # noqa: E731
    elif c == "backends":
        reply, text = calls.GetBackendStatus(admin_pb2.GetBackendStatusRequest()), _print_backends
    elif c == "drain":
        request = admin_pb2.DrainBackendRequest(backend=args.backend)
        reply, text = calls.DrainBackend(request), _print_drained
    elif c == "undrain":
        request = admin_pb2.UndrainBackendRequest(backend=args.backend)
        reply, text = calls.UndrainBackend(request), _print_drained
    else:  # argparse only lets the commands above through
        raise AssertionError(c)
    watch = c == "rollout" and args.watch
    if args.json:
        _print_json(reply, one_line=watch)
    else:
        text(reply)
    if not watch:
        return EXIT_OK
    try:
        return _watch(args, calls, reply.rollout)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: stopped watching; the rollout of {args.model} goes on "
            f"(stop it with: tensorgate admin rollout abort {args.model})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _watch(args, calls: _Calls, rollout) -> int:
    """Polls GetRollout until the rollout ends; its outcome is the exit status."""
    while rollout.state == admin_pb2.Rollout.STATE_RUNNING:
        time.sleep(WATCH_INTERVAL)
        reply = calls.GetRollout(admin_pb2.GetRolloutRequest(model=args.model))
        rollout = reply.rollout
        if args.json:
            _print_json(reply, one_line=True)
        else:
            print()
            _print_rollout(rollout)
    return WATCH_EXIT.get(rollout.state, EXIT_FAILED)
