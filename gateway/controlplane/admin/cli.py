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

from gateway.controlplane.admin import outcome
from gateway.controlplane.admin.auth import TOKEN_ENV, bearer_token
from gateway.controlplane.admin.cliprint import (
    print_access,
    print_apply,
    print_backends,
    print_drained,
    print_json,
    print_revision,
    print_revisions,
    print_rollout,
    print_routes,
    progress,
)
from gateway.helptext import command
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
        help="deadline of every RPC (each poll of --watch), in seconds",
    )


DEFAULT_ADDRESS = "127.0.0.1:8002"


def add_parser(sub) -> None:
    admin = command(
        sub, "admin", "operate a running gateway through its admin API",
        "The admin API is off unless the gateway's config sets listeners.admin (docs/admin.md).\n"
        f"The bearer token is read from ${TOKEN_ENV} (or the variable --token-env names),\n"
        "never from the command line: a bare token, or the server's name:role:token form.\n\n"
        "Exit status: 0 done, 1 the call failed (RPC error or timeout) or a change was not\n"
        "applied, 2 usage; rollout --watch: 0 promoted, 3 rolled back, 4 aborted; 5 a change\n"
        "whose outcome is still unknown (the store did not answer); 130 interrupted.",
    )  # fmt: skip
    admin.add_argument(
        "--address", metavar="HOST:PORT",
        default=os.environ.get("TENSORGATE_ADMIN_ADDRESS", DEFAULT_ADDRESS),
        help="the gateway's admin listener (listeners.admin); $TENSORGATE_ADMIN_ADDRESS "
        f"overrides the default, default: {DEFAULT_ADDRESS}",
    )  # fmt: skip
    admin.add_argument(
        "--token-env", default=TOKEN_ENV, metavar="VARIABLE",
        help="environment variable holding the bearer token",
    )  # fmt: skip
    admin.add_argument("--ca", metavar="FILE", help="PEM CA to verify the admin server (TLS)")
    admin.add_argument("--cert", metavar="FILE", help="client certificate (mTLS), PEM")
    admin.add_argument("--key", metavar="FILE", help="client key (mTLS), PEM")
    _output_options(admin, lambda value: value)
    common = argparse.ArgumentParser(add_help=False)
    _output_options(common, lambda value: argparse.SUPPRESS)
    cmd = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")

    def read(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        return command(cmd, name, summary, description, parents=[common])

    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument(
        "--resolve-wait",
        type=float,
        default=DEFAULT_RESOLVE_WAIT,
        metavar="SECONDS",
        help="when the store did not answer the write (outcome unknown): how long to wait for "
        "it to answer a read, to say whether the change was applied; 0: do not wait",
    )

    def change(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        return command(cmd, name, summary, description, parents=[common, writes])

    expect = {
        "type": int, "default": 0, "metavar": "N",
        "help": "apply only if N is the live revision (else FAILED_PRECONDITION); 0: whatever "
        "is live",
    }  # fmt: skip
    read("routes", "the live route table, its revision, each weight and its share of calls")
    read("access", "who may call which model (authorization rules) and how much (rate limits)")
    weights = change(
        "set-weights", "set variant weights of a route",
        "Weights are relative: each variant gets weight / (sum of the route's weights) of the\n"
        "unpinned calls, e.g. stable=90 canary=10 is 90%/10%, stable=90 canary=100 is 47%/53%.\n"
        "Variants not named keep their weight.",
    )  # fmt: skip
    weights.add_argument("model", help="the route (public model name)")
    weights.add_argument("weights", nargs="+", metavar="VARIANT=WEIGHT",
                         help="whole numbers >= 0")  # fmt: skip
    weights.add_argument("--expect", **expect)
    shadow = change(
        "shadow", "mirror a fraction of a route's calls to a variant (or --off)",
        "The mirrored calls' answers are compared with the primary's, never returned.",
    )  # fmt: skip
    shadow.add_argument("model", help="the route (public model name)")
    shadow.add_argument("variant", nargs="?", default="", help="the variant that gets copies")
    shadow.add_argument("fraction", nargs="?", type=float, default=0.0,
                        help="share of calls mirrored, 0 to 1")  # fmt: skip
    shadow.add_argument("--off", action="store_true", help="stop mirroring")
    revisions = read("revisions", "stored revisions of the route table, newest first")
    revisions.add_argument("--limit", type=int, default=20, help="revisions shown at most")
    rollback = change("rollback", "make an earlier revision's route table live again",
                      "It becomes a new revision; the history is kept.")  # fmt: skip
    rollback.add_argument("revision", type=int, help="the revision to restore (see revisions)")
    apply = change(
        "apply", "make a config file's route table the next revision (kubectl apply)",
        "Routes and variants added, removed and changed at once, validated like any change,\n"
        "audited with the diff. Nothing else of the file (listeners, backends) changes: those\n"
        "need a restart. A file whose routes are the live ones makes no revision.",
    )  # fmt: skip
    apply.add_argument("-f", "--file", required=True, metavar="FILE",
                       help="gateway YAML file (its routes are applied)")  # fmt: skip
    apply.add_argument("--expect", **expect)
    apply.add_argument("--dry-run", action="store_true",
                       help="validate and show the diff; change nothing")  # fmt: skip
    rollout = read(
        "rollout", "progressive canary: start | status | abort",
        "start MODEL CANARY BASELINE moves the canary through --steps, holding each at least\n"
        "--min-step seconds and until the canary answered --min-requests calls, comparing it\n"
        "with the baseline; a worse canary is rolled back by itself (docs/admin.md).",
    )  # fmt: skip
    rollout.add_argument("action", choices=["start", "status", "abort"], help="what to do")
    rollout.add_argument("model", help="the route (public model name)")
    rollout.add_argument("canary", nargs="?", help="start: the variant rolled out")
    rollout.add_argument("baseline", nargs="?", help="start: the variant it is compared with")
    rollout.add_argument("--steps", default="5,25,50,100", metavar="P,P,...",
                         help="canary traffic percentages, increasing, ending at 100")  # fmt: skip
    rollout.add_argument("--min-step", type=float, default=30.0, metavar="SECONDS",
                         help="how long each step lasts at least")  # fmt: skip
    rollout.add_argument("--min-requests", type=int, default=100, metavar="N",
                         help="canary calls each step needs before it is judged")  # fmt: skip
    rollout.add_argument(
        "--max-error-ratio-factor", type=float, default=0.0, metavar="F",
        help="roll back above the baseline's error ratio times F; 0: the gateway's default, 2",
    )  # fmt: skip
    rollout.add_argument(
        "--max-p99-factor", type=float, default=0.0, metavar="F",
        help="roll back above the baseline's p99 times F; 0: the gateway's default, 2",
    )  # fmt: skip
    rollout.add_argument("--reason", default="", help="abort: why (kept with the rollout)")
    rollout.add_argument(
        "--watch",
        action="store_true",
        help="follow until it ends, with a progress line; exit 0 promoted, 3 rolled back, "
        "4 aborted",
    )
    read("backends", "health, breaker, in-flight calls and errors per backend and per variant")
    for name, what in (
        ("drain", "stop sending new calls to a backend's variants while a sibling can answer"),
        ("undrain", "send calls to a drained backend again"),
    ):
        drain = read(
            name, what, "Kept in the store: shared by every replica, kept across restarts."
        )
        drain.add_argument("backend", help="the backend's name (see backends)")


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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(args) -> int:
    token = bearer_token(os.environ.get(args.token_env, ""))
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
            problem = (err.details() or "") + _hint(args, err.code(), token)
        print(f"error: {err.code().name}: {_one_line(problem)}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # --ca / --cert / --key unreadable
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _hint(args, code: grpc.StatusCode, token: str) -> str:
    """What to check, for the two answers a first try most often gets."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        sent = f"{len(token)} characters" if token else "unset or empty: no token was sent"
        return f" [this CLI read its token from ${args.token_env}: {sent}]"
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f" [nothing answered at {args.address}: is the gateway running with its admin API "
            "on? It is off unless the config sets listeners.admin (and admin.tokens_env); "
            "--address or $TENSORGATE_ADMIN_ADDRESS name another]"
        )
    return ""


class _Calls:
    """The stub's methods with the caller's credentials and deadline on every call."""

    def __init__(self, stub, metadata, timeout: float) -> None:
        self._stub = stub
        self._metadata = metadata
        self._timeout = timeout

    def __getattr__(self, method: str):
        call = getattr(self._stub, method)
        return lambda request: call(request, metadata=self._metadata, timeout=self._timeout)


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
        reply, text = calls.GetRouteTable(admin_pb2.GetRouteTableRequest()), print_routes
    elif c == "access":
        reply, text = calls.GetRouteTable(admin_pb2.GetRouteTableRequest()), print_access
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
        reply, text = calls.SetVariantWeights(request), print_revision
    elif c == "shadow":
        shadow = {} if args.off else {"variant": args.variant, "fraction": args.fraction}
        request = admin_pb2.SetShadowRequest(model=args.model, shadow=shadow)
        reply, text = calls.SetShadow(request), print_revision
    elif c == "revisions":
        request = admin_pb2.ListRevisionsRequest(limit=args.limit)
        reply, text = calls.ListRevisions(request), print_revisions
    elif c == "rollback":
        request = admin_pb2.RollbackRequest(to_revision=args.revision)
        reply, text = calls.Rollback(request), print_revision
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
        text = lambda reply: print_rollout(reply.rollout)  # noqa: E731
    elif c == "apply":
        from gateway.controlplane.config import ConfigError, load_file

        try:
            routes = list(load_file(args.file).routes)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return EXIT_FAILED
        request = admin_pb2.ApplyRouteTableRequest(
            routes=routes, expected_revision=args.expect, dry_run=args.dry_run, source=args.file
        )
        reply, text = calls.ApplyRouteTable(request), print_apply
    elif c == "backends":
        reply, text = calls.GetBackendStatus(admin_pb2.GetBackendStatusRequest()), print_backends
    elif c == "drain":
        request = admin_pb2.DrainBackendRequest(backend=args.backend)
        reply, text = calls.DrainBackend(request), print_drained
        _warn_undrainable(calls, reply.drained)
    elif c == "undrain":
        request = admin_pb2.UndrainBackendRequest(backend=args.backend)
        reply, text = calls.UndrainBackend(request), print_drained
    else:  # argparse only lets the commands above through
        raise AssertionError(c)
    watch = c == "rollout" and args.watch
    if args.json:
        print_json(reply, one_line=watch)
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


def _warn_undrainable(calls: _Calls, drained) -> None:
    """A drain moves calls only to a sibling variant: say which routes have none left."""
    drained = set(drained)
    routes = calls.GetRouteTable(admin_pb2.GetRouteTableRequest()).routes
    for route in routes:
        if all(v.backend in drained for v in route.variants):
            print(
                f"warning: route {route.model!r} has no variant on an undrained backend: its "
                "calls still go to the drained backend(s) "
                f"({', '.join(sorted({v.backend for v in route.variants}))}), as a drain only "
                "moves calls to a sibling that can answer",
                file=sys.stderr,
            )


def _watch(args, calls: _Calls, rollout) -> int:
    """Polls GetRollout until the rollout ends; its outcome is the exit status. Text: one
    progress line, rewritten in place on a terminal; the full status again when a step ends."""
    last_step = (rollout.step, len(rollout.analyses))
    tty = sys.stdout.isatty()
    while rollout.state == admin_pb2.Rollout.STATE_RUNNING:
        if not args.json:
            line = progress(rollout)
            print(f"\r\033[K  {line}" if tty else f"  {line}", end="" if tty else "\n",
                  flush=True)  # fmt: skip
        time.sleep(WATCH_INTERVAL)
        reply = calls.GetRollout(admin_pb2.GetRolloutRequest(model=args.model))
        rollout = reply.rollout
        if args.json:
            print_json(reply, one_line=True)
            continue
        step = (rollout.step, len(rollout.analyses))
        if step != last_step or rollout.state != admin_pb2.Rollout.STATE_RUNNING:
            if tty:
                print()
            print_rollout(rollout)
            last_step = step
    if tty and not args.json:
        print()
    return WATCH_EXIT.get(rollout.state, EXIT_FAILED)
