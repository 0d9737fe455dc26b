"""The invariants of a chaos run (bench/chaos.py), as pure functions over what the run recorded.

Each checker takes plain records (no processes, no clocks of its own) and returns a `Verdict`:
whether the invariant held, its figure (what was measured, in one line) and the first problems
found. tests/test_chaos.py feeds each one a hand-made bad history, so every invariant can fail.

Times are `time.monotonic()` seconds of the process that ran the chaos.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Statuses a client may retry: the call did not run, or may be tried again safely.
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
MAX_PROBLEMS = 12


@dataclass
class Verdict:
    name: str
    ok: bool
    figure: str
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.figure}"


def _verdict(name: str, figure: str, problems: list[str]) -> Verdict:
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return Verdict(name, not problems, figure, shown)


# --- 1. history ---------------------------------------------------------------------------------


@dataclass
class Write:
    """One admin write as its client saw it. `outcome`: "ack" (OK answer), "unknown"
    (UNAVAILABLE whose outcome is unknown, or no answer at all), "refused" (an answer saying
    nothing changed). `revision`: the acknowledged revision, or the one an unknown outcome tried
    (tensorgate-unknown-revision-bin), 0 if not known. `key`: what identifies it in the audit
    log (a unique weight)."""

    key: int
    writer: str
    sent: float
    answered: float
    expected: int
    outcome: str
    revision: int = 0
    detail: str = ""


@dataclass
class AuditRecord:
    revision: int
    method: str
    summary: str
    who: str = ""


def write_key(summary: str, model: str = "knob", variant: str = "x") -> int | None:
    """The key of a writer's change in an audit summary ("knob: weights x=17, y=83")."""
    found = re.fullmatch(rf"{model}: weights (.*)", summary)
    if not found:
        return None
    for part in found.group(1).split(", "):
        name, _, value = part.partition("=")
        if name == variant and value.isdigit():
            return int(value)
    return None


def check_history(
    writes: Sequence[Write],
    audit: Sequence[AuditRecord],
    observed: Mapping[str, Sequence[tuple[float, int]]],
    *,
    model: str = "knob",
    min_samples: int = 0,
) -> Verdict:
    """Acknowledged writes: in the audit log exactly once, at the revision acknowledged (the one
    after the expected revision); unknown ones at most once (at the revision they tried);
    refused ones never; nothing else under the writers' route. Revisions contiguous from the
    first kept one. Real-time order: a write acknowledged before another was sent has the lower
    revision. `observed` (at least `min_samples` per process): per process, (time, revision served) in time order: never an older
    revision after a newer one, never a revision the history does not hold."""
    problems: list[str] = []
    revisions = [a.revision for a in audit]
    if revisions != sorted(set(revisions)):
        problems.append(f"audit revisions not strictly increasing: {revisions[:20]}...")
    if revisions and revisions != list(range(revisions[0], revisions[0] + len(revisions))):
        gaps = sorted(set(range(revisions[0], revisions[-1] + 1)) - set(revisions))
        problems.append(f"audit log has gaps at revisions {gaps[:10]}")
    found: dict[int, list[int]] = {}
    for a in audit:
        if a.method == "SetVariantWeights":
            key = write_key(a.summary, model)
            if key is not None:
                found.setdefault(key, []).append(a.revision)
    by_key = {w.key: w for w in writes}
    counts = {"ack": 0, "unknown": 0, "refused": 0}
    landed_unknown = 0
    for w in writes:
        counts[w.outcome] = counts.get(w.outcome, 0) + 1
        at = found.get(w.key, [])
        if w.outcome == "ack":
            if len(at) != 1:
                problems.append(f"acknowledged write {w.key} ({w.writer}, revision {w.revision}) "
                                f"is in the history {len(at)} times: {at}")  # fmt: skip
            elif at[0] != w.revision:
                problems.append(f"acknowledged write {w.key} answered revision {w.revision} but "
                                f"the history has it at {at[0]}")  # fmt: skip
            if w.revision != w.expected + 1:
                problems.append(f"acknowledged write {w.key} expected revision {w.expected} and "
                                f"got {w.revision}, not {w.expected + 1}")  # fmt: skip
        elif w.outcome == "unknown":
            if len(at) > 1:
                problems.append(f"write {w.key} of unknown outcome is in the history "
                                f"{len(at)} times: {at}")  # fmt: skip
            elif at:
                landed_unknown += 1
                if w.revision and at[0] != w.revision:
                    problems.append(f"write {w.key} of unknown outcome tried revision "
                                    f"{w.revision} but landed at {at[0]}")  # fmt: skip
        elif at:
            problems.append(f"refused write {w.key} ({w.detail[:80]}) is in the history at {at}")
    for key, at in found.items():
        if key not in by_key:
            problems.append(f"the history holds a write nobody made: key {key} at {at}")
    acked = sorted((w for w in writes if w.outcome == "ack"), key=lambda w: w.answered)
    by_sent = sorted((w for w in writes if w.outcome == "ack"), key=lambda w: w.sent)
    # real time: for each write, every write acknowledged before it was sent has a lower number
    i, best = 0, None
    for w in by_sent:
        while i < len(acked) and acked[i].answered < w.sent:
            if best is None or acked[i].revision > best.revision:
                best = acked[i]
            i += 1
        if best is not None and best.revision >= w.revision:
            problems.append(f"write {w.key} sent after write {best.key} was acknowledged at "
                            f"revision {best.revision}, yet got revision {w.revision}")  # fmt: skip
    known = set(revisions)
    first_kept = revisions[0] if revisions else 1
    regressions = 0
    samples = 0
    for process, seen in observed.items():
        if len(seen) < min_samples:
            problems.append(f"{process} observed {len(seen)} times, fewer than {min_samples}: "
                            "the observer stopped")  # fmt: skip
        last = None
        for t, rev in seen:
            samples += 1
            if last is not None and rev < last[1]:
                regressions += 1
                problems.append(f"{process} served revision {rev} at {t:.2f} after revision "
                                f"{last[1]} at {last[0]:.2f}")  # fmt: skip
            if rev >= first_kept and rev not in known:
                problems.append(f"{process} served revision {rev}, which is not in the history")
            if last is None or rev >= last[1]:
                last = (t, rev)
    figure = (
        f"{counts['ack']} acknowledged writes each once at its revision, {counts['unknown']} "
        f"unknown ({landed_unknown} landed, each once), {counts['refused']} refused (none in "
        f"the history); {len(audit)} revisions; {samples} served-revision samples of "
        f"{len(observed)} processes, {regressions} regressions"
    )
    return _verdict("history", figure, problems)


