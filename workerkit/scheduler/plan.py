"""What to fire, and when: the scheduler's pure arithmetic (no clock, no store, no I/O).

A :class:`Cursor` per schedule holds the next fire time not yet handled and the missed times
(older than the misfire grace, never fired) kept for the leader's catch-up; :func:`slide`
moves a cursor past times that have become too old, and :func:`catch_up` picks the missed
times a schedule's policy fires. The runner (runner.py) does the I/O around it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from workerkit.errors import ConfigurationError
from workerkit.scheduler.contract import MISFIRE_POLICIES, Schedule, Trigger

__all__ = (
    "Cursor",
    "SchedulerTiming",
    "catch_up",
    "check_runnable",
    "grace_of",
    "keep_count",
    "retention_floor",
    "slide",
    "start_cursor",
    "validate_schedule",
)

# A trigger without previous_before() (e.g. an engine's own) is walked forward through missed
# times; past this many steps the rest are skipped (a week of 1 s ticks is 604,800).
_MAX_WALK = 1_000_000


@dataclass(frozen=True)
class SchedulerTiming:
    """The scheduler's six settings (seconds); the process builds it from Settings.

    ``lease_duration``, ``renew_deadline``, ``retry_period``: client-go's leader election.
    ``standby_delay``: how long after a fire time a standby fires it if still unrecorded.
    ``misfire_grace``: a fire time older than this is missed (the schedule's policy decides).
    ``retention``: how long fire records are kept.
    """

    lease_duration: float
    renew_deadline: float
    retry_period: float
    standby_delay: float
    misfire_grace: float
    retention: float


def validate_schedule(schedule: Schedule) -> None:
    """Raise :class:`ValueError` naming the argument when a schedule cannot work."""
    if not schedule.name:
        raise ValueError("a schedule needs a name")
    if schedule.misfire not in MISFIRE_POLICIES:
        raise ValueError(
            f"misfire={schedule.misfire!r} (schedule {schedule.name!r}):"
            f" give one of {', '.join(MISFIRE_POLICIES)}"
        )
    if schedule.max_catch_up < 1:
        raise ValueError(
            f"max_catch_up={schedule.max_catch_up!r} (schedule {schedule.name!r}):"
            " give at least 1 (use misfire='skip' to fire no missed time)"
        )
    grace = schedule.misfire_grace
    if grace is not None and not (math.isfinite(grace) and grace > 0):
        raise ValueError(
            f"misfire_grace={grace!r} (schedule {schedule.name!r}): give seconds above 0,"
            " or None for the scheduler_misfire_grace setting"
        )


def grace_of(schedule: Schedule, timing: SchedulerTiming) -> float:
    """The schedule's misfire grace: its own, or the setting's."""
    return timing.misfire_grace if schedule.misfire_grace is None else schedule.misfire_grace


def retention_floor(schedules: Sequence[Schedule], timing: SchedulerTiming) -> float:
    """The least ``scheduler_retention`` that keeps every record a replica may still fire:
    the largest misfire grace (a standby fires that late) + the lease duration (a handover)
    + 60 s (clock skew, a slow store call)."""
    graces = [grace_of(schedule, timing) for schedule in schedules]
    return max([timing.misfire_grace, *graces]) + timing.lease_duration + 60.0


def check_runnable(schedules: Sequence[Schedule], timing: SchedulerTiming) -> None:
    """Raise :class:`~workerkit.errors.ConfigurationError` when the settings cannot run these
    schedules: a schedule's grace not above the standby delay (its standby could never fire
    it), or a retention that could prune a record a replica may still fire."""
    for schedule in schedules:
        grace = grace_of(schedule, timing)
        if grace <= timing.standby_delay:
            raise ConfigurationError(
                f"schedule {schedule.name!r}: misfire_grace={grace:g} is not above"
                f" scheduler_standby_delay={timing.standby_delay:g}: a standby could never"
                " fire it after a leader dies; raise the schedule's misfire_grace or lower"
                " scheduler_standby_delay"
            )
    floor = retention_floor(schedules, timing)
    if timing.retention < floor:
        raise ConfigurationError(
            f"scheduler_retention={timing.retention:g} is below {floor:g} (the largest"
            " misfire grace + scheduler_lease_duration + 60 s): a record pruned that early"
            " could fire twice; raise scheduler_retention"
        )


def keep_count(schedule: Schedule) -> int:
    """How many missed times the policy can fire: skip 0, latest 1, all ``max_catch_up``."""
    return {"skip": 0, "latest": 1}.get(schedule.misfire, schedule.max_catch_up)


@dataclass
class Cursor:
    """One schedule's progress: the next fire time to handle, and missed times to catch up."""

    due: float
    missed: list[float] = field(default_factory=list)


def slide(trigger: Trigger, due: float, before: float, keep: int) -> tuple[list[float], float]:
    """The fire times in ``[due, before)`` (the latest ``keep``, oldest first) and the first
    fire time at or after ``before`` (``due`` itself when it is not before ``before``).

    ``due`` must be a fire time of ``trigger``.
    """
    if due >= before:
        return [], due
    previous = getattr(trigger, "previous_before", None)
    if callable(previous):
        last: float = previous(before)
        upcoming = trigger.next_after(last)
        kept: list[float] = []
        while last >= due and len(kept) < keep:
            kept.append(last)
            last = previous(last)
        return kept[::-1], upcoming
    window: deque[float] = deque(maxlen=keep)
    when = due
    for _ in range(_MAX_WALK):
        if when >= before:
            return list(window), when
        window.append(when)
        when = trigger.next_after(when)
    return list(window), trigger.next_after(before - 0.0005)


def start_cursor(schedule: Schedule, last_fire: float | None, start: float, grace: float) -> Cursor:
    """Where a runner started at ``start`` picks a schedule up.

    With a last recorded fire, every time after it is either missed (older than ``grace`` at
    ``start``: kept for the policy) or still due; with none (or a paused schedule, given as
    None), the schedule starts at ``start`` (never from the beginning of time).
    """
    trigger = schedule.trigger
    if last_fire is None:
        return Cursor(trigger.next_after(start))
    missed, due = slide(trigger, trigger.next_after(last_fire), start - grace, keep_count(schedule))
    return Cursor(due, missed)


def catch_up(schedule: Schedule, missed: list[float]) -> list[float]:
    """The missed times the schedule's policy fires, oldest first."""
    keep = keep_count(schedule)
    return sorted(missed)[-keep:] if keep else []
