"""The bounded drain: SIGTERM stops the dequeuing at once; request_stop and release follow.

A stop never raises from the signal handler into RQ's blocked BLPOP (a job Redis had already
popped would be lost): the handler sets flags, the upkeep thread pushes a token on a wake key of
this worker's own, and the dequeue returns. ``release`` takes the lease from the job before it
stops it, so nothing the job writes afterwards counts.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import redis
import redis.exceptions
from rq.utils import as_text
from rq.worker.base import WorkerStatus

from workerkit.engines.leasewatch import WAKE_SIGNAL
from workerkit.engines.presence import PAUSE_REFRESH
from workerkit.engines.rq.outage import RetryUnreachable
from workerkit.engines.rq.poison import describe_entry
from workerkit.engines.rq.startup import UNREACHABLE, retry_delays
from workerkit.engines.rq.state import TICK, WorkerState
from workerkit.events import WorkerStopping
from workerkit.job import request_stop_all
from workerkit.timing.deadlines import Deadlines

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

__all__ = ("Drain",)

log = logging.getLogger("workerkit.engines.rq")

WAKE_TOKEN: Final = b"wake"


#: How long the teardown waits for RQ's pubsub thread (a daemon) to end.
_PUBSUB_JOIN: Final = 0.1


def _stop_pubsub_thread(thread: Any, timeout: float) -> None:
    """Ask redis-py's pubsub thread to end; wait at most ``timeout`` for it.

    redis-py 8's ``stop()`` joins the thread, without a bound unless given one: once
    unsubscribed, the thread waits up to RQ's ``sleep_time`` (60 s) for a subscription, and an
    idle worker's exit waited with it until the supervisor killed it at its kill deadline
    (outcome ``forced``; seen in about one SIGTERM in five on a loaded machine). Earlier
    versions' ``stop()`` takes no argument and returns at once.
    """
    if "timeout" in inspect.signature(thread.stop).parameters:
        thread.stop(timeout=timeout)
    else:
        thread.stop()
        thread.join(timeout=timeout)


class Drain(WorkerState):
    """Stopping: the signal handlers, the supervisor's commands, the deadlines, the dequeue."""

    def unsubscribe(self) -> None:
        """RQ's unsubscribe without its wait of up to a second for the pubsub thread.

        The thread is a daemon blocked reading the subscription; the process is about to exit,
        and an idle worker must be gone within half a second of SIGTERM.
        """
        thread = getattr(self, "pubsub_thread", None)
        pubsub = getattr(self, "pubsub", None)
        if thread is None or pubsub is None:
            return
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            pubsub.unsubscribe()
        _stop_pubsub_thread(thread, _PUBSUB_JOIN)
        if not thread.is_alive():
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                pubsub.close()

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._wk_on_stop_signal)
        # Under the supervisor a terminal's Ctrl-C reaches the whole process group; the
        # supervisor decides (and sends us SIGTERM). Run on its own, Ctrl-C is a SIGTERM.
        if self._wk_supervised:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGINT, self._wk_on_stop_signal)

    def _wk_on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        # Flags only, and a byte on the upkeep thread's pipe: that thread does the rest (wakes
        # the dequeue, tells the supervisor) at once.
        self._stop_requested = True  # RQ's own flag: its loop stops after the job in hand
        self._wk_signals += 1
        if self._wk_stop_at is None:
            self._wk_stop_at = time.monotonic()
        if self._wk_upkeep is not None:  # none before bootstrap: it checks the flags at start
            self._wk_upkeep.wake()

    def _wk_on_command(self, command: str, message: dict[str, Any]) -> None:
        if command == "request_stop":
            self._wk_request_stop_jobs()
        elif command == "release":
            self._wk_release_now()

    def wk_release_now_and_stop(self) -> None:
        """The supervisor is gone, or SIGQUIT: dequeue nothing more, release the job in hand
        now (no drain window: nobody keeps the deadlines any more), and exit."""
        self._stop_requested = True
        if self._wk_stop_at is None:
            self._wk_stop_at = time.monotonic()
        self._wk_release_now()

    def _wk_begin_stopping(self) -> None:
        if self._wk_stopping or os.getpid() != self._wk_pid:
            # A copy of the worker in a forked child (a work horse) fetches nothing: it has no
            # fetching to stop and no stop to announce. Only the fetching process says it stopped,
            # and only once its own loop can start no job (the flag first).
            return
        self._wk_stopping = True
        self._stop_requested = True
        running = 1 if self._wk_attempt is not None else 0
        self._wk_send(WorkerStopping(running))
        log.info("stopped dequeuing", extra={"event": "worker_stopping", "running": running})
        with (
            contextlib.suppress(redis.exceptions.RedisError),
            self._wk_redis.pipeline() as pipeline,
        ):
            pipeline.lpush(self._wk_wake_key, WAKE_TOKEN)
            pipeline.expire(self._wk_wake_key, 60)
            pipeline.execute()

    def _wk_request_stop_jobs(self) -> None:
        self._wk_begin_stopping()
        self._wk_jobs_stop_requested = True
        attempt = self._wk_attempt
        if attempt is None:
            return
        attempt.stop_requested = True
        if attempt.stop_pipe is not None:
            with contextlib.suppress(OSError):
                os.write(attempt.stop_pipe, b"s")
            if pid := self.horse_pid:  # its watchdog, which reads the pipe, may not run yet
                with contextlib.suppress(OSError):
                    os.kill(pid, WAKE_SIGNAL)
        else:
            request_stop_all()
        log.info(
            "stop requested for the running job",
            extra={"event": "jobs_stop_requested", "job_id": attempt.keys.job_id},
        )

    def _wk_release_now(self) -> None:
        """Take the running attempt back from its job and release it (the release deadline)."""
        self._wk_begin_stopping()
        self._wk_release_requested = True
        with self._wk_lock:
            attempt = self._wk_attempt
            if attempt is None or attempt.releasing or attempt.horse_done.is_set():
                return
            try:
                taken = self._wk_leases.transition(attempt.keys, ["run"], "release")
            except redis.exceptions.RedisError as exc:
                log.warning(
                    "cannot release: Redis unavailable",
                    extra={"event": "release_failed", "error": str(exc)},
                )
                return
            if not taken:
                return  # it is settling (finishing) right now, or it is no longer ours
            attempt.releasing = True
        log.info(
            "releasing the running job",
            extra={"event": "job_releasing", "job_id": attempt.keys.job_id},
        )
        self._wk_interrupt(attempt)

    def _wk_stop_pending(self) -> bool:
        # A method, not the attribute: a signal handler may set it between any two lines.
        return self._stop_requested

    def _wk_local_deadlines(self) -> None:
        # Without a supervisor the worker keeps the timeline itself: the supervisor's instants
        # (request a stop at D, release at D + M/2), from the first stop signal.
        stop_at = self._wk_stop_at
        if stop_at is None:
            return
        settings = self.wk_settings
        deadlines = Deadlines.after(stop_at, settings.drain_window, settings.release_margin)
        now = time.monotonic()
        if now >= deadlines.request_stop_at and not self._wk_jobs_stop_requested:
            self._wk_request_stop_jobs()
        if now >= deadlines.release_at and not self._wk_release_requested:
            self._wk_release_now()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue, with a private wake-up key so that SIGTERM stops it without a raise.

        RQ stops an idle worker by raising from its signal handler in the middle of BLPOP; a job
        that Redis had already popped when that happened is lost. Here the handler only sets a
        flag, the upkeep thread pushes a token on a key of this worker's own, and BLPOP returns
        it. A job popped just as the stop came is pushed back to the front of its queue.

        Paused queues (the dashboard's ``workerkit:paused``, read at most once a second) are left
        out of the pop, and a pop blocks at most ``PAUSE_REFRESH`` so that a pause takes effect
        within a second or two; with every queue paused the worker waits on its wake key alone.
        RQ's worker heartbeat keeps its own pace (every ``timeout`` seconds, as RQ's loop).
        """
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        wait = 1.0
        idle_since = time.monotonic()
        beat_at: float | None = None
        while True:
            if self._stop_requested:
                return None
            popped: tuple[Queue, bytes] | None = None
            try:
                if beat_at is None or time.monotonic() - beat_at >= (timeout or 0):
                    self.heartbeat()
                    beat_at = time.monotonic()
                self._wk_push_back_popped()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                keys = self._wk_active_keys()
                if timeout is None:  # burst mode
                    reply = next(
                        (
                            (key, job_id)
                            for key in keys
                            if (job_id := self.connection.lpop(key)) is not None
                        ),
                        None,
                    )
                    if reply is None:
                        return None
                else:
                    block = max(1, min(timeout, math.ceil(PAUSE_REFRESH)))
                    if max_idle_time is not None:
                        left = max_idle_time - (time.monotonic() - idle_since)
                        if left <= 0:
                            return None
                        block = max(1, min(block, math.ceil(left)))
                    reply = self.connection.blpop([*keys, self._wk_wake_key], block)
                    if reply is None:
                        continue
                wait = 1.0
                key, entry = as_text(reply[0]), bytes(reply[1])
                if key == self._wk_wake_key:
                    continue
                if self._wk_stop_pending():
                    # Popped as the stop came: it never started, so it goes back where it was.
                    self.connection.lpush(key, entry)
                    return None
                queue = self._wk_queue_by_key[key]
                popped = (queue, entry)
                job = self._wk_take(queue, entry)
                if job is None:
                    continue  # no such job (RQ skips it), or refused with the reason
                self.reorder_queues(reference_queue=queue)
                # RQ's INFO line; workerkit's job_started says it (one line per job less).
                self.log.debug("Worker %s: %s: %s", self.name, queue.name, job.id)
                self.heartbeat()
                return job, queue
            except UNREACHABLE as exc:
                if popped is not None:
                    self._wk_popped = popped  # pushed back once Redis answers, if nobody has it
                self.log.error(
                    "Worker %s: cannot reach Redis (%s); retrying in %.0f s", self.name, exc, wait
                )
                self._wk_sleep_unless_stopped(wait)
                wait = min(wait * 2, 30.0)

    def _wk_active_keys(self) -> list[str]:
        """The queue keys to pop from now: the worker's queues in order, less the paused."""
        ordered = self._ordered_queues
        active = set(self._wk_paused.active([queue.name for queue in ordered]))
        return [queue.key for queue in ordered if queue.name in active]

    def _wk_push_back_popped(self) -> None:
        """A job id popped just as Redis went away: back to the front of its queue, unless it
        is there again (an append-only file written before the pop), not queued any more, or
        leased. Raises while Redis is still unreachable (the caller waits and comes back)."""
        if self._wk_popped is None:
            return
        queue, entry = self._wk_popped
        try:
            job_id = entry.decode("utf-8")
        except UnicodeDecodeError:
            job_id = None  # a poison entry: dead-lettered when it comes by again, not here
        pushed = job_id is not None and self._wk_leases.push_back(queue.name, job_id)
        self._wk_popped = None
        if pushed:
            log.warning(
                "job id popped as Redis went away pushed back to the front of its queue",
                extra={"event": "popped_job_pushed_back", "job_id": job_id, "queue": queue.name},
            )

    def _wk_push_back_on_exit(self) -> None:
        """A popped id still held as the worker exits (its start gave up at the release, or it
        was popped as Redis went away): pushed back, retried while Redis is unreachable, for up
        to a quarter of M (the supervisor kills a worker 0.8 M after the drain, the release at
        0.5 M). Logged with the job id when Redis stays away longer: the id is lost."""
        if self._wk_popped is None:
            return
        queue, entry = self._wk_popped
        job_id = describe_entry(entry)
        bound = time.monotonic() + 0.25 * self.wk_settings.release_margin
        retry = RetryUnreachable(
            "popped job push back", job_id, lease_until=lambda: math.inf, until=lambda: bound
        )
        try:
            retry.run(self._wk_push_back_popped)
        except UNREACHABLE as exc:
            log.error(
                "a popped job id could not be pushed back: Redis stayed unreachable; "
                "enqueue it again",
                extra={
                    "event": "popped_job_lost",
                    "job_id": job_id,
                    "queue": queue.name,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )

    def _wk_sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop_requested:
            time.sleep(TICK)

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's ``rq suspend`` check, which opens each turn of its loop; waits while Redis is down.

        RQ's loop ends the worker on any error; Redis restarting between two jobs must not.
        """
        delays = retry_delays()
        while not self._stop_requested:
            try:
                super().check_for_suspension(burst)  # type: ignore[misc]
                return
            except UNREACHABLE as exc:
                wait = next(delays)
                reason = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "cannot reach Redis (%s); retrying in %.1f s",
                    reason,
                    wait,
                    extra={"event": "store_reconnect_retry", "reason": reason, "retry_in": wait},
                )
                self._wk_sleep_unless_stopped(wait)
