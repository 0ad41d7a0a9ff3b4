"""The lease guard: a small process beside a forking RQ worker (why: engines/leasewatch.py).

Run by path, on the standard library alone: ``python -I -S leaseguard.py FD PARENT STOP_AT
KILL_AT TICK`` (the :class:`~workerkit.engines.leasewatch.LeaseClock`'s own figures). It
imports nothing of workerkit or of the worker's engine, so it costs what a bare interpreter
costs, not a copy of the worker (a fork of the worker would keep, for good, the old copy of
every page the worker writes afterwards: ~6 MiB more). It maps the worker's lease page (the
memfd ``FD`` of :class:`~workerkit.engines.leasewatch.LeaseClock`) and watches the work horse
named there; it ends when ``PARENT``, the worker, does.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

TYPE_CHECKING = False  # typing's own import would cost this small process what it saves
if TYPE_CHECKING:
    import signal
else:
    # _signal, the C module under signal (the same functions, plain ints for the signals):
    # signal itself imports enum, and with it functools, types...: ~0.9 MiB of this
    # process's ~6 (so would contextlib).
    import _signal as signal

__all__ = (
    "CLOCK",
    "GUARD_IDLE",
    "LAYOUT",
    "WAKE_SIGNAL",
    "child_state",
    "main",
    "signal_child",
    "step",
)

#: The lease page, native 64-bit integers: the deadline (ms on CLOCK; 0: none), the horse the
#: guard watches, the horse whose watchdog thread runs, the horse whose job's code runs (pids;
#: 0: none; LeaseClock writes these four), and the horse this guard killed (written here, before
#: the kill, so that the worker reaping it knows why it died; cleared for each new horse).
LAYOUT = "qqqqq"
DEADLINE, WATCHED, WATCHING, RUNNING, KILLED = 0, 8, 16, 24, 32
#: How long the guard sleeps when no horse is watched, at most; a horse whose lease has less
#: than a quarter of it plus this left when it starts does not wait for the guard.
GUARD_IDLE = 1.0
#: SIGURG: its default action is to ignore it (a process without the handler is not harmed).
WAKE_SIGNAL = signal.SIGURG
CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
_PR_SET_PDEATHSIG = 1


def step(
    limits: tuple[float, float, float],
    *,
    pid: int,
    left: float | None,
    running: int,
    watching: int,
    killed: int,
) -> tuple[bool, bool, float]:
    """One look: (wake ``pid``, SIGKILL ``pid``, seconds to sleep).

    ``limits``: the lease clock's ``stop_at``, ``kill_at`` and ``tick``; ``left``: seconds the
    lease lives (None: no deadline); ``running``/``watching``: the pids whose job's code and
    whose watchdog thread run; ``killed``: the pid already killed.
    """
    stop_at, kill_at, tick = limits
    if not pid or left is None:
        return False, False, GUARD_IDLE
    if running != pid:  # not begun, or ended (settling): not for a watchdog to stop
        return False, False, tick  # looks again soon: the job may begin on a short lease
    if left >= stop_at:
        # Until the lease would get short (a renewal meanwhile only puts that later).
        return False, False, min(GUARD_IDLE, max(tick, left - stop_at))
    return watching != pid, left < kill_at / 2 and killed != pid, tick


def child_state(pid: int, parent: int) -> str | None:
    """``pid``'s state (``R``, ``S``, ``Z`` for a zombie...) if it is a child of ``parent``;
    None if it is not (gone, or its pid reused)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        return state if int(ppid) == parent else None
    except (OSError, ValueError):
        return None


def signal_child(pid: int, parent: int, signum: int) -> None:
    """``signum`` to ``pid`` if it is still a child of ``parent`` (not a reused pid)."""
    if child_state(pid, parent) is not None:
        try:
            os.kill(pid, signum)
        except OSError:
            return


def _die_with(parent: int) -> bool:
    """SIGKILL when the worker dies (``PR_SET_PDEATHSIG``); False if it is gone already."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the loop below notices a new parent within GUARD_IDLE
    return os.getppid() == parent


def main(argv: list[str]) -> None:  # pragma: no cover - the guard process
    fd, parent = int(argv[1]), int(argv[2])
    limits = (float(argv[3]), float(argv[4]), float(argv[5]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the worker's to handle
    page = mmap.mmap(fd, mmap.PAGESIZE)
    os.close(fd)
    if not _die_with(parent):
        return
    while os.getppid() == parent:
        deadline, pid, watching, running, killed = struct.unpack_from(LAYOUT, page, 0)
        left = None if deadline == 0 else deadline / 1000 - time.clock_gettime(CLOCK)
        wake, kill, pause = step(
            limits, pid=pid, left=left, running=running, watching=watching, killed=killed
        )
        if wake:
            signal_child(pid, parent, WAKE_SIGNAL)
        # A horse that ended already (its watchdog's SIGALRM: a zombie until the worker, maybe
        # stopped, reaps it) is not killed, nor said to be. Written before the kill: the
        # worker, reaping it, reads why it died.
        if kill and child_state(pid, parent) not in (None, "Z", "X"):
            struct.pack_into("q", page, KILLED, pid)
            signal_child(pid, parent, signal.SIGKILL)
        time.sleep(pause)


if __name__ == "__main__":
    main(sys.argv)
