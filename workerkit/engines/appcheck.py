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
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workerkit.engines.base import AppTiming
from workerkit.errors import ConfigurationError, WorkerkitError

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("AppCheck", "answer", "decode", "encode", "start_app_check")


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

    _pid: int | None

    @classmethod
    def of_worker(cls, read_fd: int) -> AppCheck:
        """The check the worker answers on the pipe whose read end is ``read_fd``."""
        check = cls.__new__(cls)
        check._pid = None
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
        self._pid = pid
        self._read_fd = read_fd

    def result(self) -> AppTiming:
        """The app's timing facts; raises :class:`ConfigurationError` when it is refused."""
        with os.fdopen(self._read_fd, "rb") as reply:
            text = reply.read()
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


def start_app_check(engine: str, worker_args: Sequence[str], settings: Settings) -> AppCheck:
    """Start loading and checking the app of ``engine``; :meth:`AppCheck.result` has it."""
    return AppCheck(engine, worker_args, settings)


def answer(fd: int, engine: str, worker_args: Sequence[str], settings: Settings) -> None:
    """Load the app of ``engine``, write its timing (or the error that refuses it) on ``fd``
    as one JSON line, and close ``fd``."""
    from workerkit.engines import get_engine

    try:
        reply: dict[str, Any] = {
            "timing": encode(get_engine(engine, worker_args).app_timing(settings))
        }
    except WorkerkitError as exc:
        reply = {"error": str(exc)}
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(reply) + "\n")


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
