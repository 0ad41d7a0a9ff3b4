"""workerkit's RQ workers: :class:`Worker` (forks a work horse per job) and :class:`SimpleWorker`.

They are RQ worker subclasses, so ``rq worker --worker-class workerkit.engines.rq.Worker`` runs
them too; ``workerkit run rq`` runs :func:`main` (``python -m workerkit.engines.rq``) under the
supervisor. The work horse dies with its worker (``PR_SET_PDEATHSIG``), so that it can never run
on, unleased, after its worker is gone. How it all works: docs/engines/rq.md.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, NoReturn

import redis
import redis.exceptions
from rq import SimpleWorker as RqSimpleWorker
from rq import Worker as RqWorker
from rq.timeouts import HorseMonitorTimeoutException
from rq.utils import now

from workerkit import exitcodes
from workerkit.engines.leasewatch import GUARD_IDLE, WAKE_SIGNAL, LeaseGuard, Watchdog
from workerkit.engines.lifeline import Lifeline, stop_children
from workerkit.engines.rq.attempt import Attempts
from workerkit.engines.rq.options import parse_worker_args
from workerkit.engines.rq.perform import Perform
from workerkit.engines.rq.startup import (
    UNREACHABLE,
    StartupInterrupted,
    install_startup_signals,
    wait_for_redis,
)
from workerkit.engines.rq.state import released_or_lost
from workerkit.engines.rq.tasks import load_app
from workerkit.engines.rq.upkeep import Upkeep
from workerkit.errors import ConfigurationError, JobInterrupted, StoreUnavailable
from workerkit.events import SOCKET_ENV
from workerkit.job import request_stop_all
from workerkit.proctree import descendants, load_libc, prctl

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

    from workerkit.engines.rq.state import Attempt
    from workerkit.events import Outcome

__all__ = ("WORKER_CLASSES", "SimpleWorker", "Worker", "main")

log = logging.getLogger("workerkit.engines.rq")

# The work horse's exit status tells its parent how the attempt ended (the parent reports
# job_finished, so the supervisor sees job_started and job_finished on one connection, in order).
_HORSE_CODES: Final[dict[Outcome, int]] = {
    "succeeded": 0,
    "failed": 64,
    "retried": 65,
    "timed_out": 66,
    "released": 67,
    "lease_lost": 68,
    "deferred": 70,
    "skipped_duplicate": 71,
}
_HORSE_OUTCOMES: Final[dict[int, Outcome]] = {code: name for name, code in _HORSE_CODES.items()}
_HORSE_INTERRUPTED: Final = 69  # stopped by our SIGTERM; the parent settles the attempt
#: Between the horse's SIGTERM to its job's leftover subprocesses and their SIGKILL; short, as
#: the parent's own SIGKILL of a released horse follows its SIGTERM by 0.1 to 1 s.
_HORSE_CHILDREN_GRACE: Final = 0.2
_PR_SET_PDEATHSIG: Final = 1


def _parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process (a work horse) when its parent dies (libc was looked
    up by the parent, before the fork)."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Workerkit(Upkeep, Attempts, Perform):
    """What workerkit adds to an RQ worker: the drain, upkeep, attempt and perform mixins."""


class Worker(_Workerkit, RqWorker):
    """The forking worker: each job runs in a work horse forked for it (RQ's default)."""

    forking = True

    def execute_job(self, job: Job, queue: Queue) -> None:
        if not self._wk_begin(job):
            return  # not ours to run (or held, to be pushed back)
        attempt = self._wk_attempt
        assert attempt is not None
        try:
            self.fork_work_horse(job, queue)
            outcome = self.monitor_work_horse(job, queue)
        finally:
            attempt.horse_done.set()
        self._wk_end(job, attempt, outcome)
        self._wk_idle()

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        attempt = self._wk_attempt
        assert attempt is not None
        read_end, write_end = os.pipe()
        attempt.share()  # the settling flag and the last renewal, seen by the horse too
        self._wk_publish_lease(attempt.renewed_at())  # the horse's watchdog reads it
        load_libc()  # once, here: the horse's parent-death signal needs no lookup
        guarded = self._wk_guarded()
        child_pid = os.fork()
        if child_pid == 0:  # pragma: no cover - the work horse
            # First: the parent's objects go to the permanent generation, so that no collection
            # here writes to their headers and copies their pages (~3 % of a no-op job's horse's
            # page faults in a running worker; half of them in one forked right after its
            # imports, while they were young). The parent is not changed.
            gc.freeze()
            os.close(write_end)
            try:
                os.setpgrp()
                os.environ["RQ_WORKER_ID"] = self.name
                os.environ["RQ_JOB_ID"] = job.id
                self._wk_start_watchdog(attempt, read_end, guarded)
                self.main_work_horse(job, queue)
            finally:
                os._exit(_HORSE_INTERRUPTED)
        os.close(read_end)
        attempt.stop_pipe = write_end
        self._horse_pid = child_pid
        if self._wk_lease_clock is not None:
            self._wk_lease_clock.watch(child_pid)  # the guard's to watch
        self.procline(f"Forked {child_pid} at {time.time()}")

    def _wk_guarded(self) -> bool:
        """Whether a lease guard watches the horses (started at the worker's start, or at the
        first job; False once it has ended: each horse then starts its own watchdog thread, as
        without a guard)."""
        clock = self._wk_lease_clock
        if clock is None or threading.current_thread() is not threading.main_thread():
            return False  # a handler can only be installed from the main thread
        if self._wk_guard is None:
            # Installed before the first fork, so every horse has it from its first instant.
            signal.signal(WAKE_SIGNAL, self._wk_on_wake)
            self._wk_guard = LeaseGuard(clock, log)
            try:
                self._wk_guard.start()
            except OSError as exc:  # no process to spare: each horse watches its own lease
                log.warning(
                    "could not start the lease guard: each work horse watches its own lease",
                    extra={"event": "lease_guard_failed", "error": str(exc)},
                )
                return False
            return True
        return self._wk_guard.alive()

    def _wk_on_wake(self, signum: int, frame: FrameType | None) -> None:
        """WAKE_SIGNAL: in a work horse, start its lease watchdog (the guard: the lease runs
        short; the parent: a stop request waits in the pipe). In the worker, nothing. Only an
        attribute write and a bare thread's start: a handler runs between two bytecodes of the
        job and must not take any lock the job may hold. (Only a horse makes a watchdog; one
        woken before it has made it starts it at once, ``_wk_start_watchdog``.)"""
        self._wk_woken_in = os.getpid()
        watchdog = self._wk_watchdog
        if watchdog is not None:
            watchdog.start()

    def _wk_start_watchdog(  # pragma: no cover - the horse
        self, attempt: Attempt, stop_pipe: int, guarded: bool
    ) -> None:
        """In the horse: stop the job before the lease its parent renews can expire, and turn
        the parent's ``request_stop`` (a byte on ``stop_pipe``) into the job context's.

        With the parent stopped (SIGSTOP, a wedged main loop) nobody renews the lease; the
        watchdog marks the job's lease lost (a cooperative job stops), raises JobInterrupted
        into it (our SIGTERM handler) and has the kernel kill the horse (SIGALRM) before the
        lease expires and another worker takes the job (engines/leasewatch.py). One thread
        does both. Under a guard it starts only when woken (``_wk_on_wake``), or at once when
        the lease is already short: most jobs end long before, and a thread per horse made each
        of its copy-on-write faults dearer (bench/README.md, "eleventh round").
        """
        clock = self._wk_lease_clock
        assert clock is not None  # made for every forking worker (state.py)
        self._wk_watchdog = Watchdog(
            clock,
            log,
            raise_signal=signal.SIGTERM,
            reset_alarm=True,  # RQ's job timeout has a handler on SIGALRM
            on_stop=attempt.mark_watchdog_stopped,
            wake_fd=stop_pipe,
            on_wake=self._wk_horse_stop_requested,
        )
        left = clock.left()
        short = left is None or left < clock.stop_at + GUARD_IDLE
        if not guarded or short or self._wk_woken_in == os.getpid():
            self._wk_watchdog.start()

    def _wk_horse_stop_requested(self) -> None:  # pragma: no cover - the horse
        """In the horse: the parent asked the job to stop (``request_stop``)."""
        attempt = self._wk_attempt
        if attempt is not None:
            attempt.stop_requested = True
        request_stop_all()

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        self._wk_guarded()  # the lease guard from the start, not on the first job's way

    def teardown(self) -> None:
        super().teardown()
        if not self._is_horse and self._wk_guard is not None:
            self._wk_guard.stop()

    def setup_work_horse_signals(self) -> None:
        """The horse ignores Ctrl-C (its parent decides); SIGTERM, from its parent, interrupts.

        The exception is raised from the handler on purpose: it interrupts even a blocking
        call (``time.sleep``) and lets the job's ``finally`` blocks run, and the parent has
        already taken the lease, so nothing the job writes afterwards counts.
        """
        _parent_death_signal()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        def interrupted(signum: int, frame: FrameType | None) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once; the parent SIGKILLs if need be
            raise JobInterrupted

        signal.signal(signal.SIGTERM, interrupted)

    def main_work_horse(self, job: Job, queue: Queue) -> None:  # pragma: no cover - the horse
        code = _HORSE_INTERRUPTED
        try:
            import random

            random.seed()
            self.setup_work_horse_signals()
            self._is_horse = True
            self.perform_job(job, queue)
            attempt = self._wk_attempt
            outcome = attempt.outcome if attempt is not None else None
            code = _HORSE_INTERRUPTED if outcome is None else _HORSE_CODES[outcome]
            if outcome == "released" and attempt is not None and attempt.releasing:
                code = _HORSE_INTERRUPTED  # the parent releases it
        except BaseException:
            code = _HORSE_INTERRUPTED
        finally:
            # The attempt ends with the horse: so do the subprocesses its job left running
            # (re-parented, they would run on beside the next attempt).
            with contextlib.suppress(BaseException):
                stop_children(_HORSE_CHILDREN_GRACE)
            logging.shutdown()
            os._exit(code)

    def monitor_work_horse(self, job: Job, queue: Queue) -> Outcome:
        """Wait for the horse (RQ's loop, heartbeats included); return the attempt's outcome."""
        attempt = self._wk_attempt
        assert attempt is not None
        ret_val: int | None = None
        killed_for_timeout = False
        job.started_at = now()
        while True:
            try:
                with self.death_penalty_class(
                    self.job_monitoring_interval, HorseMonitorTimeoutException
                ):
                    _, ret_val, _ = self.wait_for_horse()
                break
            except HorseMonitorTimeoutException:
                assert job.started_at is not None
                # RQ's bookkeeping, best effort: Redis restarting under a running job must not
                # end the worker (the job runs on; the upkeep thread keeps its lease).
                working = (now() - job.started_at).total_seconds()
                self.current_job_working_time = working
                with contextlib.suppress(redis.exceptions.RedisError):
                    self.set_current_job_working_time(working)
                if job.timeout != -1 and working > (job.timeout or 0) + 60:
                    self.heartbeat(self.job_monitoring_interval + 60)
                    killed_for_timeout = True
                    self.kill_horse()
                    self.wait_for_horse()
                    break
                with contextlib.suppress(redis.exceptions.RedisError):
                    self.maintain_heartbeats(job)
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
        self.current_job_working_time = 0
        with contextlib.suppress(redis.exceptions.RedisError):
            self.set_current_job_working_time(0)
        horse, self._horse_pid = self._horse_pid, 0
        clock = self._wk_lease_clock
        by_guard = clock is not None and clock.killed_by_guard(horse)
        if clock is not None:
            clock.watch(0)
        attempt.horse_done.set()
        return self._wk_after_horse(job, queue, attempt, ret_val, killed_for_timeout, by_guard)

    def _wk_after_horse(
        self,
        job: Job,
        queue: Queue,
        attempt: Attempt,
        ret_val: int | None,
        killed_for_timeout: bool,
        by_guard: bool,
    ) -> Outcome:
        code = os.waitstatus_to_exitcode(ret_val) if ret_val is not None else None
        if self._wk_released_by_us(attempt):  # the horse has exited
            return self._wk_settle_taken(job, attempt)
        # Stopped by its watchdog (lease_lost, or killed at the deadline), or killed by the
        # lease guard (its job's code still running with the lease about to expire), and
        # settled nothing: the same end, not a crash (the job did not kill its horse).
        unsettled = code is None or _HORSE_OUTCOMES.get(code, "lease_lost") == "lease_lost"
        if (attempt.watchdog_stopped or by_guard) and unsettled:
            return self._wk_after_watchdog(job, attempt, code, by_guard)
        if code in _HORSE_OUTCOMES:
            attempt.rq_settled = _HORSE_OUTCOMES[code] in (
                "succeeded",
                "skipped_duplicate",
                "failed",
                "retried",
                "timed_out",
            )
            return _HORSE_OUTCOMES[code]
        if attempt.lease_lost:
            return "lease_lost"
        if self._stopped_job_id == job.id or killed_for_timeout:
            # RQ's own two reasons to kill a horse: `rq` stop-job, and a horse wedged past its
            # timeout. RQ fails the job (or retries it with Retry); so do we, fenced.
            if not self._wk_claim_settle(attempt):
                return "lease_lost"
            if self._stopped_job_id == job.id and job.stopped_callback:
                job.execute_stopped_callback(self.death_penalty_class)
            message = (
                "Job stopped by user, work-horse terminated."
                if self._stopped_job_id == job.id
                else f"Work-horse killed: still running {job.timeout}s + 60s after it started"
            )
            self.handle_job_failure(job, queue=queue, exc_string=message)
            return "timed_out" if killed_for_timeout else "failed"
        # The horse died on its own (out of memory, a segfault, a kill): a crash. The attempt
        # stays consumed; the job goes back to the front of its queue, or fails when it is out
        # of attempts. The horse is dead, so requeuing now cannot make it run twice.
        described = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        log.warning(
            "work horse died",
            extra={"event": "work_horse_died", "job_id": job.id, "status": described},
        )
        try:
            outcome = self._wk_recovery.recover(
                attempt.keys, ["run", "settle"], f"its work horse died ({described})"
            )
        except redis.exceptions.RedisError:
            outcome = None
        return outcome or "lease_lost"

    def _wk_after_watchdog(
        self, job: Job, attempt: Attempt, code: int | None, by_guard: bool
    ) -> Outcome:
        """The horse's watchdog stopped the job, or the lease guard killed the horse (this
        process did not renew the lease in time: stopped, or wedged), and the horse settled
        nothing. Awake again: the job goes back to its queue, attempt given back, only while
        the lease is still ours (fenced); otherwise another worker has it, or crash recovery
        will."""
        log.warning(
            "the lease guard killed the work horse: this worker had stopped renewing its lease"
            if by_guard
            else "the work horse stopped its job: this worker had stopped renewing its lease",
            extra={
                "event": "lease_expired_in_horse",
                "job_id": job.id,
                "status": code,
                "by": "lease_guard" if by_guard else "watchdog",
            },
        )
        return released_or_lost(
            job.id,
            lambda: self._wk_recovery.release(attempt.keys, ["run"], give_back=True),
            "release failed; the lease will expire and the job be recovered",
        )

    def _wk_interrupt(self, attempt: Attempt) -> None:
        """Stop the horse: SIGTERM (its job's ``finally`` blocks run), SIGKILL after a grace."""
        pid = self.horse_pid
        if not pid or attempt.horse_done.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        grace = max(0.1, min(1.0, self.wk_settings.release_margin * 0.2))
        if not attempt.horse_done.wait(grace) and self.horse_pid == pid:
            # The job's subprocesses die with it, also those in sessions of their own: found
            # before the horse dies (then they are re-parented), killed each by pid.
            tree = descendants(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            for each in tree:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(each, signal.SIGKILL)


class SimpleWorker(_Workerkit, RqSimpleWorker):
    """Runs each job in the worker process itself (no fork): cheaper, less isolated.

    A job that holds the GIL for longer than the lease (a long C call that does not release it)
    stops the lease renewal thread too; use the forking :class:`Worker` for such jobs.
    """

    forking = False

    def execute_job(self, job: Job, queue: Queue) -> None:
        if not self._wk_begin(job):
            return  # not ours to run (or held, to be pushed back)
        attempt = self._wk_attempt
        assert attempt is not None
        try:
            self.perform_job(job, queue)
        except JobInterrupted:
            attempt.outcome = "released" if attempt.releasing else "lease_lost"
        outcome = (
            self._wk_settle_taken(job, attempt)
            if self._wk_released_by_us(attempt)
            else (attempt.outcome or "lease_lost")
        )
        self._wk_end(job, attempt, outcome)
        self._wk_idle()

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        signal.signal(signal.SIGUSR1, self._wk_on_interrupt_signal)

    def _wk_on_interrupt_signal(self, signum: int, frame: FrameType | None) -> None:
        # Sent by our own release (or lease loss) to the main thread, where the job runs: raising
        # here interrupts even a blocking call. Only while the job's own code runs.
        attempt = self._wk_attempt
        if attempt is not None and attempt.in_job and (attempt.releasing or attempt.lease_lost):
            attempt.in_job = False
            raise JobInterrupted

    def _wk_interrupt(self, attempt: Attempt) -> None:
        if attempt.context is not None:
            if attempt.lease_lost:
                attempt.context.mark_lease_lost()
            else:
                attempt.context.request_stop()
        with contextlib.suppress(ProcessLookupError, ValueError):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)


WORKER_CLASSES: Final[dict[str, type[Worker] | type[SimpleWorker]]] = {
    "forking": Worker,
    "simple": SimpleWorker,
}


def _exit(code: int) -> NoReturn:
    logging.shutdown()
    # The upkeep and event threads are daemons that may be blocked on a socket; the worker's
    # state in Redis is settled, so do not wait for them.
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """The RQ worker process: ``python -m workerkit.engines.rq [engine args]``.

    Redis not reachable yet: wait for it, not ready meanwhile, up to ``startup_timeout``
    (``startup.py``), then exit with STORE_UNAVAILABLE; a stop signal meanwhile exits at once.
    """
    import workerkit.loading  # noqa: F401 - load_app's, imported before the gate
    from workerkit.drill.canary import register_rq
    from workerkit.engines.startgate import wait_for_start
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    worker_args = sys.argv[1:] if argv is None else list(argv)
    # Started early by `workerkit run`: the imports ran beside the supervisor's; answer its app
    # check, then Redis only once the supervisor says go.
    wait_for_start("rq", worker_args, settings)
    try:
        args = parse_worker_args(worker_args)
        app = load_app(settings)
        register_rq(app)  # the drill's canary, in every rq worker (docs/reference/drill.md)
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "worker_config_error"})
        sys.exit(exitcodes.CONFIG_ERROR)
    worker_class = WORKER_CLASSES[args.worker_class]
    url = str(args.url or settings.redis_url)

    def build() -> Worker | SimpleWorker:
        # RQ's constructor talks to Redis (CLIENT SETNAME), hence inside the wait.
        return worker_class(
            list(settings.queue_names),
            connection=redis.Redis.from_url(url),
            app=app,
            settings=settings,
            serializer=args.serializer,
        )

    install_startup_signals(supervised=bool(os.environ.get(SOCKET_ENV)))
    built: list[Worker | SimpleWorker] = []

    def release_now() -> None:
        if not built:  # still waiting for Redis: nothing in hand
            _exit(exitcodes.OK)
        built[0].wk_release_now_and_stop()

    Lifeline(release_now).start()
    try:
        worker = wait_for_redis(url, build, settings.startup_timeout)
        # Installed before work() starts (RQ installs its handlers only after registering), so
        # a SIGTERM that arrives during startup is a warm stop too, not a kill.
        worker._install_signal_handlers()
        built.append(worker)
    except StartupInterrupted as stop:
        log.info(
            "stopped while waiting for Redis",
            extra={"event": "worker_stopped_starting", "signal": str(stop)},
        )
        _exit(exitcodes.OK)
    except StoreUnavailable:
        _exit(exitcodes.STORE_UNAVAILABLE)
    try:
        worker.work(with_scheduler=args.with_scheduler)
    except UNREACHABLE as exc:  # registering the worker, just after the wait succeeded
        worker._wk_job_events.flush()
        log.error(
            "Redis went away while the worker was starting; exiting",
            extra={"event": "store_unavailable", "reason": f"{type(exc).__name__}: {exc}"},
        )
        _exit(exitcodes.STORE_UNAVAILABLE)
    _exit(exitcodes.OK)
