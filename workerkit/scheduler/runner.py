"""The scheduler's loop: elect, fire each schedule's times when they come, catch up, poll.

One thread, woken at the exact next thing to do (a fire time, a renewal, a deadline), so the
leader fires within milliseconds of each fire time. The arithmetic is in plan.py and
leadership.py; this module does the store calls and tells the reporter. Store outages are
ridden out; the process (process.py) owns signals, logs and the store's connections.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from workerkit.errors import StoreUnavailable
from workerkit.scheduler.contract import FireOutcome, Schedule, SchedulerReporter, fire_key
from workerkit.scheduler.leadership import Leadership
from workerkit.scheduler.plan import (
    Cursor,
    SchedulerTiming,
    catch_up,
    check_runnable,
    grace_of,
    keep_count,
    slide,
    start_cursor,
    validate_schedule,
)

if TYPE_CHECKING:
    from workerkit.scheduler.contract import SchedulerStore

__all__ = ("NullReporter", "Runner", "SchedulerTiming", "default_holder")

log = logging.getLogger(__name__)

_STORE_RETRY = 0.25  # seconds between fire attempts while the store is unreachable
_PRUNE_EVERY = 60.0  # prune fire records at most this often
_LEADER_REASONS = frozenset({"on_time", "catch_up", "manual"})  # records only a leader writes


def default_holder() -> str:
    """A lease holder name unique to this process: ``<hostname>-<pid>-<6 hex>``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class NullReporter:
    """A :class:`~workerkit.scheduler.contract.SchedulerReporter` that tells nobody."""

    def leadership(self, leading: bool, epoch: int | None) -> None:
        """Ignored."""

    def fired(self, schedule: str, outcome: FireOutcome, reason: str, delay: float) -> None:
        """Ignored."""

    def store_health(self, ok: bool, reason: str) -> None:
        """Ignored."""


def _wait_on_event(stop: threading.Event, timeout: float) -> bool:
    return stop.wait(timeout)


