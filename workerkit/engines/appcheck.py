"""The app check: load the user's app in a short-lived process, report its timing facts.

``workerkit run ENGINE`` must refuse a bad app or timing budget before it starts anything, and
that means loading the app, which imports the engine's libraries (SQLAlchemy, rq, Celery). Done
in the supervisor, they would stay resident for its whole life; so :func:`start_app_check`
forks the (still single-threaded) CLI process, the child loads the app and answers one JSON
line on a pipe (the :class:`AppTiming`, or the error that refuses) and exits, while the parent
goes on with its own imports. A fork, not a new interpreter: nothing is imported twice. The
sql and rq workers, spawned first (supervisor/early.py), answer the check themselves before
their start gate (:func:`answer`, :meth:`AppCheck.of_worker`): no fork then, and the app and the
engine are imported once, in the process that runs them.

The wait for the answer is bounded, as the kubelet's startupProbe bounds the whole start: an
app whose import hangs (a connection made at import time to a service that is down) is given
``startup_timeout``, then asked for its threads' stacks (:data:`DUMP_SIGNAL`, faulthandler's, on
the process's stderr: the pod's log) and killed, and ``workerkit run`` exits with the reason. A
stop signal held meanwhile (supervisor/held_signals.py: a pod deleted while it starts) ends the
wait at once: the app has not run a job, the worker waits at its gate, so there is nothing to
drain or release.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import math
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.base import AppTiming
from workerkit.errors import ConfigurationError, WorkerkitError

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = (
    "DUMP_SIGNAL",
    "AppCheck",
    "AppCheckStopped",
    "AppCheckTimedOut",
    "answer",
    "decode",
    "encode",
    "start_app_check",
)

#: Sent to the process loading the app when it overran ``startup_timeout``: faulthandler writes
#: its threads' stacks to its stderr (SIGUSR1, as Celery's worker dumps its stacks on it).
DUMP_SIGNAL: Final = signal.SIGUSR1
#: How long the stacks get to be written before the kill (a few KiB to a pipe or a file).
DUMP_WAIT: Final = 0.5
#: How often the wait looks at the held signals (a signal's handler runs in the wait, but
#: the ``poll`` it interrupted is resumed: PEP 475).
STOP_POLL: Final = 0.1


class AppCheckStopped(WorkerkitError):
    """A stop signal came while the app was loading: the start ends there."""

    def __init__(self, signum: int, waited: float) -> None:
        self.signal_name = signal.Signals(signum).name
        self.waited = waited
        super().__init__(f"{self.signal_name} after {waited:.1f} s, while the app was loading")


class AppCheckTimedOut(WorkerkitError):
    """The app did not load within ``startup_timeout``."""


def encode(timing: AppTiming) -> dict[str, Any]:
    """``timing`` as JSON-ready data."""
    return {
        "tasks": [dataclasses.asdict(task) for task in timing.tasks],
        "celery": None if timing.celery is None else dataclasses.asdict(timing.celery),
    }


def decode(data: Mapping[str, Any]) -> AppTiming:
    """The :class:`AppTiming` that :func:`encode` gave ``data`` for."""
    # Here, not at the top: `workerkit run` imports this module before it spawns the worker.
    from workerkit.timing.budget import CeleryFacts, TaskTiming

    celery = data.get("celery")
    return AppTiming(
        tasks=tuple(TaskTiming(**task) for task in data.get("tasks", ())),
        celery=None if celery is None else CeleryFacts(**celery),
    )


class AppCheck:
    """A running app check (a forked child, or the worker itself); :meth:`result` waits for it.

    :meth:`of_worker`: the worker spawned early (supervisor/early.py) answers the check itself,
    before its start gate; no fork then, and the app and the engine are imported once.
    """

    _pid: int | None  # the forked check's, which this check reaps; None for the worker's
    _loader: int | None  # the process loading the app (None: an exec'd worker not spawned)

    @classmethod
    def of_worker(cls, read_fd: int, pid: int | None) -> AppCheck:
        """The check the worker ``pid`` answers on the pipe whose read end is ``read_fd``
        (the worker is the caller's to kill and reap)."""
        check = cls.__new__(cls)
        check._pid = None
        check._loader = pid
        check._read_fd = read_fd
        return check

    def __init__(self, engine: str, worker_args: Sequence[str], settings: Settings) -> None:
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()  # or the child would write the parent's buffered output again
        sys.stderr.flush()
        try:
            pid = os.fork()
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:  # pragma: no cover - the child (its coverage is not collected)
            os.close(read_fd)
            _child(write_fd, engine, worker_args, settings)
        os.close(write_fd)
        self._pid = self._loader = pid
        self._read_fd = read_fd

    def result(
        self, timeout: float = math.inf, stop: Callable[[], int | None] = lambda: None
    ) -> AppTiming:
        """The app's timing facts; raises :class:`ConfigurationError` when it is refused.

        :class:`AppCheckTimedOut` after ``timeout`` seconds without the answer (the loading
        process's stacks dumped first), :class:`AppCheckStopped` as soon as ``stop`` returns a
        signal number; a forked check is killed and reaped then, a worker is the caller's.
        """
        text = self._read_reply(timeout, stop)
        if self._pid is None:
            ended = "the worker (loading the app before its start gate) ended"
        else:
            _, status = os.waitpid(self._pid, 0)
            ended = (
                "the app check (a child process loading the app) ended with status "
                f"{os.waitstatus_to_exitcode(status)}"
            )
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigurationError(f"{ended} without an answer; its output is above") from None
        if "error" in data:
            raise ConfigurationError(str(data["error"]))
        return decode(data["timing"])

    def _read_reply(self, timeout: float, stop: Callable[[], int | None]) -> bytes:
        started = time.monotonic()
        chunks: list[bytes] = []
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        try:
            while True:
                signum = stop()
                waited = time.monotonic() - started
                if signum is not None:
                    self._kill()
                    raise AppCheckStopped(signum, waited)
                if waited >= timeout:
                    self._dump_stacks()
                    self._kill()
                    raise AppCheckTimedOut(
                        f"the app did not load within startup_timeout ({timeout:g} s): its "
                        "import is still running, most often blocked on a service it connects "
                        "to at import time; its stacks are in the log above. Fix: connect "
                        "lazily (in the task, or on first use), or raise startup_timeout "
                        "(WORKERKIT_STARTUP_TIMEOUT, --startup-timeout)"
                    )
                if poller.poll(1000 * min(STOP_POLL, timeout - waited)):
                    chunk = os.read(self._read_fd, 65536)
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)
        finally:
            os.close(self._read_fd)

    def _dump_stacks(self) -> None:
        """Have the process loading the app write its stacks (:func:`answer` registered the
        signal), and give it :data:`DUMP_WAIT` to do so."""
        if self._loader is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._loader, DUMP_SIGNAL)
            time.sleep(DUMP_WAIT)

    def _kill(self) -> None:
        """Kill and reap the forked check (the worker's is its supervisor's: early.py)."""
        if self._pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._pid, 0)


