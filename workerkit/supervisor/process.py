"""The engine's worker as a child process, and the supervisor's PID-1 duties.

The worker is started with ``os.posix_spawnp``, not :mod:`subprocess`, and
:meth:`ChildProcess.reap` does all the waiting (``waitpid(-1)``); signals go to the worker's pid,
never its process group. Why: docs/operations/lifecycle.md ("PID 1 duties"). The /proc walks
are in :mod:`workerkit.proctree`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping, Sequence

from workerkit.proctree import descendants, prctl, signal_processes

__all__ = ("ChildProcess", "become_subreaper", "descendants", "reap_all")

log = logging.getLogger(__name__)

#: Signals whose disposition a child must start with at default. Python ignores SIGPIPE and
#: SIGXFSZ in itself and ``subprocess`` restores them for children; so do we.
_RESET_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
)
_PR_SET_CHILD_SUBREAPER = 36


def reap_all() -> list[tuple[int, int]]:
    """Reap every exited child of this process; return their ``(pid, returncode)``."""
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no children at all
            return reaped
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if pid == 0:  # children, none exited
            return reaped
        reaped.append((pid, os.waitstatus_to_exitcode(status)))


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux): orphans below it are re-parented to it.

    As PID 1 that is so anyway; under tini, ``docker run --init`` or a shell it is not, and a
    job's subprocess whose parent exited would go to init, out of our reach. False elsewhere.
    """
    return prctl(_PR_SET_CHILD_SUBREAPER, 1)


class ChildProcess:
    """The engine's worker process: started once, signalled by pid, reaped by :meth:`reap`."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        if not argv:
            raise ValueError("the worker command is empty")
        self.argv = list(argv)
        self.env = dict(env)
        self.pid: int | None = None
        self.returncode: int | None = None

    @property
    def running(self) -> bool:
        return self.pid is not None and self.returncode is None

    def start(self) -> int:
        """Start the worker; OSError when it cannot be executed."""
        # posix_spawnp searches PATH like a shell; the child inherits stdin/stdout/stderr (its
        # logs go to the container's output next to ours) and no other descriptor: Python
        # creates every descriptor non-inheritable (PEP 446), the channel's socket included.
        # Call from the thread that lives as long as the supervisor (the main thread): the
        # worker arms PR_SET_PDEATHSIG (workerkit/engines/lifeline.py), which Linux fires when
        # the *thread* that spawned it exits, not the process; a short-lived thread would kill
        # the worker when it ends.
        self.pid = os.posix_spawnp(self.argv[0], self.argv, self.env, setsigdef=_RESET_SIGNALS)
        return self.pid

    def reap(self) -> list[tuple[int, int]]:
        """Reap every exited child; record the worker's return code when it is among them.

        Returns the *other* reaped processes (orphans re-parented to us as PID 1, grandchildren).
        """
        others: list[tuple[int, int]] = []
        for pid, code in reap_all():
            if pid == self.pid and self.returncode is None:
                self.returncode = code
            else:
                others.append((pid, code))
        return others

    def send_signal(self, signum: int) -> bool:
        """Send ``signum`` to the worker's pid (never its group); False if it already exited."""
        if not self.running:
            return False
        assert self.pid is not None
        # The pid cannot have been reused: it stays ours (a zombie at worst) until we reap it,
        # and we reap it only through reap(), which sets returncode first.
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def kill_tree(self) -> list[int]:
        """SIGKILL the worker and every descendant of it, each by pid; return the pids killed."""
        if not self.running:
            return []
        assert self.pid is not None
        # Find the descendants before killing the worker: once it is dead they are re-parented
        # (to us as PID 1, or to init) and no longer look like its descendants.
        # Each is held by a pidfd as it is killed: a descendant that exited and was reaped
        # meanwhile (we reap everything as PID 1) is not confused with a new process.
        return signal_processes([self.pid, *descendants(self.pid)], signal.SIGKILL)
