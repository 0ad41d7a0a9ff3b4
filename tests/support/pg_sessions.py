"""Connection kills on a test's PostgreSQL database (what a restart or a failover does to them)."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa

__all__ = ("kill_sessions",)


def kill_sessions(url: str) -> int:
    """pg_terminate_backend of every other session on ``url``'s database; how many."""
    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])