# --- 2. calls -----------------------------------------------------------------------------------


@dataclass
class Call:
    entry: str
    route: str
    start: float
    end: float
    code: str
    detail: str = ""  # the error's message, for the report


@dataclass
class Window:
    """`target` (a backend name, or an entry name: a replica or an Envoy) could not answer from
    `start` to `end` (a fault's start to its heal)."""

    target: str
    start: float
    end: float
    fault: str = ""


def _overlaps(windows: Iterable[Window], start: float, end: float, slack: float) -> Window | None:
    for w in windows:
        if w.start <= end and w.end + slack >= start:
            return w
    return None


def _late(windows: Iterable[Window], start: float, end: float, slack: float) -> float:
    """How long after the heal of the latest window it overlaps a call started (0 if during
    one); infinity if it overlaps none."""
    return min((max(0.0, start - w.end) for w in windows
                if w.start <= end and w.end + slack >= start), default=float("inf"))  # fmt: skip


def _all_down(
    windows: Mapping[str, list[Window]], targets: Sequence[str], start: float, end: float,
    slack: float,
) -> bool:  # fmt: skip
    """Some instant of [start, end] at which every target is inside one of its windows."""
    spans = {t: [(w.start, w.end + slack) for w in windows.get(t, [])] for t in targets}
    candidates = [start] + [s for ws in spans.values() for s, _ in ws if start <= s <= end]
    return any(all(any(s <= c <= e for s, e in spans[t]) for t in targets) for c in candidates)


