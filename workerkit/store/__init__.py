"""Old home of the SQL store's schema functions: import them from workerkit.engines.sql."""

from __future__ import annotations

from workerkit.engines.sql.db import check_schema as check_schema
from workerkit.engines.sql.db import upgrade as upgrade

__all__ = ("check_schema", "upgrade")
