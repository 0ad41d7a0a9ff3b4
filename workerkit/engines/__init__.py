"""Engines: how the supervisor starts a worker of each kind and releases its jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workerkit.errors import EngineUnavailable

if TYPE_CHECKING:
    from workerkit.engines.base import Engine

__all__ = ("get_engine",)


def get_engine(name: str) -> Engine:
    """The engine called ``name``; EngineUnavailable when it is unknown or not installed."""
    if name == "sql":
        from workerkit.engines.sql import SqlEngine

        return SqlEngine()
    if name in {"rq", "celery"}:
        raise EngineUnavailable(
            f"engine {name!r} is not available in this version of workerkit yet; "
            "use WORKERKIT_ENGINE=sql (see docs/engines/)"
        )
    raise EngineUnavailable(f"unknown engine {name!r}; expected one of sql, rq, celery")
