"""The rq engine's own arguments: --worker-class, --serializer, --url, --with-scheduler.

``workerkit run rq`` passes what follows the settings here, and the supervisor hands the parsed
arguments on to the worker process's command line (:func:`worker_argv`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Final, NoReturn

from workerkit.errors import ConfigurationError

__all__ = ("WORKER_CLASS_NAMES", "parse_worker_args", "worker_argv")

#: ``--worker-class`` choices: fork a work horse per job (RQ's default), or run jobs in process.
WORKER_CLASS_NAMES: Final = ("forking", "simple")


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="workerkit run rq", add_help=False)
    parser.add_argument("--worker-class", choices=WORKER_CLASS_NAMES, default="forking")
    parser.add_argument("--serializer", choices=("json", "pickle"), default="json")
    parser.add_argument("--url", default=None)
    parser.add_argument("--with-scheduler", action="store_true")
    return parser


def parse_worker_args(worker_args: Sequence[str]) -> argparse.Namespace:
    """The rq engine's own arguments; ConfigurationError naming the problem and the choices."""
    try:
        return _parser().parse_args(list(worker_args))
    except _ArgumentError as exc:
        raise ConfigurationError(
            f"workerkit run rq: {exc}; the rq engine takes --worker-class forking|simple, "
            "--serializer json|pickle, --url URL and --with-scheduler (other options are "
            "settings: workerkit run rq --help)"
        ) from None


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The parsed arguments as the worker process's command line takes them."""
    argv = ["--worker-class", args.worker_class, "--serializer", args.serializer]
    if args.url:
        argv += ["--url", args.url]
    if args.with_scheduler:
        argv.append("--with-scheduler")
    return argv
