"""What every engine does the same way: end an attempt, keep up, retry, release what is in flight.

* :func:`verdict_for` turns the exception that ended an attempt into a :data:`Verdict`; each
  engine maps the verdict to its own store operations (docs/concepts/attempts.md).
* :func:`check_arguments` binds a job's arguments to its task's signature before the call, so
  that a mismatch is :class:`Unrunnable` (fails at once), not the task's own ``TypeError``.
* :class:`Keeper` runs an engine's upkeep duties (heartbeats, health, leases) on one thread.
* :class:`RetriedWrite` retries a settle, checkpoint or start while the store is away.
* :func:`release_each` releases deliveries one by one, surviving a bad one.

The tricky "why": the table is one ordered list, so an engine that knows the attempt was
taken from it (released, or its lease lost) never writes a result for it.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeVar, cast

from workerkit.engines.wakepipe import WakePipe
from workerkit.errors import (
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    JobInterrupted,
    LeaseLost,
    ReleaseJob,
)

__all__ = (
    "HEALTH_EVERY",
    "HEARTBEAT_EVERY",
    "RETRY_FIRST",
    "RETRY_MAX",
    "Defer",
    "Duty",
    "Fail",
    "Keeper",
    "Propagate",
    "Release",
    "ReleaseTally",
    "Retried",
    "RetriedWrite",
    "RetryOrFail",
    "Rules",
    "StandDown",
    "Unrunnable",
    "Verdict",
    "backoff",
    "check_arguments",
    "defer_delay",
    "lease_bound",
    "release_each",
    "verdict_for",
)

#: How often a worker tells the supervisor it is alive (liveness).
HEARTBEAT_EVERY: Final = 2.0
#: How often a worker reports its store's health and its queues' stats (readiness, metrics).
HEALTH_EVERY: Final = 5.0

_T = TypeVar("_T")
_Exceptions = tuple[type[BaseException], ...]


# --- writes retried through a store outage ----------------------------------------------------

#: The first retry of a failed store write comes this soon; each next one about twice as late...
RETRY_FIRST: Final = 0.05
#: ... up to this (seconds), so that a write lands within about a second of the store's return.
RETRY_MAX: Final = 1.0


def backoff(
    first: float = RETRY_FIRST, cap: float = RETRY_MAX, rng: Callable[[], float] = random.random
) -> Iterator[float]:
    """0.05, 0.1, 0.2, ... ``cap``, ``cap``, ... seconds, each with jitter (half to all of it).

    The jitter spreads the retries of many workers (and of many jobs of one worker) that all
    saw the store go away at the same moment.
    """
    delay = first
    while True:
        yield delay * (0.5 + 0.5 * rng())
        delay = min(delay * 2, cap)


def lease_bound(sent_at: float, ttl: float) -> float:
    """The monotonic time until which a lease set by a request sent at ``sent_at`` surely holds.

    The store (database or Redis) set the expiry ``ttl`` after its own "now", which was no
    earlier than our ``sent_at``; a margin (a tenth of the lease, at most 1 s) covers clocks that
    run at slightly different rates.
    """
    return sent_at + ttl - min(1.0, ttl / 10)


@dataclass(eq=False)
class RetriedWrite:
    """Runs one write until it lands, again after each failure that says the store is away.

    The one retry loop of every engine's settles, checkpoints and starts; each engine's subclass
    names that failure (``errors``), the store (in the log lines), and may end the retries early
    (:meth:`_give_up`) or wait its own way (:meth:`_pause`). ``until()`` is the monotonic time
    after which no more retries are made (None: no bound); ``lease_until()`` only tells the log
    lines apart: the first failure, and the first past the lease (a fenced write still lands if
    nobody took the job), are logged as ``store_write_retry``; a write that lands after
    failures as ``store_write_recovered``. ``on_failure`` hears every failure (readiness);
    ``on_done`` hears the end, landed or not. Any other error (a lost lease above all) ends the
    retries at once.
    """

    what: str
    job_id: str
    lease_until: Callable[[], float]
    until: Callable[[], float] | None = None
    on_failure: Callable[[str], None] | None = None
    on_done: Callable[[Any], None] | None = None
    clock: Callable[[], float] = time.monotonic
    failures: int = field(default=0, init=False)

    #: The errors that mean "the store is away" (retried), the store's name, the logger.
    errors: ClassVar[_Exceptions] = ()
    store: ClassVar[str] = "the store"
    log: ClassVar[logging.Logger] = logging.getLogger(__name__)

    def run(self, write: Callable[[], _T]) -> _T:
        """``write()``, again after each of :attr:`errors` while allowed; its result."""
        try:
            return self._run(write)
        finally:
            if self.on_done is not None:
                self.on_done(self)

    def _describe(self, exc: BaseException) -> str:
        return str(exc)

    def _give_up(self) -> bool:
        """True to end the retries now, whatever the bound (the worker is releasing)."""
        return False

    def _pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def _run(self, write: Callable[[], _T]) -> _T:
        delays = backoff()
        warned_past_lease = False
        while True:
            try:
                result = write()
            except self.errors as exc:
                self.failures += 1
                if self.on_failure is not None:
                    self.on_failure(f"{self.what} failed: {self._describe(exc)}")
                now = self.clock()
                if self._give_up() or (self.until is not None and now >= self.until()):
                    raise
                past_lease = now >= self.lease_until()
                if self.failures == 1 or (past_lease and not warned_past_lease):
                    warned_past_lease = warned_past_lease or past_lease
                    self._log_retry(exc, past_lease, now)
                self._pause(next(delays))
                continue
            if self.failures:
                self.log.info(
                    "%s written after %s came back",
                    self.what,
                    self.store,
                    extra={
                        "event": "store_write_recovered",
                        "what": self.what,
                        "job_id": self.job_id,
                        "failures": self.failures,
                    },
                )
            return result

    def _log_retry(self, exc: BaseException, past_lease: bool, now: float) -> None:
        if past_lease:
            message = (
                "%s still failing past the lease; retrying (fenced: it lands only if no other "
                "worker took the job)"
            )
            args: tuple[str, ...] = (self.what,)
        else:
            message = "%s failed, the lease still holds; retrying until %s is back"
            args = (self.what, self.store)
        self.log.warning(
            message,
            *args,
            extra={
                "event": "store_write_retry",
                "what": self.what,
                "job_id": self.job_id,
                "error": self._describe(exc),
                "lease_left": round(self.lease_until() - now, 2),
            },
        )


# --- exception -> verdict ---------------------------------------------------------------------


class Unrunnable(Exception):
    """The job cannot run on any attempt, found before its task's body ran: fail it at once.

    Raised by the engines (never by a task): arguments that do not fit the task's signature
    (:func:`check_arguments`), a payload nested too deeply to decode. Its message is the reason
    kept with the failed job.
    """


#: Plain functions' signatures, made once: ``inspect.signature`` cost ~0.1 ms per job.
_signatures: weakref.WeakKeyDictionary[Callable[..., Any], inspect.Signature | None] = (
    weakref.WeakKeyDictionary()
)


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """``fn``'s own signature (None when it has none to inspect); a function's remembered."""
    remembered = type(fn) is types.FunctionType
    if remembered:
        seen: Any = _signatures.get(fn, _NOT_SEEN)
        if seen is not _NOT_SEEN:
            return cast("inspect.Signature | None", seen)
    signature: inspect.Signature | None
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        signature = None
    if remembered:
        _signatures[fn] = signature
    return signature


_NOT_SEEN: Any = object()


def check_arguments(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`Unrunnable` when ``args``/``kwargs`` cannot be bound to ``fn``'s signature.

    Checked before the call, so that a ``TypeError`` raised inside the task's body stays the
    task's own failure (retried as any other), while a call that could never bind fails at once.
    A callable without an inspectable signature (some builtins) is not checked. The signature
    is the callable's own, not the one ``functools.wraps`` advertises (``__wrapped__``): a
    decorator that injects an argument (``@with_session``) takes fewer than the function it
    wraps, and Python calls the wrapper.
    """
    signature = _signature(fn)
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        raise Unrunnable(f"ArgumentsMismatch: {name}{bare}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Release:
    """The job asked to go back to its queue now: requeue it with its attempt given back."""


@dataclass(frozen=True, slots=True)
class StandDown:
    """The attempt no longer owns its job: write nothing; ``outcome`` is what it reports."""

    outcome: Literal["released", "lease_lost"]


@dataclass(frozen=True, slots=True)
class Defer:
    """Not now: run again after ``delay`` seconds, attempt given back, ``reason`` kept."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The job fails the same way on every attempt: fail it now, whatever attempts are left."""

    reason: str


@dataclass(frozen=True, slots=True)
class RetryOrFail:
    """The attempt failed: retry when attempts are left, else fail (``timed_out``: by time)."""

    exc: BaseException
    timed_out: bool = False

    @property
    def error(self) -> str:
        """The one-line error kept with the job (``Type: message``)."""
        return "".join(traceback.format_exception_only(self.exc)).strip()


@dataclass(frozen=True, slots=True)
class Retried:
    """The job asked its engine for a retry itself (Celery's ``Retry``): let it go through."""


@dataclass(frozen=True, slots=True)
class Propagate:
    """Not for the engine to settle: re-raise; the delivery is left to its lease."""


Verdict = Release | StandDown | Defer | Fail | RetryOrFail | Retried | Propagate


@dataclass(frozen=True, slots=True)
class Rules:
    """What differs between engines in :func:`verdict_for` (each engine keeps one constant).

    ``interrupts``: what the engine raises in a job it took back (its own settle came first).
    ``retries``: exceptions by which a job asks the engine itself for a retry.
    ``timeouts``: the engine's "ran past its time limit" exceptions.
    ``permanent``: the engine's own failures that no retry can fix.
    ``settle_base_exceptions``: settle a ``BaseException`` (``SystemExit``...) as a failure;
    False: :class:`Propagate` it.
    ``defer_cap``/``defer_floor``/``zero_retry_after_is_unknown``: see :func:`defer_delay`.
    """

    interrupts: _Exceptions = (JobInterrupted,)
    retries: _Exceptions = ()
    timeouts: _Exceptions = ()
    permanent: _Exceptions = ()
    settle_base_exceptions: bool = True
    defer_cap: float | None = None
    defer_floor: float = 0.0
    zero_retry_after_is_unknown: bool = False


def verdict_for(
    exc: BaseException,
    rules: Rules,
    *,
    backoff: Callable[[], float],
    releasing: bool = False,
    lease_lost: bool = False,
) -> Verdict:
    """How the attempt that raised ``exc`` ends (the first row that matches wins).

    ``releasing``: the engine took the attempt back to release it; ``lease_lost``: the engine
    knows the attempt's lease is gone. ``backoff`` is called (once) only for a :class:`Defer`.
    """
    taken: StandDown = StandDown("released" if releasing else "lease_lost")
    # The job's own release: given back at once. If the engine took the attempt first, the
    # fenced write fails and nothing happens twice.
    if isinstance(exc, ReleaseJob):
        return Release()
    # Another attempt owns the job (or its idempotency key): whatever we wrote would be fenced
    # out; the lease expires and the owner's result stands.
    if isinstance(exc, LeaseLost):
        return StandDown("lease_lost")
    # The engine interrupted the job after settling it itself (release, timeout).
    if isinstance(exc, rules.interrupts):
        return taken
    if not isinstance(exc, Exception) and not rules.settle_base_exceptions:
        return Propagate()
    # Taken back or lost while it failed: the failure is not this attempt's to record.
    if releasing or lease_lost:
        return taken
    # Another live attempt holds the idempotency key: waiting is not a failure, so no attempt
    # is used up; come back when the holder may have finished, or its claim expired.
    if isinstance(exc, IdempotencyInProgress):
        delay = defer_delay(exc.retry_after, rules, backoff)
        return Defer(delay, f"IdempotencyInProgress: {exc}")
    if isinstance(exc, rules.retries):
        return Retried()
    if isinstance(exc, rules.timeouts):
        return RetryOrFail(exc, timed_out=True)
    # A key reused with other arguments (or an unknown task, a bad payload) fails the same way
    # on every attempt: retrying only delays the failure.
    if isinstance(exc, IdempotencyKeyMismatch):
        return Fail(f"IdempotencyKeyMismatch: {exc}")
    # Arguments that do not fit the signature, a payload too deep to decode: found before the
    # task's body ran (a TypeError or RecursionError of the body itself is retried as usual).
    if isinstance(exc, Unrunnable):
        return Fail(str(exc))
    if isinstance(exc, rules.permanent):
        return Fail(str(exc))
    return RetryOrFail(exc)


def defer_delay(retry_after: float | None, rules: Rules, backoff: Callable[[], float]) -> float:
    """Seconds until a deferred job comes back: the holder's claim expiry, capped by a backoff.

    ``retry_after`` unknown: the backoff. Known: at most ``rules.defer_cap`` (the backoff when
    None). Never less than ``rules.defer_floor``. ``zero_retry_after_is_unknown``: treat 0 as
    unknown (Celery's ``retry_after or 5.0`` today).
    """
    if rules.zero_retry_after_is_unknown and not retry_after:
        retry_after = None
    step = backoff()
    if retry_after is None:
        delay = step
    else:
        delay = min(retry_after, step if rules.defer_cap is None else rules.defer_cap)
    return max(rules.defer_floor, delay)


# --- the keeper -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Duty:
    """One upkeep step, run every ``every`` seconds (first after ``first``) while ``when()``.

    ``run`` may return a number: its next run is that many seconds away instead. A duty that is
    off (``when`` false) stays due and runs at the first wake once it is on.
    """

    name: str
    every: float
    run: Callable[[], float | None]
    when: Callable[[], bool] | None = None
    first: float = 0.0


@dataclass(eq=False)
class Keeper:
    """Runs :class:`Duty` steps on one daemon thread until ``stop`` is set (it wakes at once).

    An error in a duty is given to ``on_error`` (by default logged on ``log``) and the other
    duties still run. ``stop`` may be the engine's own event (the SQL worker's release).

    ``wake_runs``: duties that :meth:`wake` makes due at once (a signal handler's way to reach
    the thread: a :class:`~workerkit.engines.wakepipe.WakePipe`), so that they need no short
    cadence to be prompt; the thread then waits on that pipe, and ``stop_event`` is set through
    :meth:`stop`.
    """

    duties: Sequence[Duty]
    log: logging.Logger
    name: str = "workerkit-keeper"
    stop_event: threading.Event = field(default_factory=threading.Event)
    on_error: Callable[[Duty, Exception], None] | None = None
    clock: Callable[[], float] = time.monotonic
    min_wait: float = 0.05
    max_wait: float = 1.0
    wake_runs: Sequence[str] = ()
    _due: dict[str, float] = field(init=False, default_factory=dict)
    _thread: threading.Thread | None = field(init=False, default=None)
    _wake: WakePipe | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        names = [duty.name for duty in self.duties]
        if len(set(names)) != len(names):
            raise ValueError(f"duty names must be unique, got {names}")
        if set(self.wake_runs) - set(names):
            raise ValueError(f"wake_runs names no duty: {sorted(set(self.wake_runs) - set(names))}")
        if self.wake_runs:
            self._wake = WakePipe()
        now = self.clock()
        self._due = {duty.name: now + duty.first for duty in self.duties}

    def start(self) -> None:
        """Run the duties on a daemon thread named ``name``."""
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 2.0) -> bool:
        """Stop now (the thread wakes at once); True once its thread has ended.

        Waits up to ``timeout`` for the thread, unless called from a duty (the thread itself).
        """
        self.stop_event.set()
        self.wake()
        thread = self._thread
        if thread is None:
            return True
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    def run_soon(self, name: str) -> None:
        """Make duty ``name`` due now; its cadence goes on from its next run.

        It runs at the keeper's next wake (``max_wait`` away at the most): for a duty another
        thread needs sooner than its cadence (the SQL fetcher's health check after a failed claim).
        """
        if name not in self._due:
            raise KeyError(f"no duty named {name!r}")
        self._due[name] = self.clock()

    def wake(self) -> None:
        """Run the ``wake_runs`` duties now (nothing without them); safe in a signal handler."""
        if self._wake is not None:
            self._wake.wake()

    def run(self) -> None:
        """Run the duties in this thread until ``stop_event`` is set."""
        wake = self._wake
        while not self.stop_event.is_set():
            if wake is None:
                self.stop_event.wait(self.run_due())
            elif wake.wait(self.run_due()):
                now = self.clock()
                for name in self.wake_runs:
                    self._due[name] = now

    def run_due(self) -> float:
        """Run every duty that is due and on, in order; return how long to wait for the next."""
        now = self.clock()
        for duty in self.duties:
            if self.stop_event.is_set():
                break
            if now < self._due[duty.name] or (duty.when is not None and not duty.when()):
                continue
            self._due[duty.name] = now + duty.every
            try:
                override = duty.run()
            except Exception as exc:
                self._failed(duty, exc)
                continue
            if override is not None:
                self._due[duty.name] = now + override
        return self._wait()

    def _wait(self) -> float:
        on = [
            self._due[duty.name]
            for duty in self.duties
            if duty.when is None or duty.when()  # an off duty does not make the thread spin
        ]
        wait = (min(on) if on else float("inf")) - self.clock()
        return min(max(self.min_wait, wait), self.max_wait)

    def _failed(self, duty: Duty, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(duty, exc)
            return
        self.log.error(
            "upkeep failed; trying again",
            exc_info=exc,
            extra={"event": "upkeep_failed", "duty": duty.name},
        )


# --- releasing what is in flight --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReleaseTally:
    """What :func:`release_each` did: ``released`` + ``not_released`` + ``failed`` + ``left``.

    ``not_released``: the release said no (settled already, or not ours); ``failed``: it raised
    and the next one was tried; ``left``: not tried, after an error that gives up.
    """

    released: int = 0
    not_released: int = 0
    failed: int = 0
    left: int = 0


def release_each(
    items: Sequence[_T],
    release: Callable[[_T], bool],
    *,
    log: logging.Logger,
    give_up_on: _Exceptions = (),
    give_up_message: str = "cannot release in-flight jobs; their leases will expire instead",
    skip_on: _Exceptions = (),
    skip_message: str = "bad delivery ref",
    fields: Callable[[_T], Mapping[str, Any]] | None = None,
) -> ReleaseTally:
    """Call ``release`` on each item; it returns whether the item was released.

    An error of ``give_up_on`` (the store is unreachable) is logged with how many are ``left``
    and stops the loop: their leases expire instead, sooner than more timeouts would. One of
    ``skip_on`` (a bad item) is logged and the next item tried. Any other error propagates.
    Both log lines are ``release_failed`` events with the ``error`` and ``fields(item)``.
    """
    released = not_released = failed = 0
    for index, item in enumerate(items):
        try:
            if release(item):
                released += 1
            else:
                not_released += 1
        except give_up_on as exc:
            left = len(items) - index
            extra = _release_failed(exc, item, fields, left=left)
            log.warning(give_up_message, extra=extra)
            return ReleaseTally(released, not_released, failed, left)
        except skip_on as exc:
            failed += 1
            log.warning(skip_message, extra=_release_failed(exc, item, fields))
    return ReleaseTally(released, not_released, failed)


def _release_failed(
    exc: BaseException,
    item: _T,
    fields: Callable[[_T], Mapping[str, Any]] | None,
    *,
    left: int | None = None,
) -> dict[str, Any]:
    # A KeyError's str is the bare key ("'token'"): its repr says what went wrong.
    error = repr(exc) if isinstance(exc, KeyError) else str(exc)
    extra: dict[str, Any] = {"event": "release_failed", **(fields(item) if fields else {})}
    extra["error"] = error
    if left is not None:
        extra["left"] = left
    return extra
