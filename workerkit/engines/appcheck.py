"""The app check: load the user's app in a short-lived process, report its timing facts.

``workerkit run ENGINE`` must refuse a bad app or timing budget before it starts anything, and
that means loading the app, which imports the engine's libraries (SQLAlchemy, rq, Celery). Done
in the supervisor, they would stay resident for its whole life; so :func:`start_app_check`
forks the (still single-threaded) CLI process, the child loads the app and answers one JSON
line on a pipe (the :class:`AppTiming`, or the error that refuses) and exits, while the parent
goes on with its own imports. A fork, not a new interpreter: nothing is imported twice.
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
from workerkit.timing.budget import CeleryFacts, TaskTiming

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("AppCheck", "decode", "encode", "start_app_check")


def encode(timing: AppTiming) -> dict[str, Any]:
    """``timing`` as JSON-ready data."""
    return {
        "tasks": [dataclasses.asdict(task) for task in timing.tasks],
        "celery": None if timing.celery is None else dataclasses.asdict(timing.celery),
    }


def decode(data: Mapping[str, Any]) -> AppTiming:
    """The :class:`AppTiming` that :func:`encode` gave ``data`` for."""
    celery = data.get("celery")
    return AppTiming(
        tasks=tuple(TaskTiming(**task) for task in data.get("tasks", ())),
        celery=None if celery is None else CeleryFacts(**celery),
    )


class AppCheck:
    """A running app check (a forked child); :meth:`result` waits for it."""

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
        with os.fdopen(self._read_fd, "rb") as answer:
            text = answer.read()
        _, status = os.waitpid(self._pid, 0)
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigurationError(
                "the app check (a child process loading the app) ended with status "
                f"{os.waitstatus_to_exitcode(status)} without an answer; its output is above"
            ) from None
        if "error" in data:
            raise ConfigurationError(str(data["error"]))
        return decode(data["timing"])


def start_app_check(engine: str, worker_args: Sequence[str], settings: Settings) -> AppCheck:
    """Start loading and checking the app of ``engine``; :meth:`AppCheck.result` has it."""
    return AppCheck(engine, worker_args, settings)


def _child(fd: int, engine: str, worker_args: Sequence[str], settings: Settings) -> None:
    """The forked child: answer on ``fd``, then leave without running the parent's cleanup."""
    code = 1
    try:
        from workerkit.engines import get_engine

        try:
            answer: dict[str, Any] = {
                "timing": encode(get_engine(engine, worker_args).app_timing(settings))
            }
        except WorkerkitError as exc:
            answer = {"error": str(exc)}
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(answer) + "\n")
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
