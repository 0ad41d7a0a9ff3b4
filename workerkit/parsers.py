"""How a setting's raw value (text from the environment or the command line, or a TOML value)
becomes a typed value, or a ValueError saying what is accepted.

Kept apart from :mod:`workerkit.settings` (which declares the settings) so that each stays small;
the URL parser only checks a URL's shape, so nothing here imports an engine library.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

__all__ = (
    "choice",
    "optional",
    "parse_bool",
    "parse_database_url",
    "parse_int",
    "parse_seconds",
    "parse_str",
    "parse_str_list",
    "redacted",
)


def parse_seconds(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError("a number of seconds, such as 30 or 2.5")
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("a number of seconds, such as 30 or 2.5 (no unit)") from None
    else:
        raise ValueError("a number of seconds, such as 30 or 2.5")
    if not math.isfinite(value):
        raise ValueError("a finite number of seconds")
    return value


def parse_int(raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError("a whole number")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError("a whole number") from None
    raise ValueError("a whole number")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError("true or false (also 1/0, yes/no, on/off)")


def parse_str(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError("a string")
    return raw


_URL_EXAMPLES = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9]*(\+[A-Za-z0-9_]+)?")


def parse_database_url(raw: object) -> str:
    """A URL SQLAlchemy can parse: ``dialect[+driver]://...`` with a numeric port, if any.

    Only its shape, without importing SQLAlchemy (the supervisor and the CLI load no engine
    library, and every engine's worker reads this setting from its environment). Whether the
    dialect exists and the SQL store supports it is checked by the sql engine at start.
    """
    text = parse_str(raw).strip()
    scheme, sep, _ = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ValueError(f"a SQLAlchemy URL, such as {_URL_EXAMPLES}")
    try:
        urllib.parse.urlsplit(text).port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"a URL whose port is a number, such as {_URL_EXAMPLES}") from None
    return text


def redacted(raw: object) -> object:
    """``raw`` with the password of a URL replaced by ``***`` (for error messages)."""
    if not isinstance(raw, str):
        return raw
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", raw)


def parse_str_list(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(",")]
    elif isinstance(raw, list | tuple):
        items = [str(part).strip() for part in raw]
    else:
        raise ValueError("a comma-separated list, such as 'default,emails'")
    items = [item for item in items if item]
    if not items:
        raise ValueError("at least one name, such as 'default'")
    return tuple(items)


def choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise ValueError("one of " + ", ".join(repr(c) for c in choices))

    return parse


def optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def parse_optional(raw: object) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in {"", "none", "auto"}):
            return None
        return parse(raw)

    return parse_optional