def check_calls(
    calls: Sequence[Call],
    routes: Mapping[str, Sequence[str]],
    fallback: Iterable[str],
    windows: Sequence[Window],
    *,
    slack: float,
) -> Verdict:
    """Routes with a fallback (`fallback`): no failed call while one of their backends is up.
    Other routes: a failed call only while one of their backends is down. Every allowed failure
    has a retryable status. A call to an entry (replica, Envoy) that was down is allowed to fail
    (retryably) whatever its route. `slack`: seconds after a heal still counted as down (breaker
    open time, reconnect backoff, readiness probes)."""
    fallback = set(fallback)
    by_target: dict[str, list[Window]] = {}
    for w in windows:
        by_target.setdefault(w.target, []).append(w)
    problems: list[str] = []
    total: dict[str, int] = {}
    failed: dict[str, int] = {}
    excused_entry = excused_backend = 0
    latest: dict[str, float] = {}  # per entry: its latest excused failure after a heal, s
    for c in calls:
        total[c.route] = total.get(c.route, 0) + 1
        if c.code == "OK":
            continue
        failed[c.route] = failed.get(c.route, 0) + 1
        why = f"{c.code} from {c.entry} on {c.route} at {c.start:.2f}-{c.end:.2f}"
        if c.detail:
            why += f" ({c.detail})"
        if _overlaps(by_target.get(c.entry, []), c.start, c.end, slack):
            excused_entry += 1
            late = _late(by_target[c.entry], c.start, c.end, slack)
            latest[c.entry] = max(latest.get(c.entry, 0.0), late)
            if c.code not in RETRYABLE:
                problems.append(f"{why}: entry down, but the status is not retryable")
            continue
        backends = routes[c.route]
        if c.route in fallback:
            down = _all_down(by_target, backends, c.start, c.end, slack)
        else:
            down = any(_overlaps(by_target.get(b, []), c.start, c.end, slack) for b in backends)
        if not down:
            kind = "a route with a fallback, a backend up" if c.route in fallback else (
                "its backends up")  # fmt: skip
            healed = [w for b in backends for w in by_target.get(b, []) if w.end <= c.start]
            if healed:
                last = max(healed, key=lambda w: w.end)
                kind += f" ({c.start - last.end:.2f} s after {last.fault} of {last.target} healed)"
            problems.append(f"{why}: {kind}")
        elif c.code not in RETRYABLE:
            problems.append(f"{why}: backend down, but the status is not retryable")
        else:
            excused_backend += 1
            late = min(_late(by_target.get(b, []), c.start, c.end, slack) for b in backends)
            latest[c.entry] = max(latest.get(c.entry, 0.0), late)
    per_route = ", ".join(
        f"{r}{' (fallback)' if r in fallback else ''} {failed.get(r, 0)}/{total[r]}"
        for r in sorted(total)
    )
    figure = (
        f"{sum(total.values())} calls; failed/total per route: {per_route}; "
        f"{excused_entry} while their entry was down, {excused_backend} while their backend was "
        f"down (the latest after its fault healed, per entry: "
        f"{', '.join(f'{e} {t:.2f} s' for e, t in sorted(latest.items())) or '-'}; slack "
        f"{slack:g} s), "
        f"{len(problems)} unexplained or not retryable"
    )
    return _verdict("calls", figure, problems)


# --- 3. convergence -----------------------------------------------------------------------------


def check_convergence(
    seconds: float | None, bound: float, lagging: Sequence[str] = (), head: int = 0
) -> Verdict:
    """Every replica (each worker) and Envoy serves the latest revision within `bound` seconds
    of the last fault healing. `seconds`: None if they never did; `lagging`: who did not."""
    if seconds is None:
        return _verdict(
            "convergence",
            f"not every process reached revision {head}",
            [f"still behind: {', '.join(lagging)}"],
        )
    problems = [] if seconds <= bound else [f"took {seconds:.2f} s > {bound} s"]
    return _verdict(
        "convergence",
        f"every replica worker and Envoy on revision {head} {seconds:.2f} s after the last heal "
        f"(bound {bound} s)",
        problems,
    )


# --- 4. rollouts --------------------------------------------------------------------------------


@dataclass
class RolloutRun:
    """A rollout the chaos started: its steps, the final state read back ("PROMOTED",
    "ROLLED_BACK", ...), and the states polled meanwhile, in time order."""

    model: str
    canary: str
    baseline: str
    steps: Sequence[int]
    first_revision: int  # the audit log's revisions of this rollout are >= this
    last_revision: int  # ... and < this (the next rollout's first, or infinity)
    final: str
    polled: Sequence[tuple[float, str]] = ()


