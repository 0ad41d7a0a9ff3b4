"""The scheduler store contract in memory, for tests: no server, time from a given clock.

Held to the same contract suite (tests/support/scheduler_contract.py) as the SQL and Redis
stores. Public as ``workerkit.testing.InMemorySchedulerStore``; it lives here, next to the
contract it implements, so production code never imports :mod:`workerkit.testing`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workerkit.errors import StoreUnavailable
from workerkit.scheduler.contract import (
    FireOutcome,
    FireRecord,
    LeaderInfo,
    Lease,
    Schedule,
    ScheduleState,
    fire_job_id,
    fire_key,
)

__all__ = ("EnqueuedFire", "InMemorySchedulerStore")


@dataclass(frozen=True)
class EnqueuedFire:
    """One job the in-memory store "enqueued": what a real store would put on the queue."""

    job_id: str
    schedule: str
    fire_time: float
    task: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    queue: str | None
    options: Mapping[str, Any]
    reason: str


@dataclass
class _State:
    fingerprint: str | None = None
    paused: bool = False
    removed: bool = False
    triggers: list[float] = field(default_factory=list)
    records: dict[int, FireRecord] = field(default_factory=dict)

    def last(self) -> FireRecord | None:
        return self.records[max(self.records)] if self.records else None


class InMemorySchedulerStore:
    """The :class:`~workerkit.scheduler.contract.SchedulerStore` contract in memory (thread-safe).

    ``clock`` returns epoch seconds and is the store's only notion of time (leases expire on
    it); pass a :class:`~workerkit.testing.ManualClock` to move it with ``clock.advance(...)``.
    Every fire that returned ``FIRED`` is appended to :attr:`enqueued`, in order.
    ``unavailable``: set it to True to make every call raise
    :class:`~workerkit.errors.StoreUnavailable` (a store outage, for tests).
    """

    name = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.enqueued: list[EnqueuedFire] = []
        self.unavailable = False
        self._lease: Lease | None = None
        self._epoch = 0
        self._states: dict[str, _State] = {}
        # One lock for everything: a fire checks the epoch, the record and the state and
        # writes in one step, as the SQL transaction and the Redis script do.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<InMemorySchedulerStore lease={self._lease} fired={len(self.enqueued)}>"

    def _check(self) -> float:
        if self.unavailable:
            raise StoreUnavailable("the in-memory scheduler store is marked unavailable")
        return self._clock()

    def _live(self, now: float) -> Lease | None:
        lease = self._lease
        return lease if lease is not None and lease.expires_at > now else None

    def _current(self, lease: Lease, now: float) -> bool:
        live = self._live(now)
        return live is not None and (live.holder, live.epoch) == (lease.holder, lease.epoch)

    def acquire(self, holder: str, duration: float) -> Lease | None:
        """Take or keep leadership; a change of holder increases the epoch."""
        with self._lock:
            now = self._check()
            live = self._live(now)
            if live is not None and live.holder != holder:
                return None
            if live is None:
                self._epoch += 1
            self._lease = Lease(holder, self._epoch, now + duration)
            return self._lease

    def renew(self, lease: Lease, duration: float) -> Lease | None:
        """Extend leadership; None when ``lease`` is no longer the live one."""
        with self._lock:
            now = self._check()
            if not self._current(lease, now):
                return None
            self._lease = Lease(lease.holder, lease.epoch, now + duration)
            return self._lease

    def release(self, lease: Lease) -> None:
        """Give leadership up now; a no-op when ``lease`` is not the live one."""
        with self._lock:
            if self._current(lease, self._check()):
                self._lease = None

    def leader(self) -> LeaderInfo | None:
        """The live lease's holder, or None."""
        with self._lock:
            now = self._check()
            live = self._live(now)
            return (
                None if live is None else LeaderInfo(live.holder, live.epoch, live.expires_at - now)
            )

    def register(self, lease: Lease, schedules: Sequence[Schedule]) -> bool:
        """Store the schedules' fingerprints; every other known schedule is marked removed."""
        with self._lock:
            if not self._current(lease, self._check()):
                return False
            names = {schedule.name for schedule in schedules}
            for name, state in self._states.items():
                if name not in names:
                    state.fingerprint, state.removed = None, True
            for schedule in schedules:
                state = self._states.setdefault(schedule.name, _State())
                state.fingerprint, state.removed = schedule.fingerprint(), False
            return True

    def fire(
        self, schedule: Schedule, fire_time: float, *, epoch: int | None, reason: str
    ) -> FireOutcome:
        """Record and "enqueue" one fire, at most once (see the contract)."""
        with self._lock:
            now = self._check()
            live = self._live(now)
            if epoch is not None and (live is None or live.epoch != epoch):
                return FireOutcome.NOT_LEADER
            state = self._states.get(schedule.name)
            key = fire_key(fire_time)
            if state is not None and key in state.records:
                return FireOutcome.ALREADY_FIRED
            if state is None or state.removed or state.fingerprint != schedule.fingerprint():
                return FireOutcome.STALE
            if state.paused:
                return FireOutcome.PAUSED
            job_id = fire_job_id(schedule.name, fire_time)
            state.records[key] = FireRecord(
                schedule.name, fire_time, now, job_id, reason, state.fingerprint
            )
            state.triggers = [at for at in state.triggers if fire_key(at) != key]
            self.enqueued.append(
                EnqueuedFire(
                    job_id=job_id,
                    schedule=schedule.name,
                    fire_time=fire_time,
                    task=schedule.task,
                    args=tuple(schedule.args),
                    kwargs=dict(schedule.kwargs),
                    queue=schedule.queue,
                    options=dict(schedule.options),
                    reason=reason,
                )
            )
            return FireOutcome.FIRED

    def states(self, names: Sequence[str] | None = None) -> dict[str, ScheduleState]:
        """Stored state of the named (or all known) schedules; unknown names are left out."""
        with self._lock:
            self._check()
            wanted = self._states if names is None else [n for n in names if n in self._states]
            return {
                name: ScheduleState(
                    name=name,
                    fingerprint=state.fingerprint,
                    paused=state.paused,
                    last_fire=state.last(),
                    triggers=tuple(state.triggers),
                    removed=state.removed,
                )
                for name in wanted
                for state in (self._states[name],)
            }

    def set_paused(self, name: str, paused: bool) -> bool:
        """Pause or resume; False when the schedule was never registered."""
        with self._lock:
            self._check()
            state = self._states.get(name)
            if state is None:
                return False
            state.paused = paused
            return True

    def request_trigger(self, name: str, at: float) -> bool:
        """Ask the leader to fire ``name`` with fire time ``at``; False when unknown."""
        with self._lock:
            self._check()
            state = self._states.get(name)
            if state is None:
                return False
            if fire_key(at) not in {fire_key(t) for t in state.triggers}:
                state.triggers.append(at)
            return True

    def prune(self, lease: Lease, older_than: float) -> int:
        """Delete fire records with fire times before ``older_than``, keeping each last one."""
        with self._lock:
            if not self._current(lease, self._check()):
                return 0
            gone = 0
            for state in self._states.values():
                last = max(state.records, default=None)
                for key in [k for k in state.records if k != last]:
                    if state.records[key].fire_time < older_than:
                        del state.records[key]
                        gone += 1
            return gone

    def clock(self) -> float:
        """The store's clock (the one given)."""
        return self._check()

    def close(self) -> None:
        """Nothing to release."""
