"""`tensorgate smoke`: run the config's smoke examples (Route.smoke, Variant.smoke) against a
live gateway over its data plane, each variant on its own, and say what differed.

A variant is reached the way any caller can reach it, never by a back door: its public version
when no other variant shares it (`model_version`), else a sticky route key (the route-key
header) that the gateway's own consistent hashing sends to it, computed with the gateway's
routing code over the config's weights. The `x-tensorgate-variant` trailer confirms who
answered. When the key lands elsewhere (Envoy mode hashes route keys its own way) a few other
keys are tried; an answer from another variant still (the live weights differ from the file's,
or health checks moved the call) fails the example. A variant no caller can single out (weight
0 and no version of its own) is skipped with the reason: a rollout runs its examples inside the
gateway whatever its weight (gateway/controlplane/admin/rollout_smoke.py).

Exit status: 0 every example run passed, 1 one failed (or the config or the selection is wrong,
or nothing could be run), 2 the gateway could not be reached (argparse usage errors are 2 as
well). docs/smoke.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2_grpc

from gateway.controlplane.config import ConfigError, load_file
from gateway.controlplane.smoke_examples import (
    Verdict,
    budget,
    examples_for,
    judge,
    latency_problem,
    request,
)
from tensorgate.config.v1 import config_pb2

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2
DEFAULT_TIMEOUT = 10.0
TOKEN_ENV = "TENSORGATE_SMOKE_TOKEN"
VARIANT_TRAILER = "x-tensorgate-variant"  # gateway/dataplane/routing.py: who answered
_KEY_TRIES = 4096  # route keys tried per variant; a 1% share is found with p > 0.99999
_PROBES = 32  # keys sent when the computed one lands elsewhere (Envoy mode's own hashing)


class SelectionError(Exception):
    """--route / --variant name nothing in the config, or what they name declares no examples."""


@dataclass(frozen=True)
class Reach:
    version: str  # model_version to send ("" unpinned)
    key: str | None  # route key to send, if one is needed
    how: str  # in words, for the report


def reach(route: config_pb2.Route, name: str, defaults: config_pb2.RoutePolicy) -> Reach | str:
    """How a caller sends a call that only variant `name` answers, or why none can."""
    from gateway.dataplane.routing import RouteTable  # the gateway's own choice, not a copy

    plan = RouteTable([route], defaults).plan(route.model)
    target = plan.variant(name)
    groups = []
    if target.version:
        group = plan.candidates(target.version)
        # A pinned version's weights apply among its variants; when all are 0 each counts 1.
        if target.weight > 0 or not any(t.weight for t in group):
            groups.append((target.version, group))
    if target.weight > 0:
        groups.append(("", plan.candidates("")))
    for version, group in groups:
        how = f"version {version}" if version else "unpinned"
        if len([t for t in group if t.weight > 0] or group) == 1:
            return Reach(version, None, how)
        for i in range(_KEY_TRIES):
            key = f"smoke-{name}-{i}"
            if plan.resolve(version, key).variant == name:
                return Reach(version, key, f"{how}, route key {key}")
    if target.version:
        sharing = [t.variant for t in plan.candidates(target.version) if t.weight > 0]
        why = (
            f"its version {target.version!r} is shared with {', '.join(sharing)} (weight > 0), "
            "which get every call pinned to it"
        )
    else:
        why = "it has no public version of its own"
    return (
        f"cannot be reached alone: weight 0 (no unpinned calls) and {why}; give it a version of "
        "its own to smoke-test it from outside (a rollout runs its examples inside the gateway "
        "whatever its weight)"
    )


def selected(config, route_name: str | None, variant_name: str | None):
    """(route, variant) pairs to run, in config order."""
    routes = [r for r in config.routes if route_name in (None, r.model)]
    if not routes:
        known = ", ".join(r.model for r in config.routes)
        raise SelectionError(f"no route {route_name!r} in the config (routes: {known})")
    pairs = [(r, v) for r in routes for v in r.variants if variant_name in (None, v.name)]
    if not pairs:
        where = f"route {route_name!r}" if route_name else "any route"
        raise SelectionError(f"no variant {variant_name!r} in {where}")
    if not any(examples_for(r, v) for r, v in pairs):
        raise SelectionError(
            "no smoke examples declared for what was selected: add `smoke` to the route or the "
            "variant (docs/smoke.md)"
        )
    return [(r, v) for r, v in pairs if examples_for(r, v)]


def _trailer(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Runner:
    """Sends examples over one channel, with the caller's metadata and deadline."""

    def __init__(self, channel: grpc.Channel, metadata, timeout: float, header: str) -> None:
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._metadata = tuple(metadata)
        self._timeout = timeout
        self._route_key_header = header

    def _send(self, message, key: str | None):
        """(response or None, error or None, the variant that answered or None, seconds)."""
        metadata = self._metadata
        if key is not None:
            metadata += ((self._route_key_header, key),)
        started = time.perf_counter()
        try:
            response, call = self._stub.ModelInfer.with_call(
                message, metadata=metadata, timeout=self._timeout
            )
        except grpc.RpcError as err:
            answered = _trailer(err.trailing_metadata(), VARIANT_TRAILER)
            return None, err, answered, time.perf_counter() - started
        answered = _trailer(call.trailing_metadata(), VARIANT_TRAILER)
        return response, None, answered, time.perf_counter() - started

    def run(self, route, variant, example, way: Reach) -> Verdict:
        verdict = Verdict(route.model, variant.name, example.name, budget_s=budget(example))
        verdict.reached = way.how
        message = request(route.model, way.version, example)
        keys = [way.key]
        if way.key is not None:
            # Envoy mode hashes route keys its own way: other keys are tried until one lands.
            keys += [f"smoke-{variant.name}-probe-{i}" for i in range(_PROBES)]
        for key in keys:
            response, err, answered, verdict.latency_s = self._send(message, key)
            if answered in (None, variant.name):
                break
        if key != way.key:
            verdict.reached = f"version {way.version}, " if way.version else "unpinned, "
            verdict.reached += f"route key {key} (found by trying {keys.index(key) + 1} keys)"
        if answered is not None and answered != variant.name:
            tried = f" (with {len(keys)} route keys)" if len(keys) > 1 else ""
            verdict.problems.append(
                f"answered by variant {answered!r}, not {variant.name!r}{tried}: the live route "
                "table differs from the config's (weights, versions), or health checks moved "
                "the call"
            )
            return verdict
        if answered is None:
            verdict.reached += " (not confirmed: no x-tensorgate-variant trailer)"
        if err is not None:
            verdict.problems.append(f"{err.code().name}: {_one_line(err.details())}")
            return verdict
        verdict.problems.extend(judge(example, response))
        slow = latency_problem(example, verdict.latency_s)
        if slow:
            verdict.problems.append(slow)
        return verdict