def start_app_check(engine: str, worker_args: Sequence[str], settings: Settings) -> AppCheck:
    """Start loading and checking the app of ``engine``; :meth:`AppCheck.result` has it."""
    return AppCheck(engine, worker_args, settings)


def answer(fd: int, engine: str, worker_args: Sequence[str], settings: Settings) -> None:
    """Load the app of ``engine``, write its timing (or the error that refuses it) on ``fd``
    as one JSON line, and close ``fd``."""
    from workerkit.engines import get_engine

    try:
        with _stacks_on_request():
            reply: dict[str, Any] = {
                "timing": encode(get_engine(engine, worker_args).app_timing(settings))
            }
    except WorkerkitError as exc:
        reply = {"error": str(exc)}
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(reply) + "\n")


@contextlib.contextmanager
def _stacks_on_request() -> Iterator[None]:
    """While the app loads, :data:`DUMP_SIGNAL` writes this process's stacks to stderr: an
    import that hangs is asked for them before it is killed (:meth:`AppCheck._dump_stacks`)."""
    before = signal.getsignal(DUMP_SIGNAL)
    try:
        faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):  # no stderr with a descriptor
        yield
        return
    try:
        yield
    finally:
        # faulthandler puts back the handler it found; unless the app set its own meanwhile
        # (signal.signal replaced faulthandler's then), which must stay.
        if signal.getsignal(DUMP_SIGNAL) == before:
            faulthandler.unregister(DUMP_SIGNAL)


def _child(fd: int, engine: str, worker_args: Sequence[str], settings: Settings) -> None:
    """The forked child: answer on ``fd``, then leave without running the parent's cleanup."""
    code = 1
    try:
        answer(fd, engine, worker_args, settings)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
