"""The engine worker's lifeline to its supervisor: when the supervisor is gone, release and exit.

:class:`Lifeline` notices the supervisor's death (``PR_SET_PDEATHSIG``, a parent-pid watch
thread, SIGQUIT) and runs the engine's ``release_now``, with a watchdog that ends the process
after :data:`ORPHAN_EXIT_WITHIN`. Why and how: docs/operations/lifecycle.md ("When the
supervisor dies").
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Final

from workerkit import rundir
from workerkit.engines.wakepipe import WakePipe
from workerkit.events import SOCKET_ENV
from workerkit.proctree import descendants, has_children, prctl, stop_processes

__all__ = ("ORPHAN_EXIT_WITHIN", "SUPERVISOR_PID_ENV", "Lifeline", "stop_children")

log = logging.getLogger("workerkit.engines")

#: The supervisor's pid, in its worker's environment: the parent the worker must not outlive.
SUPERVISOR_PID_ENV: Final = "WORKERKIT_SUPERVISOR_PID"
#: Once orphaned, the worker is gone within this many seconds, released or not (its jobs are
#: then recovered through their leases).
ORPHAN_EXIT_WITHIN: Final = 0.9
#: How often the watch thread compares ``os.getppid()`` with the supervisor's pid where it is
#: the only way to tell (no ``PR_SET_PDEATHSIG``) ...
WATCH_EVERY: Final = 0.1
#: ... and where the parent-death signal tells at once, and the watch is its safety net: an
#: idle worker's thread wakes once a second, not ten times.
WATCH_EVERY_ARMED: Final = 1.0
#: After a SIGQUIT, how long to wait for the re-parenting that tells the supervisor's death
#: from a SIGQUIT someone sent.
_REPARENT_WAIT: Final = 0.1
_PR_SET_PDEATHSIG: Final = 1


def stop_children(grace: float) -> list[int]:
    """Stop every process this one started (its jobs' subprocesses), each by pid: SIGTERM, then
    SIGKILL after ``grace``. Returns the pids that had to be killed."""
    if not has_children():  # no child, so no descendant: spare the walk of all of /proc
        return []
    return stop_processes(descendants(os.getpid()), grace=grace, reap=_reap_children)


def _reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


class Lifeline:
    """Watches the supervisor; calls ``release_now()`` once, from its own thread, when it dies.

    ``release_now`` must stop fetching, release the jobs in hand and make the process exit
    (each engine already has that path: the supervisor's ``release`` command). :meth:`start`
    is a no-op when no supervisor started this process.
    """

    def __init__(self, release_now: Callable[[], None]) -> None:
        self._release_now = release_now
        supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
        self.supervisor_pid = int(supervisor) if supervisor.isdigit() else None
        self._wake: WakePipe | None = None  # SIGQUIT's
        self._fired = False
        self._watchdog_file: IO[str] | None = None
        self._watch_every = WATCH_EVERY

    @property
    def active(self) -> bool:
        return self.supervisor_pid is not None

    def start(self) -> None:
        """Arm the parent-death signal, install the SIGQUIT handler, start the watch thread.

        Call from the main thread (signal handlers can only be installed there), after the
        engine installed its own handlers, which would otherwise replace ours.
        """
        if not self.active:
            return
        self._wake = WakePipe()
        signal.signal(signal.SIGQUIT, self._on_sigquit)
        os.register_at_fork(after_in_child=_default_sigquit)
        # Not before exec in the supervisor (posix_spawn has no hook for it): here, after exec,
        # then the parent is checked, which closes the gap in between. The signal fires when the
        # *thread* that spawned us exits, which is why the supervisor spawns from its main thread.
        if prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT):
            self._watch_every = WATCH_EVERY_ARMED
        threading.Thread(target=self._watch, name="workerkit-lifeline", daemon=True).start()

    def _on_sigquit(self, signum: int, frame: FrameType | None) -> None:
        # Only a byte on a pipe: the handler runs between two bytecodes of whatever the main
        # thread was doing (a job, kombu's loop), so it must take no lock.
        if self._wake is not None:
            self._wake.wake()

    def _watch(self) -> None:
        assert self._wake is not None
        while True:
            orphaned = os.getppid() != self.supervisor_pid
            if orphaned:
                self._fire("the supervisor is gone")
                return
            if self._wake.wait(self._watch_every):
                gone = self._parent_changes_within(_REPARENT_WAIT)
                self._fire("the supervisor is gone" if gone else "SIGQUIT received")
                return

    def _parent_changes_within(self, seconds: float) -> bool:
        # The parent-death signal is sent while the kernel re-parents us, so getppid() may
        # still name the dying supervisor for an instant: look again, briefly.
        deadline = time.monotonic() + seconds
        while os.getppid() == self.supervisor_pid:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _fire(self, reason: str) -> None:
        if self._fired:
            return
        self._fired = True
        # The watchdog is faulthandler's C thread: it ends the process even if a job holds the
        # GIL in C code, or the release hangs on a store that does not answer.
        self._watchdog_file = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        faulthandler.dump_traceback_later(ORPHAN_EXIT_WITHIN, exit=True, file=self._watchdog_file)
        orphaned = os.getppid() != self.supervisor_pid
        log.warning(
            f"{reason}: releasing the jobs in hand and exiting",
            extra={
                "event": "worker_orphaned" if orphaned else "worker_quit",
                "supervisor_pid": self.supervisor_pid,
            },
        )
        if orphaned:
            _remove_runtime_dir()
        try:
            self._release_now()
        except Exception:
            log.exception("release failed", extra={"event": "release_failed"})
            logging.shutdown()
            os._exit(0)


def _default_sigquit() -> None:
    # A forked child (a work horse, a pool child) is not the supervisor's worker: its own
    # parent decides when it ends.
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _remove_runtime_dir() -> None:
    """Remove the dead supervisor's socket and its private directory (it cannot any more)."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    directory = Path(path).parent
    if directory.name.startswith(rundir.PREFIX):  # else not a directory the supervisor made
        rundir.remove(directory)