class Runner:
    """Run the scheduler for ``schedules`` on ``store`` until ``stop`` is set.

    ``Runner(store, schedules, *, holder, timing, reporter, clock=time.time, wait=None)``;
    ``run(stop)`` blocks and returns once ``stop`` is set, after releasing the lease if held.

    - ``holder``: this replica's name in the lease (:func:`default_holder`).
    - ``timing``: :class:`SchedulerTiming`, built from the ``scheduler_*`` settings.
    - ``reporter``: told of leadership changes, every fire attempt and store health.
    - ``clock``: epoch seconds; fire times and lease timing are measured on it.
    - ``wait(stop, timeout) -> bool``: sleep until ``timeout`` passes or ``stop`` is set
      (returns whether it is); default ``stop.wait``. Tests pass one that advances a
      :class:`~workerkit.testing.ManualClock`.

    :class:`~workerkit.errors.StoreUnavailable` is ridden out (retried; reported through
    ``reporter.store_health``); any other exception propagates. Settings that cannot run the
    schedules raise :class:`~workerkit.errors.ConfigurationError` here
    (``plan.check_runnable``). A step-down other than at stop
    (renew deadline, NOT_LEADER, lease lost) is logged as a warning, event
    ``scheduler_step_down`` with its ``reason``.
    """

    def __init__(
        self,
        store: SchedulerStore,
        schedules: Sequence[Schedule],
        *,
        holder: str,
        timing: SchedulerTiming,
        reporter: SchedulerReporter,
        clock: Callable[[], float] = time.time,
        wait: Callable[[threading.Event, float], bool] | None = None,
    ) -> None:
        names = [schedule.name for schedule in schedules]
        if len(set(names)) != len(names):
            raise ValueError(f"schedule names must be unique: {sorted(names)}")
        for schedule in schedules:
            validate_schedule(schedule)
        check_runnable(schedules, timing)
        self.store, self.schedules, self.holder = store, tuple(schedules), holder
        self.timing, self.reporter = timing, reporter
        self._clock, self._wait = clock, wait or _wait_on_event
        self._leadership = Leadership(timing)
        self._registered = False
        self._cursors: dict[str, Cursor] = {}
        self._loaded = False  # the cursors were set from the store's state
        self._start = -math.inf
        self._store_ok = True
        self._blocked_until = -math.inf  # no store call (but leadership's) before this
        self._next_poll = -math.inf
        self._next_prune = -math.inf
        self._manual_done: set[tuple[str, int]] = set()

    @property
    def leading(self) -> bool:
        """True while this runner leads and has registered its schedules."""
        return self._leadership.leading and self._registered

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; then release the lease (if held) and return."""
        self._start = self._clock()
        try:
            while not stop.is_set():
                self._step()
                timeout = max(0.0, self._next_wake() - self._clock())
                if self._wait(stop, timeout):
                    break
        finally:
            self._step_down("stopping", release=True)

    # -- one pass -----------------------------------------------------------------------

    def _step(self) -> None:
        self._elect()
        if self._clock() < self._blocked_until:
            return
        if not self._loaded and not self._load():
            return
        if self._leadership.leading and not self._registered and not self._register():
            return
        now = self._clock()
        for schedule in self.schedules:
            self._slide(schedule, now)
        if self.leading and not self._catch_up():
            return
        if not self._fire_due():
            return
        if self.leading and self._clock() >= self._next_poll:
            self._poll()

    def _next_wake(self) -> float:
        lead = self._leadership
        wake = min(lead.next_call(), lead.deadline())
        if not self._loaded or (lead.leading and not self._registered):
            work = self._clock()
        else:
            delay = 0.0 if self.leading else self.timing.standby_delay
            work = min((cursor.due + delay for cursor in self._cursors.values()), default=math.inf)
            if self.leading:
                work = min(work, self._next_poll)
                if any(cursor.missed for cursor in self._cursors.values()):
                    work = self._clock()
        return min(wake, max(work, self._blocked_until))

    # -- leadership -----------------------------------------------------------------------

    def _elect(self) -> None:
        lead, now = self._leadership, self._clock()
        if lead.expired(now):
            self._step_down("renew deadline passed")
        call = lead.call_due(now)
        if call is None:
            return
        duration = self.timing.lease_duration
        try:
            if call == "acquire":
                lease = self.store.acquire(self.holder, duration)
            else:
                assert lead.lease is not None
                lease = self.store.renew(lead.lease, duration)
        except StoreUnavailable as exc:
            lead.failed(now)
            self._store_down(exc)
            return
        self._store_up()
        held = lead.lease
        change = lead.answered(now, lease)
        if change == "lost" and held is not None:
            log.warning(
                "stopped leading the scheduler: the lease was taken",
                extra={
                    "event": "scheduler_step_down",
                    "reason": "lease taken",
                    "epoch": held.epoch,
                },
            )
        if change is not None:
            self._registered = False
            self.reporter.leadership(change == "gained", lease.epoch if lease else None)
        if lead.expired(self._clock()):  # the call itself outlasted the deadline
            self._step_down("renew deadline passed")

    def _register(self) -> bool:
        lease = self._leadership.lease
        assert lease is not None
        try:
            registered = self.store.register(lease, self.schedules)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return False
        self._store_up()
        if not registered:
            self._step_down("lease lost before registering")
            return False
        self._registered = True
        self._next_poll = -math.inf
        return True

    def _step_down(self, why: str, *, release: bool = False) -> None:
        lease = self._leadership.step_down(self._clock())
        self._registered = False
        if lease is None:
            return
        if release:
            try:
                self.store.release(lease)
            except StoreUnavailable as exc:
                self._store_down(exc)  # the lease runs out on its own
        if why != "stopping":
            log.warning(
                "stopped leading the scheduler: %s",
                why,
                extra={"event": "scheduler_step_down", "reason": why, "epoch": lease.epoch},
            )
        self.reporter.leadership(False, None)

    # -- firing ---------------------------------------------------------------------------

    def _load(self) -> bool:
        """Pick every schedule up from its stored state (last fire, paused)."""
        try:
            states = self.store.states([schedule.name for schedule in self.schedules])
        except StoreUnavailable as exc:
            self._store_down(exc)
            return False
        self._store_up()
        for schedule in self.schedules:
            state = states.get(schedule.name)
            last = state.last_fire if state is not None and not state.paused else None
            grace = grace_of(schedule, self.timing)
            last_time = None if last is None else last.fire_time
            self._cursors[schedule.name] = start_cursor(schedule, last_time, self._start, grace)
        self._loaded = True
        return True

    def _slide(self, schedule: Schedule, now: float) -> None:
        """Move times older than the grace out of the way, keeping what the policy may fire."""
        cursor, keep = self._cursors[schedule.name], keep_count(schedule)
        missed, cursor.due = slide(
            schedule.trigger, cursor.due, now - grace_of(schedule, self.timing), keep
        )
        if missed:
            cursor.missed = (cursor.missed + missed)[-keep:]

    def _fire_due(self) -> bool:
        """Fire every time that is due (the leader at once, a standby after its delay)."""
        for schedule in self.schedules:
            cursor = self._cursors[schedule.name]
            while True:
                leading = self.leading
                delay = 0.0 if leading else self.timing.standby_delay
                if cursor.due + delay > self._clock():
                    break
                fire_time = cursor.due
                outcome = self._fire(schedule, fire_time, "on_time" if leading else "standby")
                if outcome is None or outcome == FireOutcome.NOT_LEADER:
                    return False  # not fired: still due (a standby's delay applies now)
                cursor.due = schedule.trigger.next_after(fire_time)
                if outcome == FireOutcome.ALREADY_FIRED and cursor.missed and not leading:
                    self._forget_missed_if_a_leader_fired(schedule, fire_time)
        return True

    def _catch_up(self) -> bool:
        """As leader: fire each schedule's missed times its policy keeps, oldest first."""
        for schedule in self.schedules:
            cursor = self._cursors[schedule.name]
            for fire_time in catch_up(schedule, cursor.missed):
                outcome = self._fire(schedule, fire_time, "catch_up")
                if outcome is None or outcome == FireOutcome.NOT_LEADER:
                    return False  # kept: the next leader (maybe this one) catches up
                cursor.missed.remove(fire_time)
            cursor.missed.clear()
        return True

    def _forget_missed_if_a_leader_fired(self, schedule: Schedule, fire_time: float) -> None:
        """A standby's missed times belong to a live leader when one recorded this time."""
        try:
            state = self.store.states([schedule.name]).get(schedule.name)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        last = state.last_fire if state is not None else None
        if last is not None and last.reason in _LEADER_REASONS:
            cursor = self._cursors[schedule.name]
            cursor.missed = [t for t in cursor.missed if t > fire_time]

    def _fire(self, schedule: Schedule, fire_time: float, reason: str) -> FireOutcome | None:
        """One fire attempt; None when the store could not be reached (try again later)."""
        lease = self._leadership.lease if self.leading else None
        if lease is not None and self._leadership.expired(self._clock()):
            self._step_down("renew deadline passed")
            return None  # not fired: due again, now by the standby's rules
        started = self._clock()
        try:
            outcome = self.store.fire(
                schedule, fire_time, epoch=None if lease is None else lease.epoch, reason=reason
            )
        except StoreUnavailable as exc:
            self._store_down(exc)
            return None
        self._store_up()
        self.reporter.fired(schedule.name, outcome, reason, started - fire_time)
        if outcome == FireOutcome.NOT_LEADER:
            self._step_down("the store named another leader")
        return outcome

    def _poll(self) -> None:
        """As leader, once a retry period: fire trigger-now requests; prune old records."""
        now = self._clock()
        self._next_poll = now + self.timing.retry_period
        try:
            states = self.store.states([schedule.name for schedule in self.schedules])
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        for schedule in self.schedules:
            state = states.get(schedule.name)
            for at in state.triggers if state is not None else ():
                key = (schedule.name, fire_key(at))
                if key in self._manual_done:
                    continue
                outcome = self._fire(schedule, at, "manual")
                if outcome is None or not self.leading:
                    return
                if outcome != FireOutcome.PAUSED:
                    self._manual_done.add(key)
        lease = self._leadership.lease
        if lease is not None and now >= self._next_prune:
            self._next_prune = now + max(_PRUNE_EVERY, self.timing.retry_period)
            try:
                self.store.prune(lease, now - self.timing.retention)
            except StoreUnavailable as exc:
                self._store_down(exc)

    # -- store health ---------------------------------------------------------------------

    def _store_down(self, exc: StoreUnavailable) -> None:
        self._blocked_until = self._clock() + min(_STORE_RETRY, self.timing.retry_period)
        if self._store_ok:
            self._store_ok = False
            self.reporter.store_health(False, str(exc).splitlines()[0][:200])

    def _store_up(self) -> None:
        if not self._store_ok:
            self._store_ok = True
            self._blocked_until = -math.inf
            self.reporter.store_health(True, "reachable")
