"""The lease deadline a worker's main process shares with the processes it forks to run jobs.

Only the main process renews its leases, but a forked process runs the job (a Celery prefork
pool child, an RQ work horse): with the main process stopped (SIGSTOP, a frozen node) the job
would run on after its lease expired and another worker took it. The main process publishes,
in memory mapped before the fork, the time until which its leases are known to live; a
:class:`Watchdog` thread in the forked process stops the job before that time.

An RQ work horse lives for one job, and a thread started in each made every copy-on-write
fault of the horse dearer (bench/README.md, "eleventh round"): there the thread starts only
when it has work to do. A :class:`LeaseGuard` process beside the worker (one per worker, not per
job; engines/leaseguard.py) sends the horse :data:`WAKE_SIGNAL` once its lease runs short, which
starts the thread, and kills the horse itself should the thread not have ended the job in time.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import logging
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from workerkit.engines import leaseguard
from workerkit.proctree import load_libc

if TYPE_CHECKING:
    from workerkit.job import JobContext

__all__ = ("WAKE_SIGNAL", "LeaseClock", "LeaseGuard", "Watchdog", "now", "since_monotonic")

#: A clock shared by every process of the host that counts a suspended node's time too (a
#: lease in Redis keeps expiring meanwhile); CLOCK_MONOTONIC where there is none.
_CLOCK: Final = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


#: What starts a work horse's watchdog thread (the guard's, and the worker's stop requests).
#: SIGURG, as its default action is to ignore it: one that reaches a process without the
#: handler (a horse's first instants are covered, worker.py) does no harm.
WAKE_SIGNAL: Final = leaseguard.WAKE_SIGNAL
#: How long the guard sleeps when no horse is watched, at most; a horse whose lease has less than
#: ``stop_at`` plus this left when it starts does not wait for the guard (worker.py).
GUARD_IDLE: Final = leaseguard.GUARD_IDLE


def now() -> float:
    return time.clock_gettime(_CLOCK)


def since_monotonic(at: float) -> float:
    """The instant ``at`` (``time.monotonic()``, a moment ago) on :func:`now`'s clock."""
    return now() - (time.monotonic() - at)


class LeaseClock:
    """Until when every lease of this worker is known to live, in memory its children share.

    The main process calls :meth:`extend` with the instant a renewal (or a start) that set
    every lease it holds was sent (each lease then lives at least ``ttl`` past it in the
    store). A job is stopped when less than ``stop_at`` is left (cooperatively:
    ``stop_requested``), interrupted at ``raise_at`` and its process is killed by the kernel at
    ``kill_at``, before the lease can expire and another worker take the job.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.stop_at = ttl / 4
        self.raise_at = ttl / 8
        self.kill_at = ttl / 16
        #: How often a watchdog (or the guard, when the lease is short) looks: at most 0.25 s.
        self.tick = min(0.25, ttl / 16)
        # Shared memory: the processes forked later see the main's writes. A memfd's, where
        # there is one, so that the lease guard (another program) can map it too.
        self.fd: int | None = None
        try:
            fd = os.memfd_create("workerkit-lease")  # close-on-exec: no job's program gets it
            os.ftruncate(fd, mmap.PAGESIZE)
            self._map = mmap.mmap(fd, mmap.PAGESIZE)
            self.fd = fd
        except (AttributeError, OSError):
            self._map = mmap.mmap(-1, mmap.PAGESIZE)
        # Aligned 64-bit words (leaseguard.LAYOUT): the deadline (milliseconds on _CLOCK; 0:
        # not started, no deadline); the pid of the work horse the guard watches (0: none; the
        # main process's); the pid whose watchdog thread runs, and whose job's code runs; the
        # pid the guard killed (the guard's write).
        self._cell = ctypes.c_int64.from_buffer(self._map, leaseguard.DEADLINE)
        self._watched = ctypes.c_int64.from_buffer(self._map, leaseguard.WATCHED)
        self._watching = ctypes.c_int64.from_buffer(self._map, leaseguard.WATCHING)
        self._running = ctypes.c_int64.from_buffer(self._map, leaseguard.RUNNING)
        self._killed = ctypes.c_int64.from_buffer(self._map, leaseguard.KILLED)

    def extend(self, since: float) -> None:
        self._cell.value = int((since + self.ttl) * 1000)

    def left(self) -> float | None:
        """Seconds the leases are known to live, or None before the worker's first renewal."""
        value = self._cell.value
        return None if value == 0 else value / 1000 - now()

    def expiring(self) -> bool:
        """Whether a job must stop now: its lease may not outlive ``stop_at``."""
        left = self.left()
        return left is not None and left < self.stop_at

    def watch(self, pid: int) -> None:
        """The work horse the guard watches now (0: none), set by the main process.

        A new horse has not been killed by the guard (its pid may be an old horse's, reused).
        """
        if pid:
            self._killed.value = 0
        self._watched.value = pid

    def killed_by_guard(self, pid: int) -> bool:
        """Whether the guard killed ``pid`` (asked after reaping it, before the next horse)."""
        return pid != 0 and self._killed.value == pid

    @property
    def watched(self) -> int:
        return int(self._watched.value)

    def mark_watching(self) -> None:
        """This process's watchdog thread runs (the guard stops waking it)."""
        self._watching.value = os.getpid()

    @property
    def watching(self) -> int:
        return int(self._watching.value)

    def mark_running(self, running: bool) -> None:
        """This process's job's code runs, or has ended (what is left is its settle, which
        no watchdog stops)."""
        self._running.value = os.getpid() if running else 0

    @property
    def running(self) -> int:
        return int(self._running.value)


