"""Structured logging: one line per record, with a stable ``event`` field.

Library modules log through their module logger with ``extra={"event": "...", ...}``;
:func:`configure_logging` (called once by the CLI, in the supervisor and in the worker) decides
how the lines look:

* ``json``: one JSON object per line with ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
  ``event``, ``message``, the record's extra fields and, for an exception, ``exception``;
* ``text``: ``2025-01-01T12:00:00.000Z INFO  workerkit.supervisor drain_started: message k=v``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Final, TextIO

__all__ = ("JsonFormatter", "TextFormatter", "configure_logging")

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RESERVED: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_DEFAULT_EVENT: Final = "log"
_HANDLER_MARK: Final = "_workerkit_handler"


def _timestamp(created: float) -> str:
    moment = dt.datetime.fromtimestamp(created, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


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
        return json.dumps(data, default=str, separators=(",", ":"))


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
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic announces its migration context at INFO on every schema check (readiness runs
    # one every few seconds); that is noise unless someone is debugging.
    logging.getLogger("alembic").setLevel(
        logging.DEBUG if level.lower() == "debug" else logging.WARNING
    )
