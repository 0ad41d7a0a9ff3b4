"""The app check: load the user's app in a short-lived process, report its timing facts.

``workerkit run ENGINE`` must refuse a bad app or timing budget before it starts anything, and
that means loading the app, which imports the engine's libraries (SQLAlchemy, rq, Celery). Done
in the supervisor, they would stay resident for its whole life; so :func:`start_app_check` runs
``python -m workerkit.engines.appcheck ENGINE [worker args]`` (settings by environment, as the
worker gets them), the supervisor's own imports go on meanwhile, and :meth:`AppCheck.result`
reads one JSON line from a private pipe: the :class:`AppTiming`, or the error that refuses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any, Final

from workerkit import exitcodes
from workerkit.engines.base import AppTiming
from workerkit.errors import ConfigurationError, WorkerkitError
from workerkit.timing.budget import CeleryFacts, TaskTiming

__all__ = ("FD_ENV", "AppCheck", "decode", "encode", "main", "start_app_check")

#: The file descriptor the check writes its answer to (stdout and stderr stay the app's).
FD_ENV: Final = "WORKERKIT_APPCHECK_FD"


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
    """A running app check; :meth:`result` waits for it."""

    def __init__(self, engine: str, worker_args: Sequence[str], env: Mapping[str, str]) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "workerkit.engines.appcheck", engine, *worker_args],
                env={**env, FD_ENV: str(write_fd)},
                stdin=subprocess.DEVNULL,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._answer: IO[bytes] = os.fdopen(read_fd, "rb")

    def result(self) -> AppTiming:
        """The app's timing facts; raises :class:`ConfigurationError` when it is refused."""
        with self._answer:
            answer = self._answer.read()
        code = self._process.wait()
        try:
            data = json.loads(answer)
        except ValueError:
            raise ConfigurationError(
                f"the app check (python -m workerkit.engines.appcheck) exited with code {code} "
                "without an answer; its output is above"
            ) from None
        if "error" in data:
            raise ConfigurationError(str(data["error"]))
        return decode(data["timing"])


def start_app_check(engine: str, worker_args: Sequence[str], env: Mapping[str, str]) -> AppCheck:
    """Start checking the app of ``engine`` (settings in ``env``, as ``WORKERKIT_*``)."""
    return AppCheck(engine, worker_args, env)


def _answer(engine: str, worker_args: Sequence[str]) -> dict[str, Any]:
    from workerkit.engines import get_engine
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        timing = get_engine(engine, worker_args).app_timing(settings)
    except WorkerkitError as exc:
        return {"error": str(exc)}
    return {"timing": encode(timing)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workerkit.engines.appcheck ENGINE [worker args]``: 0, or 2 when refused."""
    args = list(sys.argv[1:] if argv is None else argv)
    answer = _answer(args[0], args[1:])
    with os.fdopen(int(os.environ[FD_ENV]), "w") as out:
        out.write(json.dumps(answer) + "\n")
    return exitcodes.CONFIG_ERROR if "error" in answer else exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