def run_all(config, pairs, runner: Runner, asked_variant: bool) -> list[tuple[str, Verdict]]:
    """(status, verdict) per example: status pass, fail or skip."""
    results = []
    for route, variant in pairs:
        way = reach(route, variant.name, config.defaults.route_policy)
        for example in examples_for(route, variant):
            if isinstance(way, str):
                verdict = Verdict(route.model, variant.name, example.name, [way])
                verdict.budget_s = budget(example)
                # Skipped unless this variant was asked for by name: then it is a failure.
                results.append(("fail" if asked_variant else "skip", verdict))
                continue
            verdict = runner.run(route, variant, example, way)
            results.append(("pass" if verdict.passed else "fail", verdict))
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _counts(results) -> dict[str, int]:
    return {s: sum(1 for status, _ in results if status == s) for s in ("pass", "fail", "skip")}


def report(results, target: str, source: str) -> str:
    counts = _counts(results)
    lines = [f"smoke: {len(results)} example(s) against {target} (from {source})"]
    rows = [("RESULT", "ROUTE/VARIANT", "EXAMPLE", "LATENCY", "BUDGET", "REACHED BY")]
    for status, v in results:
        budget_text = "-" if v.budget_s is None else f"{v.budget_s * 1000:g} ms"
        reached = v.reached or "-"
        rows.append((status.upper(), f"{v.route}/{v.variant}", v.example, _ms(v.latency_s),
                     budget_text, reached))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    by_row = iter(results)
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n:
            _, verdict = next(by_row)
            lines.extend(f"      {problem}" for problem in verdict.problems)
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return "\n".join(lines)


def exit_code(results) -> int:
    statuses = [s for s, _ in results]
    if "fail" in statuses or "pass" not in statuses:
        return EXIT_FAILED
    return EXIT_PASSED