def check_rollouts(runs: Sequence[RolloutRun], audit: Sequence[AuditRecord]) -> Verdict:
    """Each rollout ends exactly once, as its analysis decided: its steps in the audit log in
    order, each once; promoted: every step and no roll-back; rolled back (a step's analysis
    failed, the last one included): a prefix of its steps, then one roll-back entry, and nothing
    of it after that. Once polled as ended, it never runs again nor ends otherwise."""
    problems: list[str] = []
    outcomes: dict[str, int] = {}
    for i, run in enumerate(runs):
        name = f"rollout {i + 1} ({run.canary} over {run.baseline})"
        outcomes[run.final] = outcomes.get(run.final, 0) + 1
        mine = [a for a in audit
                if a.method == "Rollout" and run.first_revision <= a.revision < run.last_revision
                and a.summary.startswith(f"rollout {run.model}: {run.canary} ")]  # fmt: skip
        step_of = {
            f"rollout {run.model}: {run.canary} {p}%, {run.baseline} {100 - p}%": p
            for p in run.steps
        }
        back = f"rollout {run.model}: {run.canary} rolled back"
        seen: list[int] = []
        backs = 0
        for a in mine:
            if a.summary == back:
                backs += 1
                if backs > 1:
                    problems.append(f"{name}: rolled back again at revision {a.revision}")
            elif a.summary in step_of:
                if backs:
                    problems.append(f"{name}: step '{a.summary}' at revision {a.revision} after "
                                    "its roll-back")  # fmt: skip
                seen.append(step_of[a.summary])
            else:
                problems.append(f"{name}: unexpected entry '{a.summary}'")
        if seen != list(run.steps[: len(seen)]):
            problems.append(f"{name}: steps {seen} are not its steps {list(run.steps)} in order, "
                            "each once")  # fmt: skip
        if run.final == "PROMOTED":
            if seen != list(run.steps) or backs:
                problems.append(f"{name}: promoted, but the history has steps {seen} and "
                                f"{backs} roll-back(s)")  # fmt: skip
        elif run.final == "ROLLED_BACK":
            if backs != 1 and not (backs == 0 and not seen):
                problems.append(f"{name}: rolled back, but the history has {backs} roll-backs "
                                f"after steps {seen}")  # fmt: skip
        else:
            problems.append(f"{name} did not end: {run.final}")
        first_end = None
        for t, state in run.polled:
            if first_end is None:
                if state != "RUNNING":
                    first_end = (t, state)
            elif state != first_end[1]:
                problems.append(f"{name}: polled {first_end[1]} at {first_end[0]:.2f}, then "
                                f"{state} at {t:.2f}")  # fmt: skip
    figure = (
        f"{len(runs)} rollouts: "
        + (", ".join(f"{n} {s.lower()}" for s, n in sorted(outcomes.items())) or "none")
        + "; each ended once"
    )
    return _verdict("rollouts", figure, problems)


# --- 5. resources -------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    process: str  # replica/pid
    rss: int  # bytes
    fds: int


def check_resources(
    samples: Sequence[Sample],
    *,
    rss_bound: int,
    rss_growth: float,
    fd_slack: int,
    streams_left: Mapping[str, float],
    warmup: float,
) -> Verdict:
    """RSS of every gateway process under `rss_bound`, and its last sample at most
    `rss_growth` times its first one after `warmup` seconds of its life; its open file
    descriptors at the end at most `fd_slack` above its first count after warmup; no backend
    call left in flight (`streams_left`: process -> tensorgate_backend_requests_in_flight
    summed, read once the load stopped)."""
    problems: list[str] = []
    by_process: dict[str, list[Sample]] = {}
    for s in samples:
        by_process.setdefault(s.process, []).append(s)
    worst_rss = 0
    worst_growth = 0.0
    worst_fd = 0
    for process, seen in by_process.items():
        seen = sorted(seen, key=lambda s: s.t)
        born = seen[0].t
        settled = [s for s in seen if s.t - born >= warmup] or seen[-1:]
        peak = max(s.rss for s in seen)
        worst_rss = max(worst_rss, peak)
        if peak > rss_bound:
            problems.append(f"{process}: RSS {peak / 2**20:.0f} MiB > {rss_bound / 2**20:.0f} MiB")
        growth = settled[-1].rss / settled[0].rss if settled[0].rss else 1.0
        worst_growth = max(worst_growth, growth)
        if growth > rss_growth:
            problems.append(f"{process}: RSS grew x{growth:.2f} ({settled[0].rss / 2**20:.0f} -> "
                            f"{settled[-1].rss / 2**20:.0f} MiB)")  # fmt: skip
        extra = settled[-1].fds - settled[0].fds
        worst_fd = max(worst_fd, extra)
        if extra > fd_slack:
            problems.append(f"{process}: {settled[0].fds} -> {settled[-1].fds} open file "
                            "descriptors")  # fmt: skip
    for process, left in streams_left.items():
        if left:
            problems.append(f"{process}: {left:g} backend calls still in flight after the load")
    figure = (
        f"{len(by_process)} gateway processes, peak RSS {worst_rss / 2**20:.0f} MiB (bound "
        f"{rss_bound / 2**20:.0f}), worst growth x{worst_growth:.2f} (bound x{rss_growth}), "
        f"worst fd growth {worst_fd:+d} (bound +{fd_slack}), backend calls in flight at the end "
        f"{sum(streams_left.values()):g}"
    )
    return _verdict("resources", figure, problems)
