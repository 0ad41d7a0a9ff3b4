"""The drill's report, computed from the canaries' records alone: pure, no I/O.

:func:`build_report` takes what the drill sent and the records the canaries wrote
(:class:`~workerkit.drill.records.CanaryRun`) and counts, per canary: completed exactly once,
completed twice or more (and whether those runs overlapped in time), or never completed (lost).
Runs that found their canary already completed and skipped it (redelivered: an ack lost with a
killed worker) are listed apart, as information. Releases, resumes and the flaky canaries'
failed first attempts are counted per execution. The enqueue -> start latency is given per window
of enqueue time, so a rollout shows up as the windows where it rose.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from workerkit.drill.records import CanaryRun


__all__ = (
    "JSON_VERSION",
    "DrillReport",
    "Duplicate",
    "LatencyWindow",
    "PodSpan",
    "Redelivery",
    "Sent",
    "build_report",
    "percentile",
)

#: The ``version`` of :meth:`DrillReport.to_json`'s shape (bumped on an incompatible change).
JSON_VERSION: Final = 1

#: The latency table's most windows (fewer when the drill was short), and the window widths it
#: picks from (seconds): the smallest that keeps the windows within WINDOWS.
WINDOWS: Final = 15
_WIDTHS: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)

#: How many lost or duplicated canaries the text report names (the JSON has them all).
_NAMED: Final = 10


@dataclass(frozen=True)
class Sent:
    """One canary the drill enqueued."""

    seq: int
    kind: str
    enqueued_at: float


@dataclass(frozen=True)
class Duplicate:
    """A canary that completed more than once."""

    seq: int
    kind: str
    runs: tuple[CanaryRun, ...]
    overlap: bool  # two of its completed runs ran at the same time (on two workers)


@dataclass(frozen=True)
class Redelivery:
    """A run that found its canary already completed and skipped the body: the engine delivered
    it again because the worker that completed it was killed before its acknowledgement."""

    seq: int
    kind: str
    run: CanaryRun  # the redelivered run (outcome ``redelivered``)
    completed_by: CanaryRun | None  # the run that had completed it (None: no record of it)


@dataclass(frozen=True)
class LatencyWindow:
    """Enqueue -> first start of the canaries enqueued in [start, end) s after the drill began."""

    start: float
    end: float
    count: int
    p50: float | None
    p95: float | None
    max: float | None
    not_started: int


@dataclass(frozen=True)
class PodSpan:
    """A worker (``HOSTNAME``) as the records saw it: first start, last record."""

    hostname: str
    first_seen: float
    last_seen: float
    runs: int
    completed: int


@dataclass(frozen=True)
class DrillReport:
    """What the drill found. ``ok``: every canary sent completed exactly once."""

    drill_id: str
    engine: str
    started_at: float
    sent: int
    exactly_once: int
    twice: int
    twice_overlapping: int
    lost: int
    released: int
    resumed: int
    retried: int
    abandoned: int
    by_kind: Mapping[str, Mapping[str, int]]
    lost_seqs: tuple[int, ...]
    duplicates: tuple[Duplicate, ...]
    latency: tuple[LatencyWindow, ...]
    samples: tuple[tuple[float, float], ...]  # (enqueue time - started_at, latency), seconds
    pods: tuple[PodSpan, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)  # rate, duration, mix, ...
    stopped_early: bool = False
    redeliveries: tuple[Redelivery, ...] = ()  # information, not a failure

    @property
    def redelivered(self) -> int:
        return len(self.redeliveries)

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.exactly_once == self.sent and not self.stopped_early

    def to_json(self) -> dict[str, Any]:
        """The report for machines (``--json``); times are seconds after ``started_at``."""
        return {
            "version": JSON_VERSION,
            "drill_id": self.drill_id,
            "engine": self.engine,
            "ok": self.ok,
            "started_at": self.started_at,
            "settings": dict(self.settings),
            "stopped_early": self.stopped_early,
            "counts": {
                "sent": self.sent,
                "exactly_once": self.exactly_once,
                "twice": self.twice,
                "twice_overlapping": self.twice_overlapping,
                "lost": self.lost,
                "released": self.released,
                "resumed": self.resumed,
                "retried": self.retried,
                "abandoned": self.abandoned,
                "redelivered": self.redelivered,
            },
            "by_kind": {kind: dict(counts) for kind, counts in self.by_kind.items()},
            "lost": list(self.lost_seqs),
            "twice": [
                {
                    "seq": dup.seq,
                    "kind": dup.kind,
                    "overlap": dup.overlap,
                    "runs": [
                        {
                            "hostname": run.hostname,
                            "attempt": run.attempt,
                            "started": self._at(run.started_at),
                            "ended": None if run.ended_at is None else self._at(run.ended_at),
                        }
                        for run in dup.runs
                    ],
                }
                for dup in self.duplicates
            ],
            "redelivered": [self._redelivery(r) for r in self.redeliveries],
            "latency": {
                "windows": [
                    {
                        "start": w.start,
                        "end": w.end,
                        "count": w.count,
                        "p50": w.p50,
                        "p95": w.p95,
                        "max": w.max,
                        "not_started": w.not_started,
                    }
                    for w in self.latency
                ],
                "samples": [[round(t, 4), round(lat, 4)] for t, lat in self.samples],
            },
            "pods": [
                {
                    "hostname": pod.hostname,
                    "first_seen": self._at(pod.first_seen),
                    "last_seen": self._at(pod.last_seen),
                    "runs": pod.runs,
                    "completed": pod.completed,
                }
                for pod in self.pods
            ],
        }

    def _redelivery(self, item: Redelivery) -> dict[str, Any]:
        first = item.completed_by
        return {
            "seq": item.seq,
            "kind": item.kind,
            "hostname": item.run.hostname,
            "at": self._at(item.run.started_at),
            "completed_on": None if first is None else first.hostname,
            "completed_at": None
            if first is None or first.ended_at is None
            else self._at(first.ended_at),
        }

    def _at(self, t: float) -> float:
        return round(t - self.started_at, 4)

    def render_text(self) -> str:
        """The report for people."""
        return "\n".join(_render(self))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` (0-100) percentile of ``values`` (nearest rank); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _overlapping(runs: Sequence[CanaryRun]) -> bool:
    spans = sorted((r.started_at, r.ended_at if r.ended_at is not None else math.inf) for r in runs)
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


def build_report(
    *,
    drill_id: str,
    engine: str,
    started_at: float,
    sent: Iterable[Sent],
    runs: Iterable[CanaryRun],
    settings: Mapping[str, Any] | None = None,
    stopped_early: bool = False,
    windows: int = WINDOWS,
) -> DrillReport:
    """Count ``sent`` against the canaries' records ``runs`` (records of other seqs ignored)."""
    sent_by_seq = {item.seq: item for item in sent}
    runs_by_seq: dict[int, list[CanaryRun]] = defaultdict(list)
    for run in runs:
        if run.seq in sent_by_seq and run.drill_id == drill_id:
            runs_by_seq[run.seq].append(run)
    by_kind: dict[str, dict[str, int]] = {}
    lost: list[int] = []
    duplicates: list[Duplicate] = []
    redeliveries: list[Redelivery] = []
    samples: list[tuple[float, float]] = []
    for seq in sorted(sent_by_seq):
        item = sent_by_seq[seq]
        kind = by_kind.setdefault(item.kind, {"sent": 0, "exactly_once": 0, "twice": 0, "lost": 0})
        kind["sent"] += 1
        mine = sorted(runs_by_seq.get(seq, []), key=lambda r: r.started_at)
        completed = [r for r in mine if r.completed]
        redeliveries.extend(
            Redelivery(seq, item.kind, run, _completed_before(completed, run))
            for run in mine
            if run.outcome == "redelivered"
        )
        if len(completed) == 1:
            kind["exactly_once"] += 1
        elif completed:
            kind["twice"] += 1
            duplicates.append(Duplicate(seq, item.kind, tuple(completed), _overlapping(completed)))
        else:
            kind["lost"] += 1
            lost.append(seq)
        if mine:
            samples.append((item.enqueued_at - started_at, mine[0].started_at - item.enqueued_at))
    every = [run for seq_runs in runs_by_seq.values() for run in seq_runs]
    return DrillReport(
        drill_id=drill_id,
        engine=engine,
        started_at=started_at,
        sent=len(sent_by_seq),
        exactly_once=sum(k["exactly_once"] for k in by_kind.values()),
        twice=len(duplicates),
        twice_overlapping=sum(1 for dup in duplicates if dup.overlap),
        lost=len(lost),
        released=sum(1 for run in every if run.released),
        resumed=sum(1 for run in every if run.resumed),
        retried=sum(1 for run in every if run.outcome == "failed"),
        abandoned=sum(1 for run in every if run.outcome in (None, "interrupted", "lease_lost")),
        by_kind={k: by_kind[k] for k in sorted(by_kind, key=_kind_order)},
        lost_seqs=tuple(lost),
        duplicates=tuple(duplicates),
        latency=_windows(
            sent_by_seq.values(), samples, started_at, windows, (settings or {}).get("duration")
        ),
        samples=tuple(samples),
        pods=_pods(every),
        settings=dict(settings or {}),
        stopped_early=stopped_early,
        redeliveries=tuple(redeliveries),
    )


