"""Structured logging: one line per record, with a stable ``event`` field.

Library modules log through their module logger with ``extra={"event": "...", ...}``;
:func:`configure_logging` (called once per process by the CLI) sets the format, ``json`` or
``text``, and :func:`route_logger` sends a library's own loggers through the same handler. The
formats: docs/operations/lifecycle.md ("Logs").
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from types import TracebackType
from typing import Any, Final, TextIO

__all__ = (
    "JsonFormatter",
    "TextFormatter",
    "add_handler_filter",
    "configure_logging",
    "route_logger",
)

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RESERVED: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_DEFAULT_EVENT: Final = "log"
_HANDLER_MARK: Final = "_workerkit_handler"
#: Loggers sent to workerkit's handler by route_logger(), re-routed by configure_logging().
_routed: dict[str, int | None] = {}
#: Filters every record passes on its way out (add_handler_filter), kept across reconfiguring.
_filters: list[logging.Filter] = []
_uncaught = logging.getLogger("workerkit.uncaught")
#: ``json.dumps(data, default=str, separators=(",", ":"))`` without a new encoder per line.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=str)


#: The last second formatted, and its text up to the milliseconds (one tuple: read at once by
#: any thread). A worker logs a few lines per job, most within the same second.
_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """``created`` as ISO 8601 UTC with milliseconds, as ``datetime.fromtimestamp`` rounds it
    (to the microsecond, half to even) and ``strftime`` writes it; the second's text is reused."""
    global _second
    fraction, whole = math.modf(created)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:  # before 1970: the fraction counts back from the second
        second, micros = second - 1, micros + 1_000_000
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
    return f"{cached[1]}{micros // 1000:03d}Z"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RESERVED and key != "event" and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", _DEFAULT_EVENT),
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(data)


class TextFormatter(logging.Formatter):
    """A readable line: time, level, logger, event, message, then ``key=value`` extras."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", _DEFAULT_EVENT)
        line = (
            f"{_timestamp(record.created)} {record.levelname:<7} {record.name} "
            f"{event}: {record.getMessage()}"
        )
        extras = " ".join(
            f"{key}={json.dumps(value, default=str)}"
            for key, value in _extra_fields(record).items()
        )
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logging(
    level: str = "info",
    format: str = "json",  # noqa: A002 - the setting's name
    stream: TextIO | None = None,
) -> None:
    """Send every log record of this process to ``stream`` (stderr) as ``format`` lines.

    Calling it again replaces the handler it installed before (and only that one).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    for record_filter in _filters:
        handler.addFilter(record_filter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, routed_level in _routed.items():
        route_logger(name, level=routed_level)
    json_mode = format == "json"
    # JSON mode: a warning (``py.warnings``) or an uncaught exception is a record too, not
    # text on stderr. Text mode leaves Python's own output alone.
    logging.captureWarnings(json_mode)
    sys.excepthook = _log_uncaught if json_mode else sys.__excepthook__
    threading.excepthook = _log_uncaught_in_thread if json_mode else threading.__excepthook__
    # Alembic announces its migration context at INFO on every schema check (readiness runs
    # one every few seconds); that is noise unless someone is debugging.
    logging.getLogger("alembic").setLevel(
        logging.DEBUG if level.lower() == "debug" else logging.WARNING
    )


def _handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, _HANDLER_MARK, False)]


def add_handler_filter(record_filter: logging.Filter) -> None:
    """Pass every record workerkit's handler writes through ``record_filter`` first.

    For an engine that adds context fields (a Celery task's id) to whatever logger a record
    came from: a filter on a logger would only see that logger's own records.
    """
    _filters.append(record_filter)
    for handler in _handlers():
        handler.addFilter(record_filter)


def route_logger(name: str, *, level: int | None = None) -> None:
    """Send logger ``name``'s records to workerkit's handler only (its own handlers go).

    For loggers a library configures itself and does not let propagate (billiard's
    ``multiprocessing``, which falls back to plain text on stderr otherwise). ``level``, when
    given, is set on the logger. Kept across later :func:`configure_logging` calls.
    """
    _routed[name] = level
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in _handlers():
        logger.addHandler(handler)
    # Our handler is on the logger itself: a library that turns propagation back off (billiard
    # does, each time it rebuilds its logger) cannot send its lines around it.
    logger.propagate = False
    if level is not None:
        logger.setLevel(level)


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    _uncaught.critical(
        "uncaught exception: %s: %s",
        kind.__name__,
        value,
        exc_info=(kind, value, tb),
        extra={"event": "uncaught_exception"},
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else None
    _uncaught.error(
        "uncaught exception in thread %s: %s: %s",
        thread,
        args.exc_type.__name__,
        args.exc_value,
        exc_info=None
        if args.exc_value is None
        else (args.exc_type, args.exc_value, args.exc_traceback),
        extra={"event": "uncaught_exception", "thread_name": thread},
    )
