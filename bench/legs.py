"""What the closed-loop benchmarks share around bench.gateway_vs_direct.measure_leg: the
mirrored leg loop, the figures each leg prints, and starting and stopping their processes.

    with running("stopping the servers and Triton") as fleet:
        fleet.start_backend(triton)
        gateway = fleet.start(GatewayProcess(triton.address, workdir))
        runs, merged = asyncio.run(run_mirrored(args.concurrency, targets, args.rounds, leg))
    exit_codes = fleet.exit_codes
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from bench.loadgen import LoadResult


class Named(Protocol):
    @property
    def name(self) -> str: ...


class Process(Named, Protocol):
    def start(self) -> object: ...

    def stop(self) -> object: ...


T = TypeVar("T", bound=Named)
P = TypeVar("P", bound=Process)
LegFn = Callable[[T, int, int], Awaitable[tuple[dict, LoadResult]]]


def mirrored(targets: Sequence[T], rounds: int) -> list[tuple[int, T]]:
    """(pass, target) for every leg of one level: a, b, c, c, b, a, `rounds` times. A pass is one
    forward or reversed walk; neighbours in it ran close together in time."""
    passes = [list(targets), list(reversed(targets))] * rounds
    return [(index, target) for index, walk in enumerate(passes) for target in walk]


def leg_seconds(args: argparse.Namespace) -> float:
    """Each leg's measured window: --duration per target and level, spread over its legs."""
    return args.duration / (2 * args.rounds)


def leg_kwargs(args: argparse.Namespace, triton: object) -> dict:
    """measure_leg's window options from a parser built with add_load_options."""
    return {
        "duration": leg_seconds(args),
        "warmup": args.warmup,
        "timeout": args.timeout,
        "triton": triton,
    }


async def run_mirrored(
    levels: Sequence[int], targets: Sequence[T], rounds: int, leg: LegFn
) -> tuple[list[dict], dict[tuple[str, int], LoadResult]]:
    """Every level, the targets' legs in mirrored order, so drift in the shared machine's load
    hits every target alike. `leg(target, concurrency, pass)` measures (and prints) one leg.

    Returns the leg records in the order run, and each (target name, level)'s results merged."""
    runs: list[dict] = []
    parts: dict[tuple[str, int], list[LoadResult]] = {}
    for concurrency in levels:
        for pass_index, target in mirrored(targets, rounds):
            record, result = await leg(target, concurrency, pass_index)
            runs.append(record)
            parts.setdefault((target.name, concurrency), []).append(result)
    return runs, {key: LoadResult.merge(results) for key, results in parts.items()}


def print_leg(
    label: str, result: LoadResult, record: dict, *notes: str, rps_width: int = 8
) -> None:
    """One leg's progress line: `label` (level, target), rate, p50, p99, errors, the
    benchmark's own `notes`, and how busy other processes kept the machine meanwhile."""
    print(
        f"  {label} {result.rps:{rps_width}.0f} ok/s  p50 {result.percentile_ms(50):7.3f} ms  "
        f"p99 {result.percentile_ms(99):7.3f} ms  errors {result.error_count}"
        + "".join(f"  {note}" for note in notes)
        + f"  other procs {record['other_cores']:.2f} cores",
        flush=True,
    )


def calls_sent(merged: dict[tuple[str, int], LoadResult], name: str) -> Counter[str]:
    """Every call the load generator made to `name` by status (warm-up apart), plus the answer
    check's one OK: what that gateway's own tensorgate_requests_total must add up to."""
    sent: Counter[str] = Counter({"OK": 1})
    for (target, _), result in merged.items():
        if target == name:
            sent["OK"] += result.ok
            sent.update(result.errors)
            sent["(warm-up, any code)"] += result.warmup_calls
    return sent


def machine_line(machine: dict) -> str:
    """bench.gateway_vs_direct.machine_info in one line."""
    return (
        f"machine: {machine['cpu_model']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable), Python {machine['python']}, "
        f"grpcio {machine['grpcio']}, load avg {' '.join(machine['loadavg_at_start'])}"
    )


def source_line(source: dict) -> str:
    """bench.gateway_vs_direct.source_state in one line."""
    dirty = source["gateway_changes_uncommitted"]
    return f"source: commit {(source['commit'] or 'unknown')[:12]}" + (
        f", uncommitted changes in {', '.join(dirty)}" if dirty else ""
    )


class Fleet:
    """The processes of one run, started through it so that all are stopped on the way out."""

    def __init__(self) -> None:
        self._started: list[tuple[Process, bool]] = []
        self.exit_codes: dict[str, int | None] = {}

    def start(self, server: P) -> P:
        """A server whose exit code after SIGTERM is part of the run's result."""
        self._started.append((server, True))
        server.start()
        return server

    def start_backend(self, backend: P) -> P:
        """Triton or TorchServe: stopped after the servers started later, exit code unread."""
        self._started.append((backend, False))
        backend.start()
        return backend

    def stop(self) -> None:
        """Last started first: a hop goes before the backend behind it. Exit codes are kept in
        start order (the order the runs print them in)."""
        codes: dict[str, int | None] = {}
        for process, keep in reversed(self._started):
            code = process.stop()
            if keep:
                codes[process.name] = code  # type: ignore[assignment]
        self.exit_codes = {p.name: codes[p.name] for p, keep in self._started if keep}


@contextlib.contextmanager
def running(interrupted: str | None = None) -> Iterator[Fleet]:
    """A Fleet that is stopped on the way out, whatever happens. SIGTERM raises
    KeyboardInterrupt (the same teardown as Ctrl-C), and once teardown starts a second SIGTERM
    is ignored so that it cannot leave servers behind. On an interrupt `interrupted` is printed
    (to stderr) before the processes are stopped; the KeyboardInterrupt goes on to the caller."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    fleet = Fleet()
    try:
        yield fleet
    except KeyboardInterrupt:
        if interrupted:
            print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fleet.stop()