def _completed_before(completed: Sequence[CanaryRun], run: CanaryRun) -> CanaryRun | None:
    """The completed run a redelivered ``run`` found: the last to end before it started."""
    ended = [r for r in completed if r.ended_at is not None and r.ended_at <= run.started_at]
    return max(ended, key=lambda r: r.ended_at or 0.0) if ended else None


def _kind_order(kind: str) -> tuple[int, str]:
    from workerkit.drill.canary import KINDS

    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def _windows(
    sent: Iterable[Sent],
    samples: Sequence[tuple[float, float]],
    started_at: float,
    count: int,
    duration: float | None,
) -> tuple[LatencyWindow, ...]:
    offsets = [item.enqueued_at - started_at for item in sent]
    if not offsets:
        return ()
    # Over the enqueueing's duration (the last batch may be sent a moment after its end).
    span = max(float(duration) if duration else max(offsets), 1e-9)
    width = next((w for w in _WIDTHS if span / w <= count), math.ceil(span / count))
    n = max(1, math.ceil(span / width - 1e-9))
    found: list[list[float]] = [[] for _ in range(n)]
    sent_in = [0] * n
    for offset in offsets:
        sent_in[min(n - 1, int(offset / width))] += 1
    for offset, latency in samples:
        found[min(n - 1, int(offset / width))].append(latency)
    return tuple(
        LatencyWindow(
            start=i * width,
            end=(i + 1) * width,
            count=len(found[i]),
            p50=percentile(found[i], 50),
            p95=percentile(found[i], 95),
            max=max(found[i]) if found[i] else None,
            not_started=sent_in[i] - len(found[i]),
        )
        for i in range(n)
    )