def _alarm_kills() -> None:
    """SIGALRM's default action (terminate the process) again, from any thread.

    Python's ``signal.signal`` is the main thread's only, and the main thread may be the one
    stuck (a job holding the GIL); the C library's ``signal`` is not.
    """
    libc = load_libc() or ctypes.CDLL(None, use_errno=True)  # looked up before the fork
    install = libc.signal
    install.restype = ctypes.c_void_p
    install.argtypes = (ctypes.c_int, ctypes.c_void_p)
    install(signal.SIGALRM, None)  # SIG_DFL


class Watchdog:
    """In a forked process running jobs: stops the running job before its worker's leases expire.

    A thread that wakes every ``ttl / 16`` (at most 0.25 s; with no job, at most a second) and
    compares the shared deadline with the clock; it does nothing while the main process renews.
    Once less than ``stop_at`` is left it marks the job's lease lost (``stop_requested`` turns
    true, so a cooperative job checkpoints and stops), calls ``on_stop``, arms the kernel's
    interval timer so that SIGALRM (default action: terminate) ends the process at ``kill_at``
    even if the job holds the GIL in C code, and at ``raise_at`` sends ``raise_signal`` to its
    own process (the engine's way to raise into the job). ``reset_alarm``: SIGALRM has a
    handler of the engine's (RQ's job timeout), put back to the default action when the kill is
    armed.

    ``wake_fd`` (a pipe's read end) and ``on_wake``: the same thread also waits on the pipe
    between its ticks and calls ``on_wake`` for each byte the other end writes (the RQ work
    horse's stop requests, which would otherwise need a thread of their own: a thread started
    per forked job); at end of file it stops watching the pipe.
    """

    def __init__(
        self,
        clock: LeaseClock,
        log: logging.Logger,
        *,
        raise_signal: signal.Signals | None = None,
        reset_alarm: bool = False,
        on_stop: Callable[[], None] | None = None,
        wake_fd: int | None = None,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        self.log = log
        self.raise_signal = raise_signal
        self.reset_alarm = reset_alarm
        self.on_stop = on_stop
        self.wake_fd = wake_fd
        self.on_wake = on_wake
        self._tick = clock.tick
        # With no job to watch, a second (an idle worker's thread wakes once a second, not
        # four times). A job begun meanwhile is first looked at within ttl / 16 of its start:
        # a lease already below stop_at then is still stopped before raise_at (ttl / 8 later).
        self._idle_tick = max(self._tick, min(1.0, clock.ttl / 16))
        self._lock = threading.Lock()
        self._started = False
        #: The job this process runs; the one whose stop was started (kill armed), and raised.
        self._running: JobContext | None = None
        self._stopping: JobContext | None = None
        self._raised: JobContext | None = None

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Start the thread; once (later calls do nothing). Safe in a signal handler: it takes
        no lock a job could hold."""
        if self._started:
            return
        self._started = True
        # A bare thread, not a threading.Thread: an RQ work horse starts one per job, and
        # Thread.start() waits for the new thread to run (two switches) and allocates its
        # bookkeeping in the pages the horse shares with its parent. Forking a process with the
        # engine imported, a child that started a threading.Thread took +0.75 ms and 85 page
        # faults, one with this +0.3 ms and 23; in a running worker's horses this saved ~0.25
        # ms and ~38 faults per job. Such a thread is daemonic (it dies with the process) and
        # outside threading.enumerate().
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self.clock.mark_watching()
            self._loop()
        except BaseException as exc:  # a bare thread's end would go to sys.unraisablehook
            self.log.error(
                "lease watchdog ended", extra={"event": "lease_watchdog_failed", "error": repr(exc)}
            )

    def begin(self, context: JobContext) -> None:
        self._running = context
        self.clock.mark_running(True)

    def end(self, context: JobContext) -> None:
        """The job ended (in the process's main thread): no stop, no kill for it any more."""
        self.clock.mark_running(False)
        with self._lock:
            self._running = None
            if self._stopping is context:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self._stopping = None

    def _loop(self) -> None:
        waker: select.poll | None = None
        if self.wake_fd is not None:
            waker = select.poll()  # poll, not select: a worker's fd may be above 1023
            waker.register(self.wake_fd, select.POLLIN)
        while True:
            # Looks first, then waits: a thread started late (woken by the guard: the lease is
            # short already) acts at once.
            try:
                with self._lock:
                    self._check()
            except Exception as exc:  # never let the watchdog die quietly
                self.log.warning("lease watchdog step failed", extra={"error": str(exc)})
            tick = self._tick if self._running is not None else self._idle_tick
            if waker is None:
                time.sleep(tick)
            elif waker.poll(tick * 1000) and not self._woken():
                waker = None  # end of file: the other end is closed, nothing more comes

    def _woken(self) -> bool:
        """Read what woke the pipe; ``on_wake`` per byte. False at end of file (or an error)."""
        assert self.wake_fd is not None
        try:
            data = os.read(self.wake_fd, 64)
        except OSError:
            return False
        for _ in data:
            if self.on_wake is not None:
                try:
                    self.on_wake()
                except Exception as exc:  # the watchdog's own duty must go on
                    self.log.warning("lease watchdog wake-up failed", extra={"error": str(exc)})
        return bool(data)

    def _check(self) -> None:
        context = self._running
        left = self.clock.left()
        if context is None or left is None or left >= self.clock.stop_at:
            return
        if self._stopping is not context:
            self._stopping = context
            context.mark_lease_lost()
            if self.on_stop is not None:
                self.on_stop()
            if self.reset_alarm:
                _alarm_kills()
            signal.setitimer(signal.ITIMER_REAL, max(0.001, left - self.clock.kill_at))
            self.log.warning(
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
            if self.raise_signal is not None:
                os.kill(os.getpid(), self.raise_signal)


class LeaseGuard:
    """The lease guard process beside a forking worker (RQ's; engines/leaseguard.py).

    The horse starts no watchdog thread of its own while its lease is long (a thread per horse
    made each of its copy-on-write faults dearer). Once less than ``stop_at`` is left while the
    horse's job runs (the watchdog stops nothing else), the guard sends the horse
    :data:`WAKE_SIGNAL` every tick until the horse's thread runs; its handler starts the
    horse's :class:`Watchdog`, and from there on all is as before. Should the job still run with
    less than ``kill_at / 2`` left (the handler never ran: its signals blocked, or the main
    thread held in C code since before), the guard SIGKILLs the horse, before the lease can
    expire. The guard is a process, not a thread of the worker: it goes on while the worker's
    main process is stopped or wedged, which is what it is for. It has a process group of its
    own (a stop sent to the worker's group does not stop it), dies with the worker
    (``PR_SET_PDEATHSIG``), and is a fresh interpreter on the standard library alone.
    """

    def __init__(self, clock: LeaseClock, log: logging.Logger) -> None:
        self.clock = clock
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the guard; OSError where it cannot run (no memfd to share the page through)."""
        fd = self.clock.fd
        if fd is None:
            raise OSError("the lease page is not shareable with another program (no memfd)")
        script = str(Path(__file__).with_name("leaseguard.py"))
        clock = self.clock
        limits = [repr(clock.stop_at), repr(clock.kill_at), repr(clock.tick)]
        argv = [sys.executable, "-I", "-S", script, str(fd), str(os.getpid()), *limits]
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, pass_fds=(fd,), process_group=0
        )

    def alive(self) -> bool:
        """Whether the guard runs (reaped when it has ended)."""
        process = self._process
        if process is None:
            return False
        if process.poll() is None:
            return True
        self._process = None
        self.log.warning(
            "the lease guard ended: each work horse watches its own lease again",
            extra={"event": "lease_guard_ended", "status": process.returncode},
        )
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(OSError):
                process.kill()
            process.wait()