def default_target(config) -> str:
    """The config's data plane as a client on this host reaches it."""
    host, _, port = config.listeners.data_plane.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel(args, target: str) -> grpc.Channel:
    if args.ca or args.cert:
        creds = grpc.ssl_channel_credentials(_read(args.ca), _read(args.key), _read(args.cert))
        return grpc.secure_channel(target, creds)
    return grpc.insecure_channel(target)


def metadata(args) -> list[tuple[str, str]]:
    """--header values and the bearer token from --token-env; ValueError for a bad header."""
    found = []
    for header in args.header or ():
        key, sep, value = header.partition(":")
        key = key.strip().lower()
        if not sep or not key or key.endswith("-bin"):
            raise ValueError(f"--header {header.split(':')[0]!r}...: write it as 'name: value'")
        found.append((key, value.strip()))
    token = os.environ.get(args.token_env, "")
    if token:
        found.append(("authorization", f"Bearer {token}"))
    return found


def _fail(text: str, code: int) -> int:
    print(f"smoke: {text}", file=sys.stderr)
    return code


def main(args) -> int:
    try:
        config = load_file(args.config)
        pairs = selected(config, args.route, args.variant)
        headers = metadata(args)
    except ConfigError as err:
        return _fail(str(err), EXIT_FAILED)
    except (SelectionError, ValueError) as err:
        return _fail(str(err), EXIT_FAILED)
    target = args.target or default_target(config)
    try:
        with channel(args, target) as chan:
            try:
                grpc.channel_ready_future(chan).result(timeout=args.timeout)
            except grpc.FutureTimeoutError:
                tls = " (TLS: check --ca, --cert, --key)" if args.ca or args.cert else ""
                return _fail(
                    f"nothing answered at {target} within {args.timeout:g} s{tls}: is the "
                    "gateway running there? (--target HOST:PORT)",
                    EXIT_UNREACHABLE,
                )
            runner = Runner(chan, headers, args.timeout, config.defaults.route_key_header)
            results = run_all(config, pairs, runner, asked_variant=args.variant is not None)
    except OSError as err:  # --ca / --cert / --key unreadable
        return _fail(_one_line(err), EXIT_FAILED)
    code = exit_code(results)
    if args.json:
        counts = _counts(results)
        body = {
            "target": target,
            "config": args.config,
            "passed": counts["pass"],
            "failed": counts["fail"],
            "skipped": counts["skip"],
            "exit_code": code,
            "results": [{"status": s, **v.as_dict()} for s, v in results],
        }
        print(json.dumps(body, indent=2))
    else:
        print(report(results, target, args.config))
    if not any(status != "skip" for status, _ in results):
        print(
            "smoke: nothing ran: every selected variant was skipped (see why above)",
            file=sys.stderr,
        )
    return code


def add_parser(sub, command) -> None:
    parser = command(
        sub, "smoke", "run the config's smoke examples against a live gateway",
        "Sends each example of Route.smoke and Variant.smoke to every variant on its own\n"
        "(pinned by its public version, or by a sticky route key the gateway's hashing sends\n"
        "to it) and compares the answers: expected outputs within a tolerance, checks of\n"
        "datatype, shape, range and argmax, a latency budget (docs/smoke.md).\n\n"
        "Exit status: 0 every example run passed, 1 one failed (or nothing could be run, or\n"
        "the config or the selection is wrong), 2 the gateway could not be reached.",
    )  # fmt: skip
    parser.add_argument("--config", "-c", required=True, metavar="FILE",
                        help="gateway YAML file declaring the examples")  # fmt: skip
    parser.add_argument("--route", metavar="MODEL", help="only this route (public model name)")
    parser.add_argument("--variant", metavar="NAME",
                        help="only variants of this name (a variant no caller can single out "
                        "then fails instead of being skipped)")  # fmt: skip
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="the gateway's data plane; default: the config's "
                        "listeners.data_plane")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="deadline of each call, and of connecting")  # fmt: skip
    parser.add_argument("--header", "-H", action="append", metavar="'NAME: VALUE'",
                        help="metadata sent with every call (repeatable)")  # fmt: skip
    parser.add_argument("--token-env", default=TOKEN_ENV, metavar="VARIABLE",
                        help="environment variable holding a bearer token (callers.jwt), sent "
                        "as authorization: Bearer; unset or empty: none")  # fmt: skip
    parser.add_argument("--ca", metavar="FILE", help="PEM CA to verify the data plane (TLS)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate (mTLS), PEM")
    parser.add_argument("--key", metavar="FILE", help="client key (mTLS), PEM")
