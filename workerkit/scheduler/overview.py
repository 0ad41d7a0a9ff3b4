"""What ``workerkit schedules`` shows: every schedule, its next fire times, its last fire, and
who leads, as text for people or JSON for machines.

Read from the store and the app's code together: a schedule in the code but not registered (no
leader has run this code yet), or registered with another fingerprint (another version of the
code leads), is said so, as is one the store knows but the code no longer has.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workerkit.scheduler.triggers import upcoming

if TYPE_CHECKING:
    from workerkit.scheduler.contract import (
        FireRecord,
        LeaderInfo,
        Schedule,
        SchedulerBinding,
        ScheduleState,
    )

__all__ = ("NEXT_COUNT", "Overview", "ScheduleView", "names", "overview", "render_text", "to_json")

#: How many next fire times are listed per schedule.
NEXT_COUNT = 3


@dataclass(frozen=True)
class ScheduleView:
    """One schedule as the store and the code see it together."""

    name: str
    schedule: Schedule | None  # None: in the store only (removed, or another version's)
    state: ScheduleState | None  # None: never registered
    next_fires: tuple[float, ...]

    @property
    def status(self) -> str:
        """active, paused, removed, not_registered, stale or not_in_code."""
        state = self.state
        if state is not None and state.removed:
            return "removed"
        if self.schedule is None:
            return "not_in_code"
        if state is None or state.fingerprint is None:
            return "not_registered"
        if state.fingerprint != self.schedule.fingerprint():
            return "stale"
        return "paused" if state.paused else "active"


@dataclass(frozen=True)
class Overview:
    """Every schedule, who leads, and the store's clock they were read at."""

    now: float
    leader: LeaderInfo | None
    schedules: tuple[ScheduleView, ...]


def overview(binding: SchedulerBinding, *, count: int = NEXT_COUNT) -> Overview:
    """Read the store once (clock, leader, states) and put the code's schedules beside it.

    Raises :class:`~workerkit.errors.StoreUnavailable` when the store cannot be reached.
    """
    store = binding.store
    now = store.clock()
    leader = store.leader()
    states = store.states(None)
    in_code = {s.name: s for s in binding.schedules}
    views = [
        ScheduleView(s.name, s, states.get(s.name), upcoming(s.trigger, now, count))
        for s in binding.schedules
    ]
    views += [
        ScheduleView(name, None, state, ()) for name, state in states.items() if name not in in_code
    ]
    return Overview(now, leader, tuple(views))


def _iso(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_STATUS_TEXT = {
    "active": "active",
    "paused": "paused (workerkit schedules resume NAME)",
    "removed": "removed: no longer in the leader's code; it does not fire",
    "not_registered": "not registered yet: no leader has run this code; it fires once one does",
    "stale": "stale: the leader registered another definition (another version of the code "
    "leads); this one's fires are refused until it does",
    "not_in_code": "not in this app's code (registered by another version)",
}


def _last_fire_text(record: FireRecord | None) -> str:
    if record is None:
        return "never"
    late = (record.recorded_at - record.fire_time) * 1000
    return f"{_iso(record.fire_time)} {record.reason}, recorded {late:.0f} ms after its time"


def _leader_text(leader: LeaderInfo | None) -> str:
    if leader is None:
        return "leader: none (no scheduler holds the lease; standbys fire what is late)"
    return (
        f"leader: {leader.holder} (epoch {leader.epoch}, lease expires in "
        f"{max(0.0, leader.expires_in):.1f} s)"
    )


def _view_lines(view: ScheduleView) -> list[str]:
    schedule = view.schedule
    if schedule is None:
        head = f"{view.name}"
    else:
        queue = f", queue {schedule.queue}" if schedule.queue else ""
        head = (
            f"{view.name}: {schedule.trigger.describe()} -> {schedule.task}{queue}, "
            f"misfire {schedule.misfire}"
        )
    lines = [head, f"  state: {_STATUS_TEXT[view.status]}"]
    if view.next_fires:
        lines.append("  next:  " + ", ".join(_iso(t) for t in view.next_fires))
    state = view.state
    lines.append(f"  last:  {_last_fire_text(state.last_fire if state else None)}")
    if state is not None and state.last_fire is not None:
        lines.append(f"  job:   {state.last_fire.job_id}")
    if state is not None and state.triggers:
        pending = ", ".join(_iso(t) for t in state.triggers)
        lines.append(f"  trigger requests pending: {pending}")
    return lines


def render_text(view: Overview) -> str:
    """The overview for people: the leader, then a block per schedule."""
    lines = [f"store clock: {_iso(view.now)}", _leader_text(view.leader)]
    if not view.schedules:
        lines.append("no schedules (declare them in the app; see docs/concepts/scheduler.md)")
    for schedule in view.schedules:
        lines += ["", *_view_lines(schedule)]
    return "\n".join(lines)


def _record_json(record: FireRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "fire_time": record.fire_time,
        "recorded_at": record.recorded_at,
        "delay": round(record.recorded_at - record.fire_time, 6),
        "job_id": record.job_id,
        "reason": record.reason,
    }


def _view_json(view: ScheduleView) -> dict[str, Any]:
    schedule, state = view.schedule, view.state
    return {
        "name": view.name,
        "status": view.status,
        "in_code": schedule is not None,
        "task": schedule.task if schedule else None,
        "trigger": schedule.trigger.describe() if schedule else None,
        "queue": schedule.queue if schedule else None,
        "misfire": schedule.misfire if schedule else None,
        "max_catch_up": schedule.max_catch_up if schedule else None,
        "fingerprint": schedule.fingerprint() if schedule else None,
        "registered_fingerprint": state.fingerprint if state else None,
        "paused": state.paused if state else False,
        "removed": state.removed if state else False,
        "next_fires": list(view.next_fires),
        "last_fire": _record_json(state.last_fire if state else None),
        "pending_triggers": list(state.triggers) if state else [],
    }


def to_json(view: Overview) -> dict[str, Any]:
    """The overview for machines (times are epoch seconds)."""
    leader = view.leader
    return {
        "now": view.now,
        "leader": None
        if leader is None
        else {"holder": leader.holder, "epoch": leader.epoch, "expires_in": leader.expires_in},
        "schedules": [_view_json(s) for s in view.schedules],
    }


def names(binding: SchedulerBinding) -> Sequence[str]:
    """The code's schedule names, for messages."""
    return [s.name for s in binding.schedules]