def _pods(runs: Iterable[CanaryRun]) -> tuple[PodSpan, ...]:
    spans: dict[str, list[Any]] = {}
    for run in runs:
        last = run.ended_at if run.ended_at is not None else run.started_at
        span = spans.setdefault(run.hostname, [run.started_at, last, 0, 0])
        span[0], span[1] = min(span[0], run.started_at), max(span[1], last)
        span[2] += 1
        span[3] += int(run.completed)
    return tuple(
        PodSpan(name, first, last, count, done)
        for name, (first, last, count, done) in sorted(spans.items(), key=lambda kv: kv[1][0])
    )


# --- text ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _render(report: DrillReport) -> list[str]:
    s = report.settings
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.started_at))
    mix = ",".join(f"{k}={v}" for k, v in dict(s.get("mix", {})).items())
    lines = [
        f"workerkit drill {report.engine}   id {report.drill_id}   started {when}",
        (
            f"  {s.get('rate', '?')}/s for {s.get('duration', '?')} s, mix {mix or '?'}, "
            f"queues {','.join(s.get('queues', ())) or '?'}"
        ),
        "",
    ]
    rows = (
        ("sent", report.sent, ""),
        ("exactly once", report.exactly_once, f"{_pct(report.exactly_once, report.sent)} of sent"),
        ("run twice", report.twice, f"({report.twice_overlapping} at the same time on 2 workers)"),
        ("lost", report.lost, "(never completed by the deadline)"),
        ("released", report.released, "(long canaries handed back at a stop, checkpoint saved)"),
        ("resumed", report.resumed, "(runs that continued from a checkpoint)"),
        ("retried", report.retried, "(flaky canaries' failed first attempts, by design)"),
        ("abandoned runs", report.abandoned, "(runs that never finished: killed, or lease lost)"),
        (
            "redelivered",
            report.redelivered,
            "(delivered again after completing: recognised, not run again)",
        ),
    )
    lines += [f"  {name:<16}{value:>8}   {note}".rstrip() for name, value, note in rows]
    lines += ["", "  by kind           sent   once  twice   lost"]
    for kind, c in report.by_kind.items():
        lines.append(
            f"    {kind:<12} {c['sent']:>8} {c['exactly_once']:>6} {c['twice']:>6} {c['lost']:>6}"
        )
    lines += _latency_lines(report)
    lines += _pod_lines(report)
    lines += _problem_lines(report)
    lines.append("")
    if report.ok:
        lines.append(f"PASS: all {report.sent} canaries completed exactly once")
    else:
        why = [f"{report.lost} lost"] if report.lost else []
        why += [f"{report.twice} completed more than once"] if report.twice else []
        why += ["stopped before the end"] if report.stopped_early else []
        why += ["nothing was sent"] if not report.sent else []
        lines.append(f"FAIL: {', '.join(why)}")
    return lines


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _latency_lines(report: DrillReport) -> list[str]:
    if not report.latency:
        return []
    # 30 # = the highest p95, or 1 s when all are below: a calm drill shows short bars.
    top = max([1.0, *(w.p95 for w in report.latency if w.p95 is not None)])
    lines = ["", f"  enqueue -> start latency, by enqueue time (bar: p95, 30 # = {_ms(top)})"]
    lines.append("    window (s)        n     p50      p95      max   not started")
    for w in report.latency:
        bar = "" if w.p95 is None or top <= 0 else "#" * max(1, round(30 * w.p95 / top))
        lines.append(
            f"    {w.start:>5.0f} - {w.end:<5.0f} {w.count:>6} {_ms(w.p50):>7}  {_ms(w.p95):>7}  "
            f"{_ms(w.max):>7}  {w.not_started:>5}  {bar}"
        )
    return lines


