"""The sql engine: workerkit's own queue in SQLite or PostgreSQL (docs/engines/sql.md).

The queue (:class:`SqlQueue`), the supervisor's view of the engine (:class:`SqlEngine`) and the
schema functions behind ``workerkit db upgrade`` and ``workerkit db check``. The worker loop is
:mod:`workerkit.engines.sql.worker` (``python -m workerkit.engines.sql``). Names are imported on
first use, so that the supervisor, which needs only :class:`SqlEngine`, never loads SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.lazy import lazy_attribute

if TYPE_CHECKING:
    from workerkit.engines.sql.db import check_schema as check_schema
    from workerkit.engines.sql.db import create_engine_for as create_engine_for
    from workerkit.engines.sql.db import current_revision as current_revision
    from workerkit.engines.sql.db import head_revision as head_revision
    from workerkit.engines.sql.db import upgrade as upgrade
    from workerkit.engines.sql.engine import SqlEngine as SqlEngine
    from workerkit.engines.sql.listener import NOTIFY_CHANNEL as NOTIFY_CHANNEL
    from workerkit.engines.sql.queue import SqlQueue as SqlQueue

__all__ = (
    "NOTIFY_CHANNEL",
    "SqlEngine",
    "SqlQueue",
    "check_schema",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "upgrade",
)

#: public name -> the module that defines it (imported on first access).
_HOMES: Final = {
    "NOTIFY_CHANNEL": "listener",
    "SqlEngine": "engine",
    "SqlQueue": "queue",
    "check_schema": "db",
    "create_engine_for": "db",
    "current_revision": "db",
    "head_revision": "db",
    "upgrade": "db",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _HOMES, globals(), name)
