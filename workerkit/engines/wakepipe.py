"""A pipe that wakes a waiting thread: the way a signal handler, or another thread, ends a wait.

A thread that would otherwise wake every few milliseconds to look at a flag (a stop asked for
by SIGTERM, a job that began) waits on a :class:`WakePipe` for up to its next duty instead, and
whoever sets the flag calls :meth:`WakePipe.wake`. Each wake of a thread costs ~0.1-0.3 ms of
CPU on a shared 2-core machine, so an idle worker that ticks 20 times a second burns a few ms a
second for nothing (bench/README.md, "sixth round").

Why a pipe and not a :class:`threading.Event`: :meth:`~threading.Event.set` takes the event's
lock, and a Python signal handler runs between two bytecodes of whatever the main thread was
doing, which may be holding that very lock (a deadlock). A byte written to a non-blocking pipe
takes no lock; a full pipe means a wake is pending already. The descriptors are closed when the
object is collected, after which nobody can write to a number the process has reused.
"""

from __future__ import annotations

import contextlib
import os
import select
import weakref

__all__ = ("WakePipe", "close_quietly")


def close_quietly(*fds: int) -> None:
    """Close each descriptor, one already closed or never valid included (for finalizers)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class WakePipe:
    """:meth:`wait` returns early once :meth:`wake` was called (from any thread or a signal
    handler); wakes that come while nobody waits end the next wait at once."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        weakref.finalize(self, close_quietly, self._read, self._write)
        self._poller = select.poll()  # not select(): the descriptor may be above 1023
        self._poller.register(self._read, select.POLLIN)

    def wake(self) -> None:
        """End the current or the next :meth:`wait` (no lock: safe in a signal handler)."""
        with contextlib.suppress(OSError):  # full: a wake is pending anyway
            os.write(self._write, b"w")

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (one thread at a time); True when woken."""
        if not self._poller.poll(max(0.0, timeout) * 1000):
            return False
        self.clear()
        return True

    def fileno(self) -> int:
        """The end that is readable once woken: for a caller that polls it beside other
        descriptors (then calls :meth:`clear`)."""
        return self._read

    def clear(self) -> None:
        """Forget the wakes so far (the next :meth:`wait` waits)."""
        with contextlib.suppress(OSError):  # empty already (BlockingIOError)
            os.read(self._read, 4096)
