"""The lease deadline a Celery worker's main process shares with its pool children.

Only the main process renews the leases of the messages it holds, but a prefork pool child runs
the task: with the main process stopped (SIGSTOP, a frozen node) the child would go on after
the lease expired and another worker recovered the message. So the main process publishes, in
shared memory mapped before the pool forks, the time until which every lease it holds is known
to live, and a watchdog thread in each pool child stops its task before that time.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from workerkit.job import JobContext

__all__ = ("LEASE_LOST_REASON", "LeaseClock", "Watchdog", "now")

log = logging.getLogger("workerkit.engines.celery")

#: The reason of the Reject a run the watchdog stopped becomes (task.py): it is not settled.
LEASE_LOST_REASON: Final = "the worker lost its lease on the message (workerkit)"

#: A clock shared by every process of the host that counts a suspended node's time too (a
#: lease in Redis keeps expiring meanwhile); CLOCK_MONOTONIC where there is none.
_CLOCK: Final = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def now() -> float:
    return time.clock_gettime(_CLOCK)


class LeaseClock:
    """Until when every lease of this worker is known to live, in memory its pool shares.

    The main process calls :meth:`extend` with the start of each renewal round in which every
    lease was renewed (each lease then lives at least ``ttl`` past it in Redis, and a message
    delivered later gets its lease at delivery). A task is stopped when less than ``stop_at``
    is left (cooperatively: ``stop_requested``), the stop is raised into it at ``raise_at``
    (billiard's soft-limit signal) and its process is killed by the kernel at ``kill_at``,
    before the lease can expire and another worker restore the message.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.stop_at = ttl / 4
        self.raise_at = ttl / 8
        self.kill_at = ttl / 16
        # MAP_SHARED | MAP_ANONYMOUS: the pool children forked later see the main's writes.
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        # One aligned 64-bit word (milliseconds on _CLOCK; 0: not started, no deadline).
        self._cell = ctypes.c_int64.from_buffer(self._map)

    def extend(self, since: float) -> None:
        self._cell.value = int((since + self.ttl) * 1000)

    def left(self) -> float | None:
        """Seconds the leases are known to live, or None before the worker's first renewal."""
        value = self._cell.value
        return None if value == 0 else value / 1000 - now()

    def expiring(self) -> bool:
        """Whether a task must stop now: its lease may not outlive ``stop_at``."""
        left = self.left()
        return left is not None and left < self.stop_at


class Watchdog:
    """In a prefork pool child: stops the running task before its worker's leases expire.

    A thread that wakes every ``ttl / 16`` (at most 0.25 s) and compares the shared deadline
    with the clock; it does nothing while the main process renews. Once less than ``stop_at``
    is left it marks the task's lease lost (``stop_requested`` turns true, so a cooperative job
    checkpoints and releases), arms the kernel's interval timer so that SIGALRM (default action:
    terminate) ends the process at ``kill_at`` even if the task holds the GIL in C code, and at
    ``raise_at`` raises billiard's SoftTimeLimitExceeded into the task (SIGUSR1).
    """

    def __init__(self, clock: LeaseClock) -> None:
        self.clock = clock
        self._tick = min(0.25, clock.ttl / 16)
        self._lock = threading.Lock()
        #: The task this process runs; the one whose stop was started (kill armed), and raised.
        self._running: JobContext | None = None
        self._stopping: JobContext | None = None
        self._raised: JobContext | None = None

    def start(self) -> None:
        threading.Thread(target=self._loop, name="workerkit-lease-watchdog", daemon=True).start()

    def begin(self, context: JobContext) -> None:
        self._running = context

    def end(self, context: JobContext) -> None:
        """The task ended (in the pool child's main thread): no stop, no kill for it any more."""
        with self._lock:
            self._running = None
            if self._stopping is context:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self._stopping = None

    def _loop(self) -> None:
        while True:
            time.sleep(self._tick)
            try:
                with self._lock:
                    self._check()
            except Exception as exc:  # never let the watchdog die quietly
                log.warning("lease watchdog step failed", extra={"error": str(exc)})

    def _check(self) -> None:
        context = self._running
        left = self.clock.left()
        if context is None or left is None or left >= self.clock.stop_at:
            return
        if self._stopping is not context:
            self._stopping = context
            context.mark_lease_lost()
            signal.setitimer(signal.ITIMER_REAL, max(0.001, left - self.clock.kill_at))
            log.warning(
                "the worker stopped renewing its lease: stopping the task",
                extra={
                    "event": "lease_expiring",
                    "job_id": context.job_id,
                    "task": context.task,
                    "left": round(left, 3),
                },
            )
        if left < self.clock.raise_at and self._raised is not context:
            self._raised = context
            os.kill(os.getpid(), signal.SIGUSR1)  # billiard raises SoftTimeLimitExceeded
