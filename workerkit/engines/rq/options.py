"""The rq engine's own arguments: --worker-class, --serializer, --url, --with-scheduler.

They are declared once in :data:`workerkit.engines.ENGINE_OPTIONS` (so ``workerkit run rq
--help`` lists them without importing rq); ``workerkit run rq`` passes them here, and the
supervisor hands the parsed arguments on to the worker process's command line
(:func:`worker_argv`). ``--serializer`` defaults to ``$WORKERKIT_RQ_SERIALIZER``, then
``json``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Final, NoReturn

from workerkit.engines import ENGINE_OPTIONS
from workerkit.errors import ConfigurationError

__all__ = (
    "SERIALIZER_ENV",
    "SERIALIZER_NAMES",
    "WORKER_CLASS_NAMES",
    "parse_worker_args",
    "worker_argv",
)

#: ``--worker-class`` choices: fork a work horse per job (RQ's default), or run jobs in process.
WORKER_CLASS_NAMES: Final = next(
    option.choices for option in ENGINE_OPTIONS["rq"] if option.flag == "--worker-class"
)
#: ``--serializer`` choices, safest first: JSON; pickle through an allowlist (to drain a queue
#: that producers on RQ's defaults filled); plain pickle (trusted writers only).
SERIALIZER_NAMES: Final = next(
    option.choices for option in ENGINE_OPTIONS["rq"] if option.flag == "--serializer"
)
#: The variable that chooses the serializer when ``--serializer`` is not given.
SERIALIZER_ENV: Final = "WORKERKIT_RQ_SERIALIZER"


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="workerkit run rq", add_help=False)
    for option in ENGINE_OPTIONS["rq"]:
        if option.is_flag:
            parser.add_argument(option.flag, action="store_true")
        else:
            parser.add_argument(option.flag, choices=option.choices or None, default=option.default)
    return parser


def parse_worker_args(worker_args: Sequence[str]) -> argparse.Namespace:
    """The rq engine's own arguments; ConfigurationError naming the problem and the choices."""
    try:
        args = _parser().parse_args(list(worker_args))
    except _ArgumentError as exc:
        takes = ", ".join(
            option.flag
            + ("" if option.is_flag else " " + ("|".join(option.choices) or str(option.metavar)))
            for option in ENGINE_OPTIONS["rq"]
        )
        raise ConfigurationError(
            f"workerkit run rq: {exc}; the rq engine takes {takes} (other options are "
            "settings: workerkit run rq --help)"
        ) from None
    if args.serializer is None:
        args.serializer = os.environ.get(SERIALIZER_ENV) or "json"
        if args.serializer not in SERIALIZER_NAMES:
            raise ConfigurationError(
                f"{SERIALIZER_ENV}={args.serializer!r} is not a serializer: use "
                f"{'|'.join(SERIALIZER_NAMES)} (or --serializer; docs/engines/rq.md)"
            )
    return args


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The parsed arguments as the worker process's command line takes them."""
    argv = ["--worker-class", args.worker_class, "--serializer", args.serializer]
    if args.url:
        argv += ["--url", args.url]
    if args.with_scheduler:
        argv.append("--with-scheduler")
    return argv
