"""The supervisor's runner: signals, the child, the channel, the probes and the clock, on anyio.

Everything that happens (a signal, a tick, events from job-running processes, the worker's exit,
a finished release) becomes one item of a single inbox, consumed in order by one loop: it feeds the
:class:`~workerkit.supervisor.lifecycle.Lifecycle` machine, keeps the probes' health and the
metrics up to date, and executes the actions the machine returns. One consumer: no locks, and a
total order of what the machine saw. It also sends the worker's presence record to the worker's
main process (:mod:`workerkit.supervisor.presence`) every ``PRESENCE_INTERVAL`` and at each state
change, from a task of its own so that a slow socket cannot delay a deadline. Signal handlers
are installed by :func:`supervise` before the worker starts (a SIGTERM during startup is not
lost) and restored on the way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from workerkit import events as ev
from workerkit import exitcodes
from workerkit.engines.base import AppTiming
from workerkit.engines.lifeline import SUPERVISOR_PID_ENV
from workerkit.engines.presence import PRESENCE_INTERVAL
from workerkit.errors import ConfigurationError
from workerkit.events import SOCKET_ENV
from workerkit.proctree import processes_with_env, stop_processes
from workerkit.settings import settings_to_env
from workerkit.supervisor import held_signals
from workerkit.supervisor.channel import Channel, Connection
from workerkit.supervisor.http import Health, HttpServer
from workerkit.supervisor.lifecycle import (
    BroadcastCommand,
    Exit,
    Input,
    JobFinished,
    JobStarted,
    KillChild,
    Lifecycle,
    Log,
    ReleaseCompleted,
    ReleaseInFlight,
    SignalChild,
    SignalReceived,
    StartChild,
    State,
    Tick,
    WorkerExited,
    WorkerReady,
    WorkerStopping,
)
from workerkit.supervisor.metrics import SupervisorMetrics
from workerkit.supervisor.presence import WorkerPresence
from workerkit.supervisor.process import ChildProcess, become_subreaper, descendants
from workerkit.timing import evaluate

if TYPE_CHECKING:
    from workerkit.engines.base import Engine
    from workerkit.settings import Settings
    from workerkit.supervisor.early import EarlyWorker
    from workerkit.supervisor.lifecycle import Action

__all__ = ("TICK_INTERVAL", "Supervisor", "run_supervisor", "supervise")

log = logging.getLogger(__name__)

# anyio imports its event loop backend at the first anyio.run() (~20 ms), which comes after the
# app check, on the way to ready. `workerkit run` imports this module while the worker it forked
# imports its own (cli.py): the backend is imported then, on the other core.
with contextlib.suppress(ImportError):
    importlib.import_module("anyio._backends._asyncio")

#: How often deadlines are checked, the loop's liveness is stamped, and children are reaped
#: (SIGCHLD reaps at once; the tick is the safety net for a signal coalesced or missed).
TICK_INTERVAL: Final = 0.1
#: The tick while nothing is timed (no drain, no restart pending): the loop's liveness stamp,
#: the reaping safety net and the presence record need no finer one, and an idle pod's
#: supervisor wakes once a second instead of ten times. A drain or a restart wakes it at once.
IDLE_TICK_INTERVAL: Final = 1.0
#: How long to wait, after the worker exited, for its connections to report end-of-stream: the
#: kernel closes a dead process's sockets, so its last events (job_finished...) are read first.
EXIT_EVENTS_GRACE: Final = 0.25
#: Inbox size; a flood of events slows the senders down instead of growing memory.
INBOX_SIZE: Final = 1024
#: Longest store-health reason kept for /readyz.
_MAX_REASON: Final = 200
#: The signals the supervisor acts on (docs/operations/lifecycle.md, "Signals"): SIGTERM, SIGINT
#: and SIGHUP drain; SIGQUIT releases at once. Without a handler SIGQUIT and SIGHUP would kill
#: the supervisor and orphan its worker.
_SIGNALS: Final = held_signals.SIGNALS


@dataclass(frozen=True)
class _ChannelEvents:
    """Events from a job-running process (those of one read), on their way to the loop."""

    events: Sequence[ev.Event | ev.BadMessage]


_Item = Input | _ChannelEvents


class Supervisor:
    """One supervisor run: build it, then ``await supervisor.run()`` for the exit code.

    ``handle_signals=False`` leaves the process's signal handlers alone (for embedding, and for
    tests); call :meth:`stop` instead.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        handle_signals: bool = True,
        clock: Callable[[], float] = time.monotonic,
        early: EarlyWorker | None = None,
    ) -> None:
        self.settings = settings
        #: The worker already spawned and waiting at its start gate (supervisor/early.py).
        self.early = early
        self.engine = engine
        self.handle_signals = handle_signals
        self.clock = clock
        # Engines whose jobs run inside the worker process (sql) have it restarted after a crash.
        self.machine = Lifecycle.from_settings(
            settings, restart_crashed=bool(getattr(engine, "restarts_worker", False))
        )
        self.health = Health(settings.liveness_timeout, clock=clock)
        self.metrics = SupervisorMetrics(
            getattr(engine, "name", settings.engine),
            scheduler=bool(getattr(engine, "runs_scheduler", False)),
        )
        self.child: ChildProcess | None = None
        self.channel: Channel | None = None
        self.http: HttpServer | None = None
        self._send, self._receive = anyio.create_memory_object_stream[_Item](INBOX_SIZE)
        self._state = self.machine.state
        self._exit: Exit | None = None
        self._releasing: tuple[str, ...] = ()
        self._exit_reported = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._release_prepared = False
        #: The worker process's presence (a new one per worker process), when its record is
        #: due next, and whether the state changed since the last one was sent.
        self.presence: WorkerPresence | None = None
        self._presence_due = 0.0
        self._presence_changed = False
        self._tick_wake: anyio.Event | None = None  # set: the idle tick's wait ends now

    # --- public -------------------------------------------------------------------------------

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Act as if ``signum`` was received (call from the supervisor's event loop)."""
        if self.channel is not None:
            self.channel.read_promptly()
        self._send.send_nowait(SignalReceived(signum, self.clock()))

    async def run(self) -> int:
        """Run until the lifecycle ends; return the exit code."""
        with self._send, self._receive:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    signals: AsyncIterator[signal.Signals] | None = None
                    if self.handle_signals:
                        signals = stack.enter_context(
                            anyio.open_signal_receiver(*_SIGNALS, signal.SIGCHLD)
                        )
                        for signum in held_signals.take():  # received while the CLI started
                            self.stop(signum)
                        # Orphans of the worker's tree (a job's subprocess whose parent exited)
                        # come to us rather than to init: we reap them, and stop them at exit.
                        become_subreaper()
                    directory = self.early.directory if self.early is not None else None
                    self.channel = await stack.enter_async_context(
                        Channel(self._on_events, directory=directory)
                    )
                    if self.settings.http_port:
                        try:
                            self.http = await stack.enter_async_context(
                                HttpServer(
                                    self.health,
                                    self.metrics.registry,
                                    self.settings.http_host,
                                    self.settings.http_port,
                                )
                            )
                        except OSError as exc:
                            log.error(
                                "cannot listen for HTTP probes",
                                extra={
                                    "event": "http_bind_failed",
                                    "host": self.settings.http_host,
                                    "port": self.settings.http_port,
                                    "error": str(exc),
                                },
                            )
                            return exitcodes.STARTUP_FAILED
                    if self.early is not None:
                        self._adopt(self.early)
                    elif not self._start_child(self.channel):
                        return exitcodes.STARTUP_FAILED
                    task_group = await stack.enter_async_context(anyio.create_task_group())
                    self._task_group = task_group
                    if signals is not None:
                        task_group.start_soon(self._receive_signals, signals)
                    task_group.start_soon(self._tick)
                    code = await self._loop()
                    task_group.cancel_scope.cancel()
                    return code
            finally:
                if self.early is not None:
                    self.early.abandon()  # refused before the gate opened (else: nothing)
                self._kill_leftovers()

    # --- startup ------------------------------------------------------------------------------

    def _adopt(self, early: EarlyWorker) -> None:
        """Take the early worker as our child and open its gate (the checks passed, the
        channel and the probes listen)."""
        self.child = early.child
        assert early.child.pid is not None
        if not getattr(self.engine, "runs_scheduler", False):
            self.presence = WorkerPresence(self.metrics.engine, early.child.pid, time.time())
        early.go()
        log.info(
            "worker process started",
            extra={"event": "worker_started", "pid": early.child.pid, "argv": early.child.argv},
        )

    def _start_child(self, channel: Channel) -> bool:
        try:
            argv = self.engine.worker_command(self.settings)
        except Exception as exc:
            log.exception(
                "cannot build the worker command",
                extra={"event": "worker_start_failed", "error": str(exc)},
            )
            return False
        env = {
            **os.environ,
            **settings_to_env(self.settings),
            **channel.child_env(),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        child = ChildProcess(argv, env)
        try:
            pid = child.start()
        except OSError as exc:
            log.error(
                "cannot start the worker",
                extra={"event": "worker_start_failed", "argv": argv, "error": str(exc)},
            )
            return False
        self.child = child
        if not getattr(self.engine, "runs_scheduler", False):  # a scheduler is no worker
            self.presence = WorkerPresence(self.metrics.engine, pid, time.time())
        log.info(
            "worker process started",
            extra={"event": "worker_started", "pid": pid, "argv": argv},
        )
        return True

    # --- the inputs ---------------------------------------------------------------------------

    async def _on_events(
        self, connection: Connection, events: Sequence[ev.Event | ev.BadMessage]
    ) -> None:
        del connection
        item = _ChannelEvents(events)
        try:
            # No checkpoint first (anyio's send takes one): an event-loop round less per read.
            self._send.send_nowait(item)
        except anyio.WouldBlock:
            await self._send.send(item)  # the inbox is full: wait for room, lose nothing

    async def _receive_signals(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            if signum == signal.SIGCHLD:
                self._reap()
                continue
            # Readiness turns false here, before the signal even reaches the state machine
            # through the inbox: a probe served in between must not still say "ok".
            self.health.signal_received(signal.Signals(signum).name)
            if self.channel is not None:
                self.channel.read_promptly()  # the jobs' events from now on, as they come
            self._prepare_release()
            await self._send.send(SignalReceived(int(signum), self.clock()))

    async def _tick(self) -> None:
        while True:
            now = self.clock()
            self.health.tick(now)
            self._reap()
            await self._send.send(Tick(now))
            if self.machine.keeps_time:
                await anyio.sleep(TICK_INTERVAL)
                continue
            self._tick_wake = wake = anyio.Event()
            with anyio.move_on_after(IDLE_TICK_INTERVAL):
                await wake.wait()
            self._tick_wake = None

    def _reap(self) -> None:
        if self.child is None:
            return
        for pid, code in self.child.reap():
            # As PID 1 we inherit every orphan of the container; reaping them is our duty.
            log.debug(
                "reaped an exited process",
                extra={"event": "process_reaped", "pid": pid, "returncode": code},
            )
        if self.child.returncode is not None and not self._exit_reported:
            self._exit_reported = True
            assert self._task_group is not None
            self._task_group.start_soon(self._report_exit, self.child.returncode)

    async def _report_exit(self, code: int) -> None:
        if self.channel is not None:
            with anyio.move_on_after(EXIT_EVENTS_GRACE):
                await self.channel.wait_closed()
        await self._send.send(WorkerExited(code, self.clock()))

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> int:
        self._reap()  # the worker may have failed at once
        async for item in self._receive:
            await self._take(item)
            if self._exit is not None:
                return self._exit.code
        raise AssertionError("the inbox closed before the lifecycle ended")  # pragma: no cover

    async def _take(self, item: _Item) -> None:
        """Handle one item of the inbox (stops early once the lifecycle has ended)."""
        if not isinstance(item, _ChannelEvents):
            await self._handle(item)
            return
        now = self.clock()
        # One event at a time, translated and handled before the next: a batch may start a
        # job and finish it, and the finish is read against the lifecycle's jobs in flight,
        # which the start has to be in first.
        for event in item.events:
            self.metrics.apply(event)
            for machine_input in self._translate(event, now):
                await self._handle(machine_input)
                if self._exit is not None:
                    return

    async def _handle(self, event: Input) -> None:
        actions = self.machine.handle(event)
        self._sync_state()
        if self._tick_wake is not None and self.machine.keeps_time:
            self._tick_wake.set()  # a drain or a restart began: its deadlines need every tick
        for action in actions:
            await self._execute(action)
        if self._presence_changed or (type(event) is Tick and event.now >= self._presence_due):
            self._send_presence()

    def _send_presence(self) -> None:
        """Send the worker's presence record to its main process (once it said it is ready)."""
        self._presence_changed = False
        presence, channel, group = self.presence, self.channel, self._task_group
        state = self.machine.state
        if (
            presence is None
            or not presence.ready
            or channel is None
            or group is None
            or self._exit is not None
            or state is State.STOPPED
            or not self.machine.child_alive
        ):
            return
        now = self.clock()
        self._presence_due = now + PRESENCE_INTERVAL
        record = presence.record(
            str(state), self.machine.started, self.machine.deadlines, now=now, wall=time.time()
        )
        group.start_soon(channel.send_to, presence.pid, ev.PublishPresence(record))

    def _translate(self, event: ev.Event | ev.BadMessage, now: float) -> list[Input]:
        """What ``event`` means to the lifecycle and the probes (most events: metrics only)."""
        match event:
            case ev.JobsFinished(jobs=jobs):
                return self._jobs_finished(jobs)
            case ev.JobStarted(job_id=job_id, delivery=delivery):
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("job started", extra={"event": "job_started", **_fields(event)})
                if delivery is None:
                    delivery = {"job_id": job_id, "queue": event.queue}
                return [JobStarted(job_id, delivery)]
            case ev.JobPrefetched(job_id=job_id, delivery=delivery):  # sql prefetch
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("job prefetched", extra={"event": "job_prefetched", **_fields(event)})
                return [JobStarted(job_id, {**(delivery or {}), "prefetched": True})]
            case ev.PrefetchReturned(job_id=job_id):
                return [JobFinished(job_id, "prefetch_returned")]
            case ev.JobFinished(job_id=job_id, outcome=outcome):
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("job finished", extra={"event": "job_finished", **_fields(event)})
                if self.presence is not None:
                    queue = event.queue
                    if queue is None:  # its job_started named it
                        queue = self.machine.in_flight.get(job_id, {}).get("queue")
                    self.presence.finished(queue, outcome)
                return [JobFinished(job_id, outcome)]
            case ev.Heartbeat():
                self.health.heartbeat(now)
            case ev.StoreHealth(ok=ok, reason=reason):
                self.health.store_health(ok, reason[:_MAX_REASON], now)
            case ev.WorkerReady():
                self.health.worker_ready(now)
                if self.presence is not None:
                    self.presence.worker_ready(event)
                log.debug(
                    "worker ready event", extra={"event": "worker_ready_event", **_fields(event)}
                )
                return [WorkerReady(now)]
            case ev.WorkerStopping():
                return [WorkerStopping(now)]
        return []

    def _jobs_finished(self, jobs: Sequence[ev.FinishedJob]) -> list[Input]:
        # Only the jobs the lifecycle holds in flight matter to it; a batch mostly settles
        # jobs whose job_started the worker left out (started and finished in one batch).
        in_flight = self.machine.in_flight
        debug = log.isEnabledFor(logging.DEBUG)
        finished = self.presence.finished if self.presence is not None else None
        inputs: list[Input] = []
        for job in jobs:
            if debug:
                log.debug("job finished", extra={"event": "job_finished", **job._asdict()})
            if finished is not None:
                finished(job.queue, job.outcome)
            if job.job_id in in_flight:
                inputs.append(JobFinished(job.job_id, job.outcome))
        return inputs

    def _sync_state(self) -> None:
        state = self.machine.state
        if state is self._state:
            return
        self._state = state
        self._presence_changed = True
        self.health.state = str(state)
        self.health.stopping_reason = self.machine.shutdown_reason
        self.metrics.set_state(str(state))
        log.debug("state changed", extra={"event": "state_changed", "state": str(state)})

    async def _execute(self, action: Action) -> None:
        match action:
            case Log(event=event, message=message, level=level, fields=fields):
                log.log(level, message, extra={"event": event, **fields})
            case SignalChild(signum=signum):
                sent = self.child is not None and self.child.send_signal(signum)
                log.debug(
                    "signal sent to the worker",
                    extra={
                        "event": "worker_signalled",
                        "signal": signal.Signals(signum).name,
                        "sent": sent,
                    },
                )
            case BroadcastCommand(command=command):
                sent_to = await self.channel.broadcast(command) if self.channel else 0
                log.info(
                    f"command {command.name} sent",
                    extra={
                        "event": "command_sent",
                        "command": command.name,
                        "connections": sent_to,
                    },
                )
            case KillChild():
                killed = self.child.kill_tree() if self.child is not None else []
                log.warning(
                    "worker killed",
                    extra={"event": "worker_killed", "pids": killed},
                )
            case StartChild():
                await self._restart_child()
            case ReleaseInFlight(refs=refs, crashed=crashed):
                self._releasing = tuple(str(ref.get("job_id")) for ref in refs)
                self._release_in_thread(refs, crashed=crashed)
            case Exit(outcome=outcome, drain_duration=duration):
                if self._releasing and not self.machine.in_flight:
                    self.metrics.abandon(self._releasing, "released")
                self.metrics.shutdown(outcome, duration)
                self._exit = action

    async def _restart_child(self) -> None:
        """Start a new worker after a crash, once the dead one's leftovers are stopped."""
        assert self.channel is not None
        assert self.child is not None
        old = self.child
        # The dead worker's jobs' subprocesses must not run beside the jobs' next attempts.
        # Only those carrying the dead worker's socket: other orphans we adopted as PID 1 (a
        # `kubectl exec ... &`) are not the worker's, and the container goes on.
        await anyio.to_thread.run_sync(
            functools.partial(self._stop_leftover_processes, old, adopted=False)
        )
        self._exit_reported = False
        self.health.heartbeat(self.clock())  # the new worker's heartbeat clock starts now
        if not self._start_child(self.channel):
            self.child = old
            await self._handle(WorkerExited(exitcodes.STARTUP_FAILED, self.clock()))

    def _prepare_release(self) -> None:
        """Have the engine import what a release needs, in a thread, once a drain begins.

        The engine's libraries stay out of the supervisor while it supervises (issue 16); a
        release after the kill has only the last part of the margin, too short to import
        SQLAlchemy or Celery then, while the drain before it lasts seconds.
        """
        prepare = getattr(self.engine, "prepare_release", None)
        if self._release_prepared or prepare is None:
            return
        self._release_prepared = True
        settings = self.settings

        def run() -> None:
            try:
                prepare(settings)
            except Exception as exc:  # the release retries the import and says what is wrong
                log.warning(
                    "cannot prepare the release",
                    extra={"event": "release_prepare_failed", "error": str(exc)},
                )

        threading.Thread(target=run, name="workerkit-prepare-release", daemon=True).start()

    def _release_in_thread(self, refs: Sequence[Mapping[str, Any]], *, crashed: bool) -> None:
        # A daemon thread, not anyio.to_thread: a store that hangs must not keep the process
        # alive past the exit deadline (anyio's worker threads are joined at interpreter exit).
        token = anyio.lowlevel.current_token()
        settings, engine, clock, send = self.settings, self.engine, self.clock, self._send
        dead = self.child if crashed and self.child is not None and not self.child.running else None

        def release() -> None:
            error: str | None = None
            released = 0
            if dead is not None:
                # A job's subprocesses must be gone before the job can be run again elsewhere
                # (an OOM-killed worker's ffmpeg would write beside its next attempt).
                with contextlib.suppress(Exception):
                    self._stop_leftover_processes(dead, adopted=False)
            try:
                released = engine.release_in_flight(settings, list(refs), crashed=crashed)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(RuntimeError, anyio.ClosedResourceError):
                anyio.from_thread.run(
                    send.send, ReleaseCompleted(released, clock(), error), token=token
                )

        threading.Thread(target=release, name="workerkit-release", daemon=True).start()

    def _kill_leftovers(self) -> None:
        child = self.child
        if child is None:
            return
        child.reap()
        if child.running:
            killed = child.kill_tree()
            log.warning(
                "worker still running at exit; killed",
                extra={"event": "worker_killed", "pids": killed},
            )
            # Reap it (briefly) so that we leave no zombie when we are not PID 1.
            deadline = time.monotonic() + 1.0
            while child.running and time.monotonic() < deadline:
                child.reap()
                time.sleep(0.01)
        self._stop_leftover_processes(child)

    def _stop_leftover_processes(self, child: ChildProcess, *, adopted: bool = True) -> None:
        """Stop what the worker's jobs started and left running (TERM, then KILL), by pid.

        Ours are the processes that carry this run's socket path in their environment (inherited
        from the worker, wherever they were re-parented to) and, with ``adopted``, when we are
        the process's own program rather than embedded, every process still below us (orphans
        we adopted: at the container's exit, nothing of it may outlive it).
        """
        marker = child.env.get(SOCKET_ENV)
        pids = processes_with_env(SOCKET_ENV, marker) if marker else []
        if adopted and self.handle_signals:
            pids += descendants(os.getpid())
        if not pids:
            return
        killed = stop_processes(pids, reap=child.reap)
        log.warning(
            "processes the worker's jobs started outlived it; stopped",
            extra={"event": "leftovers_stopped", "pids": sorted(set(pids)), "killed": killed},
        )


def _fields(event: ev.Event) -> dict[str, Any]:
    """An event's fields for a log line (the delivery stays out: it may name a lease token)."""
    return {
        f.name: getattr(event, f.name) for f in dataclasses.fields(event) if f.name != "delivery"
    }


def _check_budget(settings: Settings, timing: AppTiming) -> bool:
    report = evaluate(settings, timing.tasks, timing.celery)
    for finding in report.warnings:
        log.warning(
            finding.message,
            extra={"event": "timing_budget_warning", "rule": finding.rule_id},
        )
    try:
        report.raise_for_errors()
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "timing_budget_invalid"})
        return False
    return True


async def supervise(
    settings: Settings,
    engine: Engine,
    *,
    timing: AppTiming | None = None,
    handle_signals: bool = True,
    early: EarlyWorker | None = None,
) -> int:
    """The supervisor, for an already running anyio event loop; return the exit code.

    ``early``: the worker, already spawned at its start gate (supervisor/early.py); killed
    there when the supervisor refuses to start.
    """
    if not _check_budget(settings, timing or AppTiming()):
        if early is not None:
            early.abandon()
        return exitcodes.CONFIG_ERROR
    log.info(
        "supervisor starting",
        extra={
            "event": "supervisor_starting",
            "engine": getattr(engine, "name", settings.engine),
            "pid": os.getpid(),
            "grace_period": settings.grace_period,
            "drain_window": settings.drain_window,
            "release_margin": settings.release_margin,
            "http_port": settings.http_port,
        },
    )
    supervisor = Supervisor(settings, engine, handle_signals=handle_signals, early=early)
    return await supervisor.run()


def run_supervisor(
    settings: Settings,
    engine: Engine,
    *,
    timing: AppTiming | None = None,
    handle_signals: bool = True,
    early: EarlyWorker | None = None,
) -> int:
    """Run the supervisor (the container's PID 1) until it stops; return the exit code.

    Refuses to start (``exitcodes.CONFIG_ERROR``) when the timing budget of ``settings`` and
    the app's ``timing`` (its tasks' timeouts, a Celery app's settings) has errors. See
    docs/operations/lifecycle.md and docs/reference/exit-codes.md.
    """

    async def main() -> int:
        return await supervise(
            settings, engine, timing=timing, handle_signals=handle_signals, early=early
        )

    try:
        return anyio.run(main)
    except Exception:
        log.exception("supervisor failed", extra={"event": "supervisor_error"})
        return exitcodes.INTERNAL_ERROR
    finally:
        if early is not None:
            early.abandon()  # the supervisor failed before the gate opened (else: nothing)
