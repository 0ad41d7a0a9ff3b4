"""What a worker forked by ``workerkit run`` (supervisor/forked.py) finds itself started with.

Run as ``python -m tests.apps.fork_probe ARGS`` (or forked as if so): writes one JSON line to
the descriptor named by ``FORK_PROBE_FD`` (its signal handlers, held signals, argv, name,
environment, open close-on-exec descriptors, a random number), then waits for a signal; with
``FORK_PROBE_EXIT`` set, exits instead with a thread and an exit function still to run.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

from workerkit.supervisor import held_signals

__all__ = ()


def _handler(signum: int) -> str:
    handler = signal.getsignal(signum)
    if handler is signal.default_int_handler:
        return "default_int_handler"
    if isinstance(handler, signal.Handlers):
        return handler.name
    return repr(handler)


def exit_as_a_program_would(fd: int) -> None:
    """A non-daemon thread still writing and an exit function: a program's exit waits for the
    first, then runs the second (``thread`` then ``atexit`` on the descriptor, then its end)."""

    def late() -> None:
        time.sleep(0.2)
        os.write(fd, b"thread\n")

    def at_exit() -> None:
        os.write(fd, b"atexit\n")
        os.close(fd)

    threading.Thread(target=late).start()
    atexit.register(at_exit)


def main() -> None:
    fd = int(os.environ["FORK_PROBE_FD"])
    if os.environ.get("FORK_PROBE_EXIT"):
        exit_as_a_program_would(fd)
        return
    private = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.get_inheritable(int(name)):
                private.append(int(name))
        except OSError:
            pass
    report = {
        "signals": {s.name: _handler(s) for s in (*held_signals.SIGNALS, signal.SIGPIPE)},
        "held": held_signals.take(),
        "argv": sys.argv,
        "name": sys.modules["__main__"].__name__,
        "comm": Path("/proc/self/comm").read_text().strip(),
        "env": {k: os.environ.get(k) for k in ("PROBE_ONLY_CHILD", "PROBE_ONLY_PARENT")},
        "private_fds": private,
        "random": random.random(),
        "pid": os.getpid(),
    }
    os.write(fd, json.dumps(report).encode() + b"\n")
    os.close(fd)
    signal.pause()


if __name__ == "__main__":
    main()
