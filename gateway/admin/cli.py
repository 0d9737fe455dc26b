"""`tensorgate admin ...`: the admin RPCs with readable output. The token is read from an
environment variable (default TENSORGATE_ADMIN_TOKEN), never from the command line, so it does
not end up in shell history or `ps`."""

from __future__ import annotations

import os
import sys
import time

import grpc
from google.protobuf import json_format

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc


def add_parser(sub) -> None:
    admin = sub.add_parser("admin", help="operate a running gateway through its admin API")
    admin.add_argument(
        "--address", default=os.environ.get("TENSORGATE_ADMIN_ADDRESS", "127.0.0.1:8002")
    )
    admin.add_argument(
        "--token-env", default="TENSORGATE_ADMIN_TOKEN", help="variable holding the bearer token"
    )
    admin.add_argument("--ca", help="PEM CA to verify the admin server (TLS)")
    admin.add_argument("--cert", help="client certificate (mTLS)")
    admin.add_argument("--key", help="client key (mTLS)")
    admin.add_argument("--json", action="store_true", help="print raw JSON replies")
    cmd = admin.add_subparsers(dest="admin_command", required=True)
    cmd.add_parser("routes", help="the live route table")
    weights = cmd.add_parser("set-weights", help="set variant weights: MODEL name=weight ...")
    weights.add_argument("model")
    weights.add_argument("weights", nargs="+")
    weights.add_argument("--expect", type=int, default=0, help="only if this is the live revision")
    shadow = cmd.add_parser("shadow", help="mirror FRACTION of MODEL's calls to VARIANT (or --off)")
    shadow.add_argument("model")
    shadow.add_argument("variant", nargs="?", default="")
    shadow.add_argument("fraction", nargs="?", type=float, default=0.0)
    shadow.add_argument("--off", action="store_true")
    revisions = cmd.add_parser("revisions", help="stored revisions, newest first")
    revisions.add_argument("--limit", type=int, default=20)
    rollback = cmd.add_parser("rollback", help="make revision N live again")
    rollback.add_argument("revision", type=int)
    rollout = cmd.add_parser("rollout", help="progressive canary: start | status | abort")
    rollout.add_argument("action", choices=["start", "status", "abort"])
    rollout.add_argument("model")
    rollout.add_argument("canary", nargs="?")
    rollout.add_argument("baseline", nargs="?")
    rollout.add_argument("--steps", default="5,25,50,100")
    rollout.add_argument("--min-step", type=float, default=30.0, help="seconds per step")
    rollout.add_argument("--min-requests", type=int, default=100)
    rollout.add_argument("--reason", default="")
    rollout.add_argument("--watch", action="store_true", help="follow until it ends")
    cmd.add_parser("backends", help="health, breaker, in-flight and error ratio per backend")
    for name in ("drain", "undrain"):
        drain = cmd.add_parser(name, help=f"{name} a backend")
        drain.add_argument("backend")


def _channel(args) -> grpc.Channel:
    if args.ca or args.cert:
        read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
        return grpc.secure_channel(args.address, creds)
    return grpc.insecure_channel(args.address)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
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


def run(args) -> int:
    token = os.environ.get(args.token_env, "")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with _channel(args) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            return _dispatch(args, stub, metadata)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1


def _dispatch(args, stub, metadata) -> int:
    c = args.admin_command
    show = (lambda reply: print(json_format.MessageToJson(reply))) if args.json else None
    if c == "routes":
        reply = stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=metadata)
        if show:
            show(reply)
            return 0
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
    elif c == "set-weights":
        weights = {}
        for item in args.weights:
            name, _, value = item.partition("=")
            if not value.isdigit():
                print(
                    f"error: {item!r} is not name=weight (weights are whole numbers >= 0)",
                    file=sys.stderr,
                )
                return 2
            weights[name] = int(value)
        reply = stub.SetVariantWeights(
            admin_pb2.SetVariantWeightsRequest(
                model=args.model, weights=weights, expected_revision=args.expect
            ),
            metadata=metadata,
        )
        print(f"revision {reply.revision.number}: {reply.revision.summary}")
    elif c == "shadow":
        shadow = {} if args.off else {"variant": args.variant, "fraction": args.fraction}
        reply = stub.SetShadow(
            admin_pb2.SetShadowRequest(model=args.model, shadow=shadow), metadata=metadata
        )
        print(f"revision {reply.revision.number}: {reply.revision.summary}")
    elif c == "revisions":
        reply = stub.ListRevisions(
            admin_pb2.ListRevisionsRequest(limit=args.limit), metadata=metadata
        )
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
    elif c == "rollback":
        reply = stub.Rollback(
            admin_pb2.RollbackRequest(to_revision=args.revision), metadata=metadata
        )
        print(f"revision {reply.revision.number}: {reply.revision.summary}")
    elif c == "rollout":
        if args.action == "start":
            if not (args.canary and args.baseline):
                print("error: rollout start MODEL CANARY BASELINE", file=sys.stderr)
                return 2
            request = admin_pb2.StartRolloutRequest(
                model=args.model, canary=args.canary, baseline=args.baseline,
                steps=[int(s) for s in args.steps.split(",")], min_requests=args.min_requests,
            )  # fmt: skip
            request.min_step_duration.FromMilliseconds(int(args.min_step * 1000))
            rollout = stub.StartRollout(request, metadata=metadata).rollout
        elif args.action == "abort":
            rollout = stub.AbortRollout(
                admin_pb2.AbortRolloutRequest(model=args.model, reason=args.reason),
                metadata=metadata,
            ).rollout
        else:
            rollout = stub.GetRollout(
                admin_pb2.GetRolloutRequest(model=args.model), metadata=metadata
            ).rollout
        _print_rollout(rollout)
        while args.watch and rollout.state == admin_pb2.Rollout.STATE_RUNNING:
            time.sleep(2)
            rollout = stub.GetRollout(
                admin_pb2.GetRolloutRequest(model=args.model), metadata=metadata
            ).rollout
            print()
            _print_rollout(rollout)
    elif c == "backends":
        reply = stub.GetBackendStatus(admin_pb2.GetBackendStatusRequest(), metadata=metadata)
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
    elif c in ("drain", "undrain"):
        if c == "drain":
            reply = stub.DrainBackend(
                admin_pb2.DrainBackendRequest(backend=args.backend), metadata=metadata
            )
        else:
            reply = stub.UndrainBackend(
                admin_pb2.UndrainBackendRequest(backend=args.backend), metadata=metadata
            )
        print(f"drained: {', '.join(reply.drained) or 'none'}")
    return 0
