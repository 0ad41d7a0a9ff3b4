"""The supervisor's lifecycle as a pure state machine: no I/O, no clock, no signals.

The runner (:mod:`workerkit.supervisor.runner`) feeds it inputs and executes the actions it
returns, both defined in :mod:`workerkit.supervisor.steps` and re-exported here. Time is passed
in (``time.monotonic()`` seconds), so every deadline is tested by handing the machine the instant
of interest. The states, deadlines and signal rules: docs/operations/lifecycle.md.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from workerkit import exitcodes
from workerkit.events import Release, RequestStop
from workerkit.supervisor.restarts import CrashLoop
from workerkit.supervisor.steps import (
    Action,
    BroadcastCommand,
    Exit,
    Input,
    JobFinished,
    JobStarted,
    KillChild,
    Log,
    ReleaseCompleted,
    ReleaseInFlight,
    ShutdownOutcome,
    SignalChild,
    SignalReceived,
    StartChild,
    Tick,
    WorkerExited,
    WorkerReady,
    WorkerStopping,
)
from workerkit.timing.deadlines import Deadlines

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = (
    "Action",
    "BroadcastCommand",
    "Exit",
    "Input",
    "JobFinished",
    "JobStarted",
    "KillChild",
    "Lifecycle",
    "Log",
    "ReleaseCompleted",
    "ReleaseInFlight",
    "ShutdownOutcome",
    "SignalChild",
    "SignalReceived",
    "StartChild",
    "State",
    "Tick",
    "WorkerExited",
    "WorkerReady",
    "WorkerStopping",
)


#: The shutdown reason when the worker stopped fetching without our signal.
_WORKER_STOPPING = "worker stopping"


class State(enum.StrEnum):
    """Where the supervisor is in its life."""

    STARTING = "starting"  # the worker process is starting; not ready yet
    READY = "ready"  # the worker consumes jobs
    DRAINING = "draining"  # a signal arrived: no new job starts; the job in hand may finish
    RELEASING = "releasing"  # past the drain window: stop, interrupt, kill, release
    STOPPED = "stopped"  # done; the exit code is known


# --- the machine ----------------------------------------------------------------------------


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Lifecycle:
    """The supervisor's state machine. Feed it inputs with :meth:`handle`; do what it returns.

    ``drain_window`` is D and ``release_margin`` is M, in seconds (see :meth:`from_settings`).
    """

    def __init__(
        self, drain_window: float, release_margin: float, *, restart_crashed: bool = False
    ) -> None:
        self.drain_window = drain_window
        self.release_margin = release_margin
        #: Restart a worker that crashed after it was ready, up to the crash-loop limit.
        self.restart_crashed = restart_crashed
        self._crash_loop = CrashLoop()
        self._restart_at: float | None = None  # a crashed worker is restarted at this instant
        # ... once its jobs' release completed, or at this instant whatever the release does
        self._release_wait_until: float | None = None
        self._ready_since_start = False  # this worker process (not an earlier one) got ready
        self.state = State.STARTING
        self.deadlines: Deadlines | None = None
        self.drain_started_at: float | None = None  # None when no drain happened (a crash)
        self.shutdown_reason: str | None = None  # "SIGTERM", "SIGINT", "worker stopping"
        self.in_flight: dict[str, Mapping[str, Any]] = {}
        self.child_alive = True
        self.child_returncode: int | None = None
        self.exit_code: int | None = None
        self.outcome: ShutdownOutcome | None = None
        self._crash_code: int | None = None  # STARTUP_FAILED, STORE_UNAVAILABLE, WORKER_CRASHED
        #: The worker said it was ready, or started a job: it got past its startup.
        self._was_ready = False
        #: The stop (a signal, the worker's own) came before that: nothing to drain.
        self._stopped_before_ready = False
        self._request_stop_sent = False
        self._release_sent = False
        self._kill_sent = False
        self._signalled_child = False
        self._still_fetching_seen = False
        self._release_pending = False
        self._release_error: str | None = None
        self._released_by_worker = 0
        self._released_by_supervisor = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, restart_crashed: bool = False) -> Lifecycle:
        return cls(settings.drain_window, settings.release_margin, restart_crashed=restart_crashed)

    @property
    def shutting_down(self) -> bool:
        """True from the first signal (or the worker's own stop, or its crash) on."""
        return self.deadlines is not None

    @property
    def keeps_time(self) -> bool:
        """A deadline (the drain's) or a restart is pending: it needs the runner's fine ticks."""
        return self.deadlines is not None or self._restart_at is not None

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def started(self) -> dict[str, Mapping[str, Any]]:
        """The jobs in flight that started: not those a worker holds prefetched (they are
        released with the rest after a kill, but are not running)."""
        return {k: v for k, v in self.in_flight.items() if not v.get("prefetched")}

    def handle(self, event: Input) -> list[Action]:
        """Apply one input; return what the runner must do, in order."""
        if self.state is State.STOPPED:
            return []
        match event:
            case Tick(now=now) if self._restart_at is not None:
                return self._on_restart_tick(now)
            case SignalReceived(signum=signum, now=now) if self._restart_at is not None:
                return self._on_signal_while_restarting(signum, now)
            case WorkerReady():
                self._ready_since_start = True
                return self._on_worker_ready()
            case WorkerStopping(now=now):
                return self._on_worker_stopping(now)
            case SignalReceived(signum=signal.SIGQUIT, now=now):
                return self._on_quit(now)
            case SignalReceived(signum=signum, now=now):
                return self._on_signal(signum, now)
            case Tick(now=now):
                return self._on_tick(now)
            case JobStarted(job_id=job_id, delivery=delivery) if delivery.get("prefetched"):
                # Held for the next slot, not started: released with the rest after a kill,
                # its attempt given back (the engine reads the mark), but no start to judge.
                self.in_flight[job_id] = delivery
                return []
            case JobStarted(job_id=job_id, delivery=delivery):
                self.in_flight[job_id] = delivery
                self._was_ready = True  # a worker that runs a job consumes, ready or not
                self._ready_since_start = True
                return self._started_after_its_stop(job_id)
            case JobFinished(job_id=job_id, outcome=outcome):
                known = self.in_flight.pop(job_id, None) is not None
                if known and outcome == "released" and self.shutting_down:
                    self._released_by_worker += 1
                return []
            case WorkerExited(returncode=code, now=now):
                return self._on_worker_exited(code, now)
            case ReleaseCompleted(released=released, now=now, error=error):
                return self._on_release_completed(released, now, error)
        raise TypeError(f"not a lifecycle input: {event!r}")  # pragma: no cover

    # --- transitions ------------------------------------------------------------------------

    def _on_worker_ready(self) -> list[Action]:
        if self.state is not State.STARTING:
            return []
        self._was_ready = True
        self.state = State.READY
        return [Log("worker_ready", "the worker is ready; consuming jobs")]

    def _begin_drain(self, now: float, reason: str) -> None:
        # A worker still starting (connecting to its broker, importing the app) holds no job:
        # waiting D for nothing would only delay the stop (and a worker stuck connecting would
        # be killed at D + 0.8 M). The stop starts at once; M still bounds it.
        before_ready = not self._was_ready and not self.in_flight
        self._stopped_before_ready = before_ready
        window = 0.0 if before_ready else self.drain_window
        self.deadlines = Deadlines.after(now, window, self.release_margin)
        self.drain_started_at = now
        self.shutdown_reason = reason
        self.state = State.DRAINING

    def _drain_log(self, reason: str) -> Log:
        assert self.deadlines is not None
        d = self.deadlines
        message = f"draining after {reason}: no new job starts; the job in hand may finish"
        if self._stopped_before_ready:
            message = (
                f"stopping after {reason} before the worker was ready: no job to drain, "
                "the worker is asked to stop now"
            )
        return Log(
            "drain_started",
            message,
            fields={
                "reason": reason,
                "before_ready": self._stopped_before_ready,
                "in_flight": len(self.in_flight),
                "request_stop_in": round(d.request_stop_at - d.started_at, 3),
                "release_in": round(d.release_at - d.started_at, 3),
                "kill_in": round(d.kill_at - d.started_at, 3),
                "exit_in": round(d.exit_at - d.started_at, 3),
            },
        )

    def _on_signal(self, signum: int, now: float) -> list[Action]:
        name = _signal_name(signum)
        if self._stopping_on_its_word() and not self._signalled_child and self.child_alive:
            return self._signal_after_its_stop(name, now)
        if self.shutting_down:
            # A second SIGTERM (kubectl delete twice, an impatient Ctrl-C) must not skip the
            # release: jobs would be lost to the broker's visibility timeout. Say so and go on.
            return [
                Log(
                    "signal_ignored",
                    f"{name} received while already stopping ({self.shutdown_reason}); "
                    "the shutdown continues on its deadlines",
                    level=logging.WARNING,
                    fields={"signal": name, "state": str(self.state)},
                )
            ]
        self._begin_drain(now, name)
        actions: list[Action] = [
            Log("signal_received", f"{name} received", fields={"signal": name}),
            self._drain_log(name),
        ]
        if self.child_alive:
            # SIGTERM, whatever we received: the native worker ignores SIGINT on purpose (a
            # terminal's Ctrl-C reaches the whole foreground group), and SIGTERM is every
            # engine's warm shutdown. Sent once, to the worker's pid only.
            self._signalled_child = True
            actions.append(SignalChild(signal.SIGTERM))
        return actions + self._on_tick(now)

    def _on_worker_stopping(self, now: float) -> list[Action]:
        if self.shutting_down:
            return [Log("worker_stopping", "the worker stopped fetching jobs")]
        # The worker began stopping without our signal (it got one of its own): stop being
        # ready and keep to the same deadlines; do not signal it now. A signal we receive later
        # is still forwarded (_signal_after_its_stop).
        self._begin_drain(now, _WORKER_STOPPING)
        return [
            Log(
                "worker_stopping",
                "the worker stopped fetching jobs on its own",
                level=logging.WARNING,
            ),
            self._drain_log(_WORKER_STOPPING),
        ]

    def _stopping_on_its_word(self) -> bool:
        # Stopping because the worker said it stopped fetching, not because of our signal.
        return self.shutting_down and self.shutdown_reason == _WORKER_STOPPING

    def _started_after_its_stop(self, job_id: str) -> list[Action]:
        if not self._stopping_on_its_word() or self._still_fetching_seen:
            return []
        self._still_fetching_seen = True
        return [
            Log(
                "worker_still_fetching",
                "the worker said it stopped fetching jobs, but started one since; "
                "a SIGTERM will still be forwarded to it",
                level=logging.WARNING,
                fields={"job_id": job_id},
            )
        ]

    def _signal_after_its_stop(self, name: str, now: float) -> list[Action]:
        """Our first signal after the worker said it stopped on its own: acted on, not ignored.

        The worker's word is no proof that it stopped fetching (a spurious worker_stopping once
        kept a SIGTERM from reaching a worker that went on starting jobs), and the kubelet's
        grace period starts at its SIGTERM: the signal is forwarded (every engine's handler
        takes a repeated SIGTERM as the same warm stop), and the drain restarts from it unless
        its window is already over.
        """
        actions: list[Action] = [
            Log("signal_received", f"{name} received", fields={"signal": name})
        ]
        if not self._request_stop_sent:
            self._begin_drain(now, name)
            actions.append(self._drain_log(name))
        else:
            self.shutdown_reason = name
        self._signalled_child = True
        actions.append(SignalChild(signal.SIGTERM))
        return actions + self._on_tick(now)

    def _on_tick(self, now: float) -> list[Action]:
        d = self.deadlines
        if d is None:
            return []
        actions: list[Action] = []
        if self.child_alive:
            if now >= d.request_stop_at and not self._request_stop_sent:
                self._request_stop_sent = True
                self.state = State.RELEASING
                actions += [
                    Log(
                        "drain_deadline",
                        "drain window over: asking running jobs to stop",
                        fields={"in_flight": len(self.in_flight)},
                    ),
                    BroadcastCommand(RequestStop()),
                ]
            if now >= d.release_at and not self._release_sent:
                self._release_sent = True
                actions += [
                    Log(
                        "release_deadline",
                        "interrupting unfinished jobs and releasing them to their queues",
                        fields={"in_flight": len(self.in_flight)},
                    ),
                    BroadcastCommand(Release()),
                ]
            if now >= d.kill_at and not self._kill_sent:
                self._kill_sent = True
                actions += [
                    Log(
                        "kill_deadline",
                        "the worker is still running: killing it",
                        level=logging.WARNING,
                        fields={"in_flight": len(self.in_flight)},
                    ),
                    KillChild(),
                ]
        if now >= d.exit_at:
            actions += self._exit_at_deadline(now, killed_now=KillChild() in actions)
        return actions

    def _exit_at_deadline(self, now: float, *, killed_now: bool) -> list[Action]:
        actions: list[Action] = []
        if self.child_alive and not killed_now:
            # Killed at kill_at but not reaped yet (or the loop was late): kill again, then go.
            # As PID 1 our exit takes every process of the container with it anyway.
            self._kill_sent = True
            actions.append(KillChild())
        if self._release_pending or self.in_flight:
            self._release_error = self._release_error or "the exit deadline passed"
        actions.append(
            Log(
                "exit_deadline",
                "exit deadline reached: exiting before the kubelet's SIGKILL",
                level=logging.ERROR,
                fields={
                    "worker_alive": self.child_alive,
                    "unreleased": len(self.in_flight),
                },
            )
        )
        return actions + self._finish(now)

    def _on_worker_exited(self, code: int, now: float) -> list[Action]:
        if not self.child_alive:
            return []
        if self.restart_crashed and self._ready_since_start and not self.shutting_down:
            delay = self._crash_loop.crashed(now)
            if delay is not None:
                return self._restart_after_crash(code, now, delay)
            limit = Log(
                "worker_crash_loop",
                f"not restarting the worker: {self._crash_loop.describe()}; exiting so that "
                "the pod restarts",
                level=logging.ERROR,
                fields={"crashes": len(self._crash_loop.crashes)},
            )
            return [limit, *self._worker_gone(code, now)]
        return self._worker_gone(code, now)

    def _worker_gone(self, code: int, now: float) -> list[Action]:
        """The worker exited and is not restarted: release what it had, then stop."""
        self.child_alive = False
        self.child_returncode = code
        expected = self.shutting_down and (
            code == 0 or self._kill_sent or (self._signalled_child and code == -signal.SIGTERM)
        )
        actions: list[Action] = []
        if expected:
            actions.append(
                Log(
                    "worker_exited",
                    f"the worker exited with code {code}",
                    fields={"returncode": code, "in_flight": len(self.in_flight)},
                )
            )
        else:
            starting = not self._was_ready
            self._crash_code = exitcodes.STARTUP_FAILED if starting else exitcodes.WORKER_CRASHED
            if starting and code == exitcodes.STORE_UNAVAILABLE:
                # The worker gave up waiting for its broker (startup_timeout): say so.
                self._crash_code = exitcodes.STORE_UNAVAILABLE
            event = "worker_start_failed" if starting else "worker_crashed"
            what = "before it was ready" if starting else "unexpectedly"
            actions.append(
                Log(
                    event,
                    f"the worker exited {what} with code {code}",
                    level=logging.ERROR,
                    fields={"returncode": code, "in_flight": len(self.in_flight)},
                )
            )
            if not self.shutting_down:
                # Give the release the same margin a shutdown has for it.
                self.deadlines = Deadlines.after(now, 0.0, self.release_margin)
                self.shutdown_reason = "worker exited"
        if self.in_flight:
            self.state = State.RELEASING
            self._release_pending = True
            refs = tuple(self.in_flight.values())
            actions += [
                Log(
                    "release_in_flight",
                    f"releasing {len(refs)} in-flight deliveries of the exited worker",
                    fields={"count": len(refs), "job_ids": list(self.in_flight)},
                ),
                ReleaseInFlight(refs, crashed=not expected),
            ]
            return actions
        return actions + self._finish(now)

    def _on_release_completed(self, released: int, now: float, error: str | None) -> list[Action]:
        if not self._release_pending:
            return []
        self._release_pending = False
        if error is None:
            self._released_by_supervisor += released
            self.in_flight.clear()
            log = Log(
                "in_flight_released",
                f"released {released} of the worker's in-flight deliveries "
                "(the others were already settled)",
                fields={"released": released},
            )
        else:
            self._release_error = error
            log = Log(
                "release_failed",
                f"could not release in-flight deliveries: {error}",
                level=logging.ERROR,
                fields={"error": error, "unreleased": len(self.in_flight)},
            )
        if self._restart_at is not None:
            # A crashed worker's jobs: those not released come back through their leases; the
            # restarted worker's own shutdown is judged on its own.
            self._release_error = None
            self.in_flight.clear()
            return [log, *self._on_restart_tick(now)]
        return [log, *self._finish(now)]

    def _finish(self, now: float) -> list[Action]:
        if self._crash_code is not None:
            code = self._crash_code
            outcome: ShutdownOutcome = "crashed"
        else:
            code = exitcodes.RELEASE_FAILED if self._release_error else exitcodes.OK
            if code == exitcodes.OK and self._stopped_before_ready and not self._was_ready:
                # Stopped before the worker ever consumed: a startup probe's restart, or a pod
                # deleted while its broker was unreachable. Exit 0 would say "worked and
                # stopped cleanly"; the pod's last state must show it never got ready.
                code = exitcodes.STARTUP_FAILED
            if self._kill_sent:
                outcome = "forced"
            elif self._released_by_worker or self._released_by_supervisor:
                outcome = "released"
            else:
                outcome = "clean"
        self.state = State.STOPPED
        self.exit_code = code
        self.outcome = outcome
        started = self.drain_started_at
        duration = None if started is None else max(0.0, now - started)
        never_ready = " before the worker was ready" if not self._was_ready else ""
        return [
            Log(
                "supervisor_stopped",
                f"stopped{never_ready} ({outcome}); exit code {code}: {exitcodes.describe(code)}",
                level=logging.INFO if code == exitcodes.OK else logging.ERROR,
                fields={
                    "outcome": outcome,
                    "exit_code": code,
                    "ready": self._was_ready,
                    "drain_duration": None if duration is None else round(duration, 3),
                    "released_by_worker": self._released_by_worker,
                    "released_by_supervisor": self._released_by_supervisor,
                },
            ),
            Exit(code, outcome, duration),
        ]

    def _on_quit(self, now: float) -> list[Action]:
        """SIGQUIT: no drain window; ask the jobs to stop and release them now, then exit.

        Celery's cold shutdown, without its loss: what is in hand goes back to its queue with
        its checkpoint. During a drain it skips what is left of the window (an impatient
        operator); the kill and exit deadlines stay where they were, or come M after now.
        """
        actions: list[Action] = [
            Log(
                "signal_received",
                "SIGQUIT received: releasing the jobs in hand now",
                fields={"signal": "SIGQUIT", "immediate": True},
            )
        ]
        if not self.shutting_down:
            self._begin_drain(now, "SIGQUIT")
            self.deadlines = Deadlines.after(now, 0.0, self.release_margin)
            actions.append(self._drain_log("SIGQUIT"))
            if self.child_alive:
                self._signalled_child = True
                actions.append(SignalChild(signal.SIGTERM))
        assert self.deadlines is not None
        self.deadlines = dataclasses.replace(
            self.deadlines,
            request_stop_at=min(self.deadlines.request_stop_at, now),
            release_at=min(self.deadlines.release_at, now),
        )
        return actions + self._on_tick(now)

    # --- restarting a crashed worker (engines whose jobs run inside it: sql) ------------------

    def _restart_after_crash(self, code: int, now: float, delay: float) -> list[Action]:
        """Not ready until a new worker is (supervisor/restarts.py); the dead one's jobs are
        released first, keeping their attempt."""
        self.child_alive = False
        self.child_returncode = code
        self._ready_since_start = False
        self.state = State.STARTING
        self._restart_at = now + delay
        actions: list[Action] = [
            Log(
                "worker_crashed",
                f"the worker exited unexpectedly with code {code}; restarting it in {delay:g}s "
                f"({self._crash_loop.describe()})",
                level=logging.ERROR,
                fields={
                    "returncode": code,
                    "in_flight": len(self.in_flight),
                    "restart_in": delay,
                    "crashes": len(self._crash_loop.crashes),
                },
            )
        ]
        if self.in_flight:
            self._release_pending = True
            self._release_wait_until = now + self.release_margin
            refs = tuple(self.in_flight.values())
            actions += [
                Log(
                    "release_in_flight",
                    f"releasing {len(refs)} in-flight deliveries of the exited worker",
                    fields={"count": len(refs), "job_ids": list(self.in_flight)},
                ),
                ReleaseInFlight(refs, crashed=True),
            ]
        return actions

    def _on_restart_tick(self, now: float) -> list[Action]:
        if self._restart_at is None or now < self._restart_at:
            return []
        actions: list[Action] = []
        if self._release_pending:
            if self._release_wait_until is None or now < self._release_wait_until:
                return []
            # The release hangs (a store that stopped answering mid-request): do not wait for
            # it forever with no worker; the jobs it did not release come back by their leases.
            self._release_pending = False
            self.in_flight.clear()
            actions.append(
                Log(
                    "release_failed",
                    "the crashed worker's jobs were not released within the release margin; "
                    "starting a new worker (they come back when their leases expire)",
                    level=logging.ERROR,
                    fields={"error": "timed out", "release_margin": self.release_margin},
                )
            )
        self._restart_at = None
        self._release_wait_until = None
        self.child_alive = True
        self.child_returncode = None
        return [
            *actions,
            Log("worker_restarting", "starting a new worker process", level=logging.WARNING),
            StartChild(),
        ]

    def _on_signal_while_restarting(self, signum: int, now: float) -> list[Action]:
        # No worker to drain: do not start one; stop once the dead one's release is done.
        self._restart_at = None
        name = _signal_name(signum)
        self.deadlines = Deadlines.after(now, 0.0, self.release_margin)
        self.drain_started_at = now
        self.shutdown_reason = name
        actions: list[Action] = [
            Log(
                "signal_received",
                f"{name} received while the worker was being restarted; not restarting it",
                fields={"signal": name},
            )
        ]
        if self._release_pending:
            self.state = State.RELEASING
            return actions
        return actions + self._finish(now)
