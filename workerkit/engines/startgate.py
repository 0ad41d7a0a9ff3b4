"""The worker's start gate: a worker started early checks its app, then waits for the go.

``workerkit run`` spawns the sql and rq workers before its own checks are done
(supervisor/early.py), so that the worker's interpreter and engine imports run beside the
supervisor's on another core. The worker imports its modules, loads the app and answers the app
check on the pipe named by ``WORKERKIT_APP_CHECK`` (its timing facts, or the error that refuses
it: engines/appcheck.py), then, before it touches its store, reads one byte from the pipe named
by ``WORKERKIT_START_GATE``: ``1`` is the go; end of file means the supervisor refused the
configuration or died, and the worker leaves at once, having claimed and written nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("CHECK_ENV", "GATE_ENV", "GO", "wait_for_start")

#: The read end of the gate's pipe, as a file descriptor number, in the worker's environment.
GATE_ENV: Final = "WORKERKIT_START_GATE"
#: The write end of the app check's pipe, as a file descriptor number.
CHECK_ENV: Final = "WORKERKIT_APP_CHECK"
#: What the supervisor writes to open the gate.
GO: Final = b"1"

_PR_SET_PDEATHSIG: Final = 1


def wait_for_start(engine: str, worker_args: Sequence[str], settings: Settings) -> None:
    """Answer the app check, then return once the supervisor says go; exit 0 when it never
    will. Neither pipe (a worker restarted after a crash, or run by hand): return at once.

    The variables are removed from the environment first: the worker's own children (a work
    horse, a job's subprocess) have neither. SIGINT (a Ctrl-C reaching the whole process group)
    is ignored meanwhile: the supervisor decides, as it does once the worker runs.
    """
    check = os.environ.pop(CHECK_ENV, None)
    gate = os.environ.pop(GATE_ENV, None)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gate:
        # Until the gate opens, a supervisor that dies takes this worker with it at once, even
        # in the middle of the app's import (which may hang on the network): nothing has been
        # claimed yet. The lifeline arms its own graceful signal once the worker runs.
        _on_parent_death(signal.SIGKILL)
        if _closed(int(gate)):  # it died before that was armed (while we imported)
            os._exit(0)
    try:
        if check:
            _answer(int(check), engine, worker_args, settings)
        if gate:
            _wait(int(gate))
            _on_parent_death(0)
    finally:
        signal.signal(signal.SIGINT, previous)


def _on_parent_death(signum: int) -> None:
    """``PR_SET_PDEATHSIG``: ``signum`` when the supervisor dies (0: nothing)."""
    from workerkit.proctree import prctl  # ctypes: only in a worker spawned at its gate

    prctl(_PR_SET_PDEATHSIG, signum)


def _closed(fd: int) -> bool:
    """Whether the gate's pipe is at end of file now: nobody writes ``GO`` before the app check
    is answered, so a readable gate here means the supervisor's end is closed."""
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


def _answer(fd: int, engine: str, worker_args: Sequence[str], settings: Settings) -> None:
    from workerkit.engines.appcheck import answer

    try:
        answer(fd, engine, worker_args, settings)
    except BrokenPipeError:  # the supervisor is gone: the gate says so next
        pass
    except Exception:  # the supervisor reads no answer and refuses, pointing at this output
        traceback.print_exc()
        with contextlib.suppress(OSError):
            os.close(fd)


def _wait(fd: int) -> None:
    try:
        reply = os.read(fd, 1)
    except OSError:
        reply = b""
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if reply != GO:
        os._exit(0)
