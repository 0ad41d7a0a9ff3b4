"""The sql engine: workerkit's own queue in SQLite or PostgreSQL (docs/engines/sql.md).

The queue (:class:`SqlQueue`), the supervisor's view of the engine (:class:`SqlEngine`) and the
schema functions behind ``workerkit db upgrade`` and ``workerkit db check``. The worker loop is
:mod:`workerkit.engines.sql.worker` (``python -m workerkit.engines.sql``).
"""

from __future__ import annotations

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
