"""The early worker forked from the CLI process, where that is safe; else the caller execs it.

A worker spawned with ``exec`` starts a second interpreter and imports again what the CLI has
imported already (workerkit's settings, logging, the engine's facade, ...). Forked, it starts
from the CLI's state: it skips both, and shares those pages with the supervisor copy-on-write
(``gc.freeze()`` first, so that neither process's collector writes to them). The CLI forks only
where nothing can be half-done in the child:

* one thread (the kernel's view, ``/proc/self/task``): no lock can be held by a thread that
  does not exist in the child (logging's, the import lock, an allocator's);
* no close-on-exec descriptor open but the gate's and the check's pipes (the inheritable ones,
  the standard streams and what the CLI's parent passed on, an exec'd worker would have too):
  nothing of the CLI's leaks into the worker, and no object of the CLI's in the child owns a
  number that the worker's own descriptors may reuse;
* the worker's command is ``python -m MODULE ARGS`` of this interpreter, run here as ``-m``
  would (:func:`runpy.run_module`).

Otherwise :func:`start` returns False and the caller spawns the command (process.py). In the
child: the signal handlers are those of a fresh interpreter (the held-signal recorder gone, and
what it held forgotten), the environment is the worker's, ``sys.argv`` is the worker's, the
process name (``/proc/PID/comm``: ``ps -e``, ``top``) says which worker it is; its command line
(``ps -f``) and its ``/proc/PID/environ`` (the environment it was exec'd with) stay the
CLI's; the CLI's exit functions are dropped, the worker's run at its exit, ``sys.path[0]`` is
the working directory as with ``-m``. The random module reseeds itself at fork; the start gate
arms ``PR_SET_PDEATHSIG`` as it does for an exec'd worker. Why and what it saves:
docs/operations/lifecycle.md, "The start".
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import logging
import os
import runpy
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NoReturn

from workerkit.supervisor import held_signals

if TYPE_CHECKING:
    from workerkit.supervisor.process import ChildProcess

__all__ = ("DISABLE_ENV", "fork_safe", "start")

#: ``WORKERKIT_FORK_WORKER=0`` in the CLI's environment: always exec the worker.
DISABLE_ENV: Final = "WORKERKIT_FORK_WORKER"

#: What both processes import on their way to ready, after the fork (the supervisor's anyio
#: and budget check; the sql worker's SQLAlchemy, the rq worker's redis, the app check):
#: imported once before it, they cost the pod's CPU once (-0.08 to -0.1 s to ready, same-round
#: medians) and their pages are shared. None is an engine library. Only what both need: the
#: time before the fork is on the worker's way to ready, so the budget's rules and report
#: (the supervisor's alone) are imported after it, beside the worker's imports.
SHARED_IMPORTS: Final = (
    "asyncio",
    "base64",
    "calendar",
    "concurrent.futures",
    "email.message",
    "email.utils",
    "hashlib",
    "queue",
    "ssl",
    "workerkit.timing.budget",
)


def _module_args(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(MODULE, ARGS)`` of ``[sys.executable, "-m", MODULE, *ARGS]``; None for another."""
    if len(argv) < 3 or argv[1] != "-m" or not sys.executable:
        return None
    if os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
        return None
    return argv[2], list(argv[3:])


def _private_descriptors() -> set[int]:
    """The open descriptors that an ``exec`` would close (close-on-exec: every one Python
    opens, PEP 446); inheritable ones (from the CLI's own parent) an exec'd worker keeps too."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if not os.get_inheritable(fd):
                fds.add(fd)
    return fds


def fork_safe(allowed: Sequence[int]) -> str | None:
    """Why this process must not fork the worker now (None: it may)."""
    if os.environ.get(DISABLE_ENV, "") in ("0", "false", "no"):
        return f"{DISABLE_ENV} says exec"
    try:
        tasks = len(os.listdir("/proc/self/task"))
        extra = _private_descriptors() - {0, 1, 2, *allowed}
    except OSError:
        return "no /proc"
    if tasks != 1 or threading.active_count() != 1:
        return f"{tasks} threads"
    if extra:
        return f"descriptors {sorted(extra)} open"
    return None


def start(child: ChildProcess, keep: Sequence[int], drop: Sequence[int]) -> bool:
    """Fork ``child``'s command as the worker and set ``child.pid``; False when it may not be
    forked (:func:`fork_safe`, or not ``python -m``): the caller spawns it then.

    ``keep``: the descriptors the worker uses (made inheritable for an exec, kept here);
    ``drop``: the parent's ends of its pipes, closed in the worker.
    """
    module = _module_args(child.argv)
    if module is None or fork_safe([*keep, *drop]) is not None:
        return False
    for name in SHARED_IMPORTS:
        importlib.import_module(name)
    if fork_safe([*keep, *drop]) is not None:  # none of them may start a thread; if one did
        return False
    for stream in (sys.stdout, sys.stderr):  # or the child would write the CLI's buffer again
        stream.flush()
    gc.freeze()  # the CLI's objects stay unwritten by either collector: the pages stay shared
    pid = os.fork()
    if pid == 0:
        _run_worker(module[0], module[1], child.env, drop)
    child.pid = pid
    return True


def _run_worker(module: str, args: list[str], env: dict[str, str], drop: Sequence[int]) -> NoReturn:
    code = 1
    try:
        _become_worker(module, env, drop)
        sys.argv = ["-m", *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        with contextlib.suppress(BaseException):
            sys.excepthook(*sys.exc_info())  # the worker's hook (JSON logs), as at a real exit
    finally:
        # As the interpreter's own exit would (and multiprocessing's forked children do): wait
        # for non-daemon threads, run the worker's exit functions, flush the streams; never
        # back into the CLI's frames below.
        with contextlib.suppress(BaseException):
            getattr(threading, "_shutdown")()  # noqa: B009 - private, absent from typeshed
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    with contextlib.suppress(BaseException):
        sys.stderr.write(f"{code}\n")
    return 1


def _become_worker(module: str, env: dict[str, str], drop: Sequence[int]) -> None:
    """The child's share of a fresh ``exec``: signals, descriptors, environment, name."""
    for signum in held_signals.SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    held_signals.take()  # the supervisor's, not ours
    for fd in drop:
        os.close(fd)
    atexit._clear()  # the CLI's exit functions are the supervisor's ...
    atexit.register(logging.shutdown)  # ... but logging's, registered once at its import
    os.environ.clear()
    os.environ.update(env)
    if sys.path:  # as ``python -m`` has it: the working directory, not the CLI script's
        sys.path[0] = os.getcwd()
    name = "wk-" + module.rsplit(".", 1)[-1] + "-worker"  # wk-sql-worker: 15 bytes at most
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])
