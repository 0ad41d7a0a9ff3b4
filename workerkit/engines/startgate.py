"""The worker's start gate: a worker started early waits here for its supervisor's go.

``workerkit run`` spawns the worker before its own checks are done (supervisor/early.py), so that
the worker's interpreter and engine imports run beside them on another core. The worker imports
its modules, then, before it loads the app or touches the store, reads one byte from the pipe
named by ``WORKERKIT_START_GATE``: ``1`` is the go; end of file means the supervisor refused the
configuration or died, and the worker leaves at once, having done nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Final

__all__ = ("GATE_ENV", "GO", "wait_for_start")

#: The read end of the gate's pipe, as a file descriptor number, in the worker's environment.
GATE_ENV: Final = "WORKERKIT_START_GATE"
#: What the supervisor writes to open the gate.
GO: Final = b"1"


def wait_for_start() -> None:
    """Return once the supervisor says go; exit 0 when it never will. No gate: return at once.

    The variable is removed from the environment first: the worker's own children (a work
    horse, a job's subprocess) have no gate. SIGINT (a Ctrl-C reaching the whole process group)
    is ignored meanwhile: the supervisor decides, as it does once the worker runs.
    """
    fd = os.environ.pop(GATE_ENV, None)
    if not fd:
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        answer = os.read(int(fd), 1)
    except (OSError, ValueError):
        answer = b""
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.close(int(fd))
        signal.signal(signal.SIGINT, previous)
    if answer != GO:
        os._exit(0)
