"""Alembic's environment for workerkit's own migrations.

Alembic runs this file; it is not meant to be imported. Configuration comes from
:func:`workerkit.engines.sql.db.alembic_config`, normally with an open connection in
``config.attributes["connection"]``; a ``sqlalchemy.url`` main option is accepted too (and is
the only input in offline ``--sql`` mode).
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from alembic import context

from workerkit.engines.sql.schema import VERSION_TABLE, full_metadata

# Arbitrary but fixed: every `workerkit db upgrade` against one PostgreSQL database takes this
# transaction-scoped advisory lock, so concurrent upgraders (two Helm releases, a Job retried
# while the first is still running) apply each revision once, one after the other.
_ADVISORY_LOCK_KEY: Final = 0x776B6462_0001  # "wkdb", 1


def _migrate(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=full_metadata(),
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
            )
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    from workerkit.engines.sql.db import create_engine_for

    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url: use workerkit.engines.sql.upgrade")
    engine = create_engine_for(url)
    try:
        with engine.begin() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


def _run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url") or "postgresql+psycopg://",
        target_metadata=full_metadata(),
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# Alembic installs `context.config` only while it runs this file; imported any other way (an
# import-every-module test, documentation tools) the file does nothing.
if hasattr(context, "config"):
    if context.is_offline_mode():
        _run_offline()
    else:
        _run_online()
