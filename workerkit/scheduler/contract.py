"""The scheduler's contracts: a schedule, its trigger, and what every engine's store implements.

Fire times are epoch seconds computed from the schedule alone (never from "now"), so every
replica names the same ``(schedule, fire_time)``; stores key a fire by :func:`fire_key` (whole
milliseconds), never by the float itself. The lease decides who fires on time; the store's
unique fire record decides that nothing fires twice (DESIGN section 7).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = (
    "MISFIRE_POLICIES",
    "FireOutcome",
    "FireRecord",
    "LeaderInfo",
    "Lease",
    "Misfire",
    "Schedule",
    "ScheduleState",
    "SchedulerBinding",
    "SchedulerReporter",
    "SchedulerStore",
    "Trigger",
    "fire_job_id",
    "fire_key",
)

Misfire = Literal["skip", "latest", "all"]
MISFIRE_POLICIES: tuple[Misfire, ...] = ("skip", "latest", "all")


def fire_key(fire_time: float) -> int:
    """A fire time as the whole milliseconds stores key it by (exact for every replica)."""
    return round(fire_time * 1000)


def fire_job_id(schedule: str, fire_time: float, namespace: str = "default") -> str:
    """The deterministic job/task id of one fire: the same on every replica and every retry.

    Only ``[A-Za-z0-9_.-]`` (safe as an RQ job id and in a Redis key); a name that needed
    changing gets a short hash of the original, so two names cannot collide. Outside the
    ``default`` namespace (``scheduler_namespace``) the namespace joins the name, so two apps'
    schedules of one name on one store never share a job id.
    """
    if namespace != "default":
        schedule = f"{namespace}\x1f{schedule}"
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", schedule)[:64]
    if slug != schedule:
        slug += "-" + hashlib.sha256(schedule.encode()).hexdigest()[:8]
    return f"wk-sched-{slug}-{fire_key(fire_time)}"


@runtime_checkable
class Trigger(Protocol):
    """When a schedule fires: pure math on epoch seconds (no clock, no I/O)."""

    def next_after(self, after: float) -> float:
        """The first fire time strictly after ``after`` (epoch seconds)."""
        ...

    def describe(self) -> str:
        """One line for humans: ``cron '*/5 * * * *' Europe/Berlin``, ``every 10s``."""
        ...

    def identity(self) -> str:
        """A stable text that changes exactly when the fire times change (for the fingerprint)."""
        ...


@dataclass(frozen=True)
class Schedule:
    """One periodic job: which task, with what, when, and what to do about missed times.

    ``misfire``: after the scheduler was down (or the store was), fire times later than
    ``misfire_grace`` seconds are *missed*: ``skip`` fires none, ``latest`` the most recent one,
    ``all`` each of them (the most recent ``max_catch_up``, oldest first), each with its real
    fire time. ``misfire_grace`` None means the scheduler's setting.
    ``options``: engine-specific enqueue options (Celery's ``expires``, ``priority``, ...).
    """

    name: str
    task: str
    trigger: Trigger
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    misfire: Misfire = "latest"
    max_catch_up: int = 100
    misfire_grace: float | None = None

    def fingerprint(self) -> str:
        """A short hash of everything that decides what and when this schedule enqueues.

        The leader registers it; a replica whose schedule differs (an old or a new deploy) has
        its fires refused as stale, so a changed schedule cannot fire by its old definition.
        """
        body = json.dumps(
            [
                self.name,
                self.task,
                self.trigger.identity(),
                list(self.args),
                dict(self.kwargs),
                self.queue,
                dict(self.options),
            ],
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Lease:
    """Leadership held by ``holder`` under ``epoch`` (increases on every change of leader)."""

    holder: str
    epoch: int
    expires_at: float  # epoch seconds by the store's clock, for display only


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads now, as the store sees it (for ``workerkit schedules``); None when nobody."""

    holder: str
    epoch: int
    expires_in: float  # seconds, by the store's clock


class FireOutcome(StrEnum):
    """What :meth:`SchedulerStore.fire` did."""

    FIRED = "fired"  # recorded and enqueued, atomically
    ALREADY_FIRED = "already_fired"  # a record for (schedule, fire_time) exists: nothing done
    NOT_LEADER = "not_leader"  # an epoch was given and is no longer current: nothing done
    STALE = "stale"  # the schedule's fingerprint is not the registered one: nothing done
    PAUSED = "paused"  # the schedule is paused: nothing done (no record either)


@dataclass(frozen=True)
class FireRecord:
    """The last recorded fire of a schedule."""

    schedule: str
    fire_time: float
    recorded_at: float  # epoch seconds by the store's clock
    job_id: str
    reason: str  # "on_time", "standby", "catch_up", "manual"
    # The schedule's fingerprint when it fired (None: a store or a record from before it was
    # kept). A different one means the definition changed: its times are not caught up.
    fingerprint: str | None = None


@dataclass(frozen=True)
class ScheduleState:
    """A schedule's stored state: shared by every replica and the CLI."""

    name: str
    fingerprint: str | None  # registered by the current leader; None when not registered
    paused: bool
    last_fire: FireRecord | None
    triggers: tuple[float, ...] = ()  # pending trigger-now requests (their requested times)
    removed: bool = False  # registered once, no longer in the leader's code


@runtime_checkable
class SchedulerStore(Protocol):
    """Leadership, fire records and schedule state in an engine's store. Thread-safe.

    Every write that needs leadership is fenced by the lease's epoch (``NOT_LEADER`` /
    False otherwise). Store errors raise :class:`~workerkit.errors.StoreUnavailable`.
    """

    def acquire(self, holder: str, duration: float) -> Lease | None:
        """Take or keep leadership for ``duration`` s (store clock); None when another leads.

        Succeeds when nobody leads, the lease has expired, or ``holder`` already leads (then
        the epoch stays). A change of holder increases the epoch.
        """
        ...

    def renew(self, lease: Lease, duration: float) -> Lease | None:
        """Extend leadership; None when ``lease`` is no longer the current one (fenced)."""
        ...

    def release(self, lease: Lease) -> None:
        """Give leadership up now (a standby may take it at once); no-op when not current."""
        ...

    def leader(self) -> LeaderInfo | None:
        """The current leader, or None when nobody holds an unexpired lease."""
        ...

    def register(self, lease: Lease, schedules: Sequence[Schedule]) -> bool:
        """As leader: these are the schedules now (fingerprints stored; others marked removed).

        False (nothing changed) when ``lease`` is not current.
        """
        ...

    def fire(
        self, schedule: Schedule, fire_time: float, *, epoch: int | None, reason: str
    ) -> FireOutcome:
        """Record ``(schedule.name, fire_time)`` and enqueue its job, atomically, at most once.

        ``epoch`` None: a standby's fire (no leadership needed; the unique record and the
        registered fingerprint still decide). The job's id is :func:`fire_job_id`; the job
        carries the schedule's name and the fire time (``current_job().schedule`` and
        ``.fire_time``). A trigger-now request for this time is consumed by the same write.
        """
        ...

    def states(self, names: Sequence[str] | None = None) -> dict[str, ScheduleState]:
        """Stored state of the named schedules (all known ones when None)."""
        ...

    def set_paused(self, name: str, paused: bool) -> bool:
        """Pause or resume a schedule (any process, e.g. the CLI); False when it is unknown."""
        ...

    def request_trigger(self, name: str, at: float) -> bool:
        """Ask the leader to fire ``name`` now, with fire time ``at``; False when unknown."""
        ...

    def prune(self, lease: Lease, older_than: float) -> int:
        """As leader: delete fire records older than ``older_than`` (epoch seconds), keeping
        each schedule's last one; return how many went."""
        ...

    def clock(self) -> float:
        """The store's clock now, epoch seconds (leases are measured on it)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True)
class SchedulerBinding:
    """What an engine gives the scheduler process: its store, and the app's schedules.

    Each engine's ``engines/<engine>/scheduling.py`` has ``open_scheduler(settings) ->
    SchedulerBinding`` (used by the scheduler process and by ``workerkit schedules``).
    """

    store: SchedulerStore
    schedules: tuple[Schedule, ...]


class SchedulerReporter(Protocol):
    """What the scheduler's runner tells the outside (the process sends these as events)."""

    def leadership(self, leading: bool, epoch: int | None) -> None:
        """Leadership was gained (``leading``) or lost/given up."""
        ...

    def fired(self, schedule: str, outcome: FireOutcome, reason: str, delay: float) -> None:
        """One fire attempt ended; ``delay``: seconds after its fire time it was attempted."""
        ...

    def store_health(self, ok: bool, reason: str) -> None:
        """The store became reachable (``ok``) or not (one line, no secrets)."""
        ...
