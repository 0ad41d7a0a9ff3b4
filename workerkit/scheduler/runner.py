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
from workerkit.scheduler.contract import (
    FireOutcome,
    Schedule,
    SchedulerReporter,
    ScheduleState,
    fire_key,
)
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
# Records only a leader writes; it catches up oldest first, before anything else, so one of
# these at or past a standby's missed times means that gap is filled.
_LEADER_REASONS = frozenset({"on_time", "catch_up", "manual"})
_SKEW = 0.25  # seconds between the store's clock and ours above which due times use the store's


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

    ``Runner(store, schedules, *, holder, timing, reporter, clock=time.time, wait=None,
    monotonic=None)``;
    ``run(stop)`` blocks and returns once ``stop`` is set, after releasing the lease if held.

    - ``holder``: this replica's name in the lease (:func:`default_holder`).
    - ``timing``: :class:`SchedulerTiming`, built from the ``scheduler_*`` settings.
    - ``reporter``: told of leadership changes, every fire attempt and store health.
    - ``clock``: epoch seconds; fire times are compared with it, corrected by the store's
      clock when the two differ by more than 0.25 s (measured at every acquire/renew; logged
      once per change, event ``scheduler_clock_skew``).
    - ``monotonic``: the leadership deadlines' clock; default ``time.monotonic`` with the
      default ``clock``, else ``clock`` itself (a ManualClock drives both).
    - ``wait(stop, timeout) -> bool``: sleep until ``timeout`` passes or ``stop`` is set
      (returns whether it is); default ``stop.wait``. Tests pass one that advances a
      :class:`~workerkit.testing.ManualClock`.

    :class:`~workerkit.errors.StoreUnavailable` is ridden out (retried; reported through
    ``reporter.store_health``); any other exception propagates, except a schedule's trigger
    math failing: that schedule is logged (``scheduler_schedule_error``) and skipped.
    Settings that cannot run the schedules raise
    :class:`~workerkit.errors.ConfigurationError` here (see ``plan.check_runnable``).
    A step-down other than at stop (renew deadline, NOT_LEADER, lease lost) is logged as a
    warning, event ``scheduler_step_down`` with its ``reason``.
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
        monotonic: Callable[[], float] | None = None,
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
        if monotonic is None:
            monotonic = time.monotonic if clock is time.time else clock
        self._mono = monotonic
        self._offset = 0.0  # the store's clock minus ours, at the last acquire/renew
        self._skewed = False  # due times use the store's clock (ours + offset)
        self._retry_at: dict[str, float] = {}  # a standby's next try of a schedule's due time
        self._leadership = Leadership(timing)
        self._registered = False
        self._cursors: dict[str, Cursor] = {}
        self._loaded = False  # the cursors were set from the store's state
        self._start = -math.inf
        self._store_ok = True
        self._blocked_until = -math.inf  # monotonic: no store call (but leadership's) before
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
                if self._wait(stop, self._timeout()):
                    break
        finally:
            self._step_down("stopping", release=True)

    # -- one pass -----------------------------------------------------------------------

    def _now(self) -> float:
        """Now, for due times: our clock, or the store's when they differ (F3)."""
        return self._clock() + (self._offset if self._skewed else 0.0)

    def _step(self) -> None:
        self._elect()
        if self._mono() < self._blocked_until:
            return
        if not self._loaded and not self._load():
            return
        if self._leadership.leading and not self._registered and not self._register():
            return
        now = self._now()
        for schedule in self._active():
            self._slide(schedule, now)
        if self.leading and not self._catch_up():
            return
        if not self._fire_due():
            return
        if self.leading and self._clock() >= self._next_poll:
            self._poll()

    def _active(self) -> list[Schedule]:
        """The schedules with a cursor (one whose trigger failed has none)."""
        return [schedule for schedule in self.schedules if schedule.name in self._cursors]

    def _timeout(self) -> float:
        """Seconds until the next thing to do (leadership on the monotonic clock)."""
        lead, mono, now = self._leadership, self._mono(), self._now()
        wake = min(lead.next_call(), lead.deadline()) - mono
        if not self._loaded or (lead.leading and not self._registered):
            work = now
        elif self.leading:
            work = min((cursor.due for cursor in self._cursors.values()), default=math.inf)
            work = min(work, self._next_poll)
            if any(cursor.missed for cursor in self._cursors.values()):
                work = now
        else:
            delay = self.timing.standby_delay
            work = min(
                (
                    max(cursor.due + delay, self._retry_at.get(name, -math.inf))
                    for name, cursor in self._cursors.items()
                ),
                default=math.inf,
            )
        return max(0.0, min(wake, max(work - now, self._blocked_until - mono)))

    # -- leadership -----------------------------------------------------------------------

    def _elect(self) -> None:
        lead, now = self._leadership, self._mono()
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
        self._measure_skew()
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
            self._retry_at.clear()
            self.reporter.leadership(change == "gained", lease.epoch if lease else None)
        if lead.expired(self._mono()):  # the call itself outlasted the deadline
            self._step_down("renew deadline passed")

    def _measure_skew(self) -> None:
        """The store's clock minus ours; past 0.25 s due times follow the store's (logged)."""
        before = self._clock()
        try:
            store_now = self.store.clock()
        except StoreUnavailable:
            return  # measured again at the next acquire/renew
        offset = store_now - (before + self._clock()) / 2
        skewed = abs(offset) > _SKEW
        changed = skewed != self._skewed or (skewed and abs(offset - self._offset) > _SKEW)
        if skewed or changed:
            self._offset = offset
        self._skewed = skewed
        if changed:
            log.log(
                logging.WARNING if skewed else logging.INFO,
                "the store's clock is %+.3f s from this host's%s",
                offset,
                ": fire times follow the store's clock" if skewed else "",
                extra={"event": "scheduler_clock_skew", "offset": round(offset, 4)},
            )

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
        lease = self._leadership.step_down(self._mono())
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
        start = self._start + (self._offset if self._skewed else 0.0)
        for schedule in self.schedules:
            last = self._last_fire(schedule, states.get(schedule.name))
            grace = grace_of(schedule, self.timing)
            try:
                self._cursors[schedule.name] = start_cursor(schedule, last, start, grace)
            except Exception as exc:
                self._broken(schedule, exc)
        self._loaded = True
        return True

    @staticmethod
    def _last_fire(schedule: Schedule, state: ScheduleState | None) -> float | None:
        """The last fire time to continue from; None: start fresh (never fired, paused,
        removed, or last fired under another definition, whose times are not this one's)."""
        if state is None or state.paused or state.removed or state.last_fire is None:
            return None
        record = state.last_fire
        if record.fingerprint is not None and record.fingerprint != schedule.fingerprint():
            return None
        return record.fire_time

    def _broken(self, schedule: Schedule, exc: Exception) -> None:
        """A schedule whose trigger cannot compute its times: log it and skip it."""
        self._cursors.pop(schedule.name, None)
        log.error(
            "schedule %s skipped: its fire times cannot be computed: %s",
            schedule.name,
            exc,
            extra={"event": "scheduler_schedule_error", "schedule": schedule.name},
        )

    def _slide(self, schedule: Schedule, now: float) -> None:
        """Move times older than the grace out of the way, keeping what the policy may fire."""
        cursor, keep = self._cursors[schedule.name], keep_count(schedule)
        try:
            missed, cursor.due = slide(
                schedule.trigger, cursor.due, now - grace_of(schedule, self.timing), keep
            )
        except Exception as exc:
            self._broken(schedule, exc)
            return
        if missed:
            cursor.missed = (cursor.missed + missed)[-keep:]

    def _fire_due(self) -> bool:
        """Fire every time that is due (the leader at once, a standby after its delay)."""
        return all(self._fire_due_of(schedule) for schedule in self._active())

    def _fire_due_of(self, schedule: Schedule) -> bool:
        """One schedule's due times; False when the store or the leadership stopped it."""
        cursor, name = self._cursors[schedule.name], schedule.name
        while True:
            leading, now = self.leading, self._now()
            delay = 0.0 if leading else self.timing.standby_delay
            if cursor.due + delay > now:
                return True
            if not leading and now < self._retry_at.get(name, -math.inf):
                return True
            if not leading and cursor.missed and not self._gap_filled(schedule):
                # Earlier times are still missing: firing this one now would enqueue out of
                # order while a leader catches up; it follows once the gap is filled (M2).
                self._retry_at[name] = now + self.timing.retry_period
                return True
            fire_time = cursor.due
            outcome = self._fire(schedule, fire_time, "on_time" if leading else "standby")
            if outcome is None or outcome == FireOutcome.NOT_LEADER:
                return False  # not fired: still due (a standby's delay applies now)
            if outcome == FireOutcome.STALE and not leading and self._registered_elsewhere(name):
                # Registered under another definition (a rollout): keep it due, so the next
                # leader (maybe this one, once it registers) fires it or catches it up (F1).
                self._retry_at[name] = now + self.timing.retry_period
                return True
            try:
                cursor.due = schedule.trigger.next_after(fire_time)
            except Exception as exc:
                self._broken(schedule, exc)
                return True
            if outcome == FireOutcome.ALREADY_FIRED and cursor.missed and not leading:
                self._forget_missed_if_a_leader_fired(schedule, fire_time)

    def _registered_elsewhere(self, name: str) -> bool:
        """A stale fire: is the schedule registered under another definition? Not when the
        leader does not run it at all (new, or removed): it starts when this one leads."""
        try:
            state = self.store.states([name]).get(name)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return True  # keep it due: decided at the next try
        return state is not None and not state.removed and state.fingerprint is not None

    def _gap_filled(self, schedule: Schedule) -> bool:
        """A standby holding missed times: has a leader recorded past them? (then forget)"""
        try:
            state = self.store.states([schedule.name]).get(schedule.name)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return False
        last = state.last_fire if state is not None else None
        cursor = self._cursors[schedule.name]
        if last is None or last.reason not in _LEADER_REASONS:
            return False
        if last.fire_time < max(cursor.missed):
            return False
        cursor.missed.clear()
        return True

    def _catch_up(self) -> bool:
        """As leader: fire each schedule's missed times its policy keeps, oldest first."""
        for schedule in self._active():
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
        if lease is not None and self._leadership.expired(self._mono()):
            self._step_down("renew deadline passed")
            return None  # not fired: due again, now by the standby's rules
        started = self._now()
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
        now = self._now()
        self._next_poll = now + self.timing.retry_period
        try:
            states = self.store.states([schedule.name for schedule in self.schedules])
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        for schedule in self._active():
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
        self._blocked_until = self._mono() + min(_STORE_RETRY, self.timing.retry_period)
        if self._store_ok:
            self._store_ok = False
            self.reporter.store_health(False, str(exc).splitlines()[0][:200])

    def _store_up(self) -> None:
        if not self._store_ok:
            self._store_ok = True
            self._blocked_until = -math.inf
            self.reporter.store_health(True, "reachable")
