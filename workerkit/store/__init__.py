"""workerkit's SQL store: the job table, its migrations, engines and the schema check.

The queue built on it is :class:`workerkit.engines.sql.SqlQueue`; see docs/engines/sql.md.
"""

from __future__ import annotations

from workerkit.store.db import check_schema as check_schema
from workerkit.store.db import create_engine_for as create_engine_for
from workerkit.store.db import current_revision as current_revision
from workerkit.store.db import head_revision as head_revision
from workerkit.store.db import upgrade as upgrade
from workerkit.store.schema import jobs as jobs
from workerkit.store.schema import metadata as metadata

__all__ = (
    "check_schema",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "jobs",
    "metadata",
    "upgrade",
)
