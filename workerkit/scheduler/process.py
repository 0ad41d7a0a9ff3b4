"""The scheduler process: what ``python -m workerkit.engines.<engine>.scheduling`` runs.

Settings from the environment (the supervisor resolved them), JSON logs, the event client, the
lifeline to the supervisor. It waits for the store (not ready meanwhile), says it is ready, and
runs the scheduler's runner in a thread until SIGTERM, SIGINT or SIGHUP (or the supervisor's
death): then the runner releases the lease, so a standby takes over within one retry period, and
the process exits 0. The runner's reports become events (metrics in the supervisor) and log lines;
the last store health is repeated with every heartbeat, so readiness never goes stale.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Final

from workerkit import events as events_module
from workerkit import exitcodes
from workerkit.errors import ConfigurationError, StoreUnavailable
from workerkit.events import (
    EventClient,
    Heartbeat,
    ScheduleFired,
    SchedulerLeadership,
    StoreHealth,
    WorkerReady,
)
from workerkit.scheduler.contract import FireOutcome, SchedulerBinding
from workerkit.scheduler.runner import Runner, SchedulerTiming, default_holder

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = (
    "HEARTBEAT_EVERY",
    "STOP_SIGNALS",
    "EventReporter",
    "run_scheduler_process",
    "timing_of",
    "wait_for_store",
)

log = logging.getLogger("workerkit.scheduler")

#: How often the process tells its supervisor it is alive (and repeats the store's health).
HEARTBEAT_EVERY: Final = 2.0
#: The signals that stop the scheduler: the lease is handed over, the process exits 0.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Waiting for the store at start: the first retry after this, doubling up to the cap.
_FIRST_RETRY: Final = 0.5
_MAX_RETRY: Final = 5.0
#: Outcomes that are routine for a standby or a race (logged at debug, counted in metrics).
_QUIET: Final = frozenset({FireOutcome.ALREADY_FIRED})


def timing_of(settings: Settings) -> SchedulerTiming:
    """The runner's timing, from the ``scheduler_*`` settings."""
    return SchedulerTiming(
        lease_duration=settings.scheduler_lease_duration,
        renew_deadline=settings.scheduler_renew_deadline,
        retry_period=settings.scheduler_retry_period,
        standby_delay=settings.scheduler_standby_delay,
        misfire_grace=settings.scheduler_misfire_grace,
        retention=settings.scheduler_retention,
    )


class EventReporter:
    """The runner's :class:`~workerkit.scheduler.contract.SchedulerReporter`: events and logs.

    Thread-safe. ``on_ready`` is called once, at the first report of a reachable store.
    """

    def __init__(
        self, events: EventClient, holder: str, on_ready: Callable[[], None] | None = None
    ) -> None:
        self.events = events
        self.holder = holder
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self.store_ok: bool | None = None
        self.store_reason = ""
        self.leading = False

    def leadership(self, leading: bool, epoch: int | None) -> None:
        self.leading = leading
        self.events.send(SchedulerLeadership(leading=leading, epoch=epoch))
        what = "leading: firing on time" if leading else "standby: firing only what is late"
        log.info(
            f"scheduler {what}",
            extra={
                "event": "scheduler_leadership",
                "leading": leading,
                "epoch": epoch,
                "holder": self.holder,
            },
        )

    def fired(self, schedule: str, outcome: FireOutcome, reason: str, delay: float) -> None:
        value = FireOutcome(outcome).value
        # A negative delay (fired before its time: clock skew) is reported as it is.
        self.events.send(ScheduleFired(schedule, value, reason, delay))  # type: ignore[arg-type]
        level = logging.DEBUG if outcome in _QUIET else logging.INFO
        if outcome in (FireOutcome.NOT_LEADER, FireOutcome.STALE):
            level = logging.WARNING
        if log.isEnabledFor(level):
            log.log(
                level,
                f"schedule {schedule}: {value} ({reason}, {delay * 1000:.0f} ms after its time)",
                extra={
                    "event": "schedule_fired",
                    "schedule": schedule,
                    "outcome": value,
                    "reason": reason,
                    "delay": round(delay, 4),
                },
            )

    def store_health(self, ok: bool, reason: str) -> None:
        with self._lock:
            changed = ok != self.store_ok
            self.store_ok, self.store_reason = ok, reason
            on_ready = self._on_ready if ok else None
            if ok:
                self._on_ready = None
        self.events.send(StoreHealth(ok=ok, reason=reason))
        if changed:
            log.log(
                logging.INFO if ok else logging.WARNING,
                "scheduler store reachable" if ok else f"scheduler store unreachable: {reason}",
                extra={"event": "scheduler_store_health", "ok": ok, "reason": reason},
            )
        if on_ready is not None:
            on_ready()

    def beat(self) -> None:
        """A heartbeat, and the last store health again (readiness must not go stale)."""
        self.events.send(Heartbeat(ts=time.time()))
        if self.store_ok is not None:
            self.events.send(StoreHealth(ok=self.store_ok, reason=self.store_reason))