def _pod_lines(report: DrillReport) -> list[str]:
    if not report.pods:
        return []
    lines = ["", "  workers (HOSTNAME, from the records)   first seen  last seen   runs  completed"]
    lines.extend(
        f"    {pod.hostname:<36} {pod.first_seen - report.started_at:>8.1f} s "
        f"{pod.last_seen - report.started_at:>8.1f} s {pod.runs:>6} {pod.completed:>10}"
        for pod in report.pods
    )
    return lines


def _problem_lines(report: DrillReport) -> list[str]:
    lines: list[str] = []
    if report.lost_seqs:
        named = ", ".join(str(seq) for seq in report.lost_seqs[:_NAMED])
        more = f" and {report.lost - _NAMED} more" if report.lost > _NAMED else ""
        lines += ["", f"  lost canaries (seq): {named}{more}"]
    if report.duplicates:
        lines += ["", "  canaries completed more than once:"]
        for dup in report.duplicates[:_NAMED]:
            runs = "; ".join(
                f"{run.hostname} {run.started_at - report.started_at:.1f}-"
                f"{(run.ended_at or run.started_at) - report.started_at:.1f} s"
                for run in dup.runs
            )
            overlap = "overlapping" if dup.overlap else "one after the other"
            lines.append(f"    seq {dup.seq} ({dup.kind}), {overlap}: {runs}")
    if report.redeliveries:
        lines += [
            "",
            "  redelivered after completion (its worker was killed between the end and the ack;",
            "  the canary's idempotency check skipped it, as yours should: not a failure):",
        ]
        lines.extend(_redelivery_line(report, item) for item in report.redeliveries[:_NAMED])
        if report.redelivered > _NAMED:
            lines.append(f"    and {report.redelivered - _NAMED} more")
    return lines


def _redelivery_line(report: DrillReport, item: Redelivery) -> str:
    first = item.completed_by
    where = "" if first is None else f"completed on {first.hostname}"
    if first is not None and first.ended_at is not None:
        where += f" at {first.ended_at - report.started_at:.1f} s"
    again = f"again on {item.run.hostname} at {item.run.started_at - report.started_at:.1f} s"
    return f"    seq {item.seq} ({item.kind}): {where}, {again}".replace(": , ", ": ")
