"""A route change whose outcome the store could not confirm (a timed-out etcd transaction):
the CLI finds out itself, once the store answers again, whether it was applied
(docs/admin.md, "When the answer is UNAVAILABLE")."""

from __future__ import annotations

import json
import sys
import time

import grpc

from tensorgate.admin.v1 import admin_pb2

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNKNOWN = 5  # a route change the store may or may not have applied; still unknown
RESOLVE_INTERVAL = 1.0  # seconds between two ListRevisions while resolving an unknown outcome
# Set by the gateway on such an UNAVAILABLE: the revision it tried to write (admin_pb2.Revision).
UNKNOWN_TRAILER = "tensorgate-unknown-revision-bin"


def attempted(err: grpc.RpcError):
    """The revision a change tried to write when its outcome is unknown, else None."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for key, value in err.trailing_metadata() or ():
        if key == UNKNOWN_TRAILER:
            return admin_pb2.Revision.FromString(value)
    return None


def resolve(args, calls, err: grpc.RpcError, attempted) -> int:
    """The store did not answer the write: it may have been applied, or be applied when the
    store recovers. Once the store answers ListRevisions again (the etcd store fences it with a
    write first, so every write etcd accepted before is in its answer or gone), say which:
    exit 0 "applied as revision N", 1 "not applied", 5 still unknown after --resolve-wait."""
    number = attempted.number
    print(f"error: {err.code().name}: {' '.join(err.details().split())}", file=sys.stderr)
    wait = getattr(args, "resolve_wait", 0.0)
    if wait > 0:
        print(
            f"waiting up to {wait:g} s (--resolve-wait) for the store to answer, to find out "
            f"whether revision {number} was applied",
            file=sys.stderr,
            flush=True,
        )
    deadline = time.monotonic() + wait
    revisions = None
    while revisions is None:
        try:
            revisions = calls.ListRevisions(admin_pb2.ListRevisionsRequest(limit=100)).revisions
        except grpc.RpcError as again:
            if again.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise
            if time.monotonic() + RESOLVE_INTERVAL > deadline:
                break
            time.sleep(RESOLVE_INTERVAL)
    if revisions is None:
        live = number - 1
        return _outcome(
            args, "unknown", number, EXIT_UNKNOWN,
            f"outcome still unknown: the store did not answer within {wait:g} s. Once it does, "
            f"look for revision {number} by {attempted.author} ({attempted.summary!r}) in "
            f"`tensorgate admin revisions`; or retry with --expect {live}: safe, it applies "
            "once or fails with FAILED_PRECONDITION naming the revision that won",
        )  # fmt: skip
    found = next((r for r in revisions if r.number == number), None)
    if found is not None and _same(found, attempted):
        return _outcome(args, "applied", number, EXIT_OK,
                        f"applied as revision {number}: {attempted.summary}")  # fmt: skip
    live = max((r.number for r in revisions), default=0)
    if found is None:
        why = f"the live revision is {live}"
    else:
        why = f"revision {number} is another change ({found.author}: {found.summary})"
    text = f"not applied: {why}; nothing was changed by this call. Re-read and retry"
    return _outcome(args, "not_applied", number, EXIT_FAILED, text)


def _same(stored, attempted) -> bool:
    """The stored revision is the one this call tried (who, what, and when to the ms)."""
    apart = abs(stored.created_at.ToNanoseconds() - attempted.created_at.ToNanoseconds())
    return (stored.author, stored.summary) == (attempted.author, attempted.summary) and (
        apart < 1_000_000
    )


def _outcome(args, outcome: str, number: int, status: int, text: str) -> int:
    if args.json:
        print(json.dumps({"outcome": outcome, "revision": str(number)}), flush=True)
    if status == EXIT_OK:
        if not args.json:
            print(text, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)
    return status