def wait_for_store(
    binding: SchedulerBinding, reporter: EventReporter, budget: float, stop: threading.Event
) -> bool:
    """Until the store answers (True), ``budget`` seconds pass or ``stop`` is set (False)."""
    started = time.monotonic()
    delay = _FIRST_RETRY
    while not stop.is_set():
        try:
            binding.store.clock()
        except StoreUnavailable as exc:
            reporter.store_health(False, str(exc))
            waited = time.monotonic() - started
            if waited >= budget:
                return False
            wait = min(delay, budget - waited)
            log.warning(
                f"scheduler store unreachable: {exc}; retrying in {wait:.1f} s",
                extra={
                    "event": "store_connect_retry",
                    "reason": str(exc),
                    "retry_in": round(wait, 2),
                    "waited": round(waited, 1),
                    "startup_timeout": budget,
                },
            )
            stop.wait(wait)
            delay = min(delay * 2, _MAX_RETRY)
            continue
        reporter.store_health(True, "ok")
        return True
    return False


def _install_stop_signals(stop: threading.Event) -> None:
    def stopping(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info(
                f"{signal.Signals(signum).name} received: handing the lease over and exiting",
                extra={"event": "scheduler_stopping", "signal": signal.Signals(signum).name},
            )
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stopping)


def _open(
    open_binding: Callable[[Settings], SchedulerBinding], settings: Settings
) -> SchedulerBinding | int:
    """The binding, or the exit code that says why there is none."""
    try:
        return open_binding(settings)
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "scheduler_config_error"})
        return exitcodes.CONFIG_ERROR
    except StoreUnavailable as exc:
        log.error(
            f"scheduler store unavailable: {exc}",
            extra={"event": "store_unavailable", "reason": str(exc)},
        )
        return exitcodes.STORE_UNAVAILABLE


def run_scheduler_process(open: Callable[[Settings], SchedulerBinding]) -> int:  # noqa: A002
    """Run the scheduler of the binding ``open(settings)`` returns; return the exit code.

    An engine's ``main()`` is ``sys.exit(run_scheduler_process(open_scheduler))``. Exit codes:
    0 after a stop signal (the lease handed over), CONFIG_ERROR for a bad app or schedule,
    STORE_UNAVAILABLE when the store stayed unreachable for ``startup_timeout`` at start,
    INTERNAL_ERROR when the runner failed (the traceback is logged).
    """
    from workerkit.engines.lifeline import Lifeline
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        logging.basicConfig()
        log.error(str(exc), extra={"event": "scheduler_config_error"})
        return exitcodes.CONFIG_ERROR
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    _install_stop_signals(stop)
    events = events_module.client("scheduler")
    opened = _open(open, settings)
    if isinstance(opened, int):
        return opened
    binding = opened
    # The supervisor's death (or SIGQUIT): hand the lease over and exit, as on SIGTERM.
    Lifeline(stop.set).start()

    def ready() -> None:
        events.send(WorkerReady(engine=settings.engine))
        log.info(
            f"scheduler ready: {len(binding.schedules)} schedules",
            extra={
                "event": "scheduler_ready",
                "schedules": [s.name for s in binding.schedules],
                "holder": reporter.holder,
            },
        )

    reporter = EventReporter(events, default_holder(), on_ready=ready)
    try:
        runner = Runner(
            binding.store,
            binding.schedules,
            holder=reporter.holder,
            timing=timing_of(settings),
            reporter=reporter,
        )
    except (ValueError, ConfigurationError) as exc:  # a schedule/settings it cannot run
        log.error(str(exc), extra={"event": "scheduler_config_error"})
        binding.store.close()
        return exitcodes.CONFIG_ERROR
    try:
        if not wait_for_store(binding, reporter, settings.startup_timeout, stop):
            if stop.is_set():
                return exitcodes.OK
            log.error(
                "scheduler store unreachable for the whole startup_timeout; exiting",
                extra={"event": "store_unavailable", "reason": reporter.store_reason},
            )
            return exitcodes.STORE_UNAVAILABLE
        return _run(runner, reporter, stop)
    finally:
        with contextlib.suppress(Exception):
            binding.store.close()


def _run(runner: Runner, reporter: EventReporter, stop: threading.Event) -> int:
    """The runner in a thread; this (main) thread handles signals and beats the heartbeat."""
    failed: list[BaseException] = []

    def target() -> None:
        try:
            runner.run(stop)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=target, name="workerkit-scheduler", daemon=True)
    thread.start()
    while thread.is_alive():
        reporter.beat()
        thread.join(HEARTBEAT_EVERY)
    if failed:
        exc = failed[0]
        log.error(
            f"the scheduler failed: {type(exc).__name__}: {exc}",
            exc_info=exc,
            extra={"event": "scheduler_failed"},
        )
        return exitcodes.INTERNAL_ERROR
    if not stop.is_set():
        log.error("the scheduler's runner ended on its own", extra={"event": "scheduler_failed"})
        return exitcodes.INTERNAL_ERROR
    reporter.leading = False
    log.info("scheduler stopped; lease handed over", extra={"event": "scheduler_stopped"})
    return exitcodes.OK
