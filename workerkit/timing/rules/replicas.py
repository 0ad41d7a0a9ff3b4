"""Rules for running several replicas: a database that every replica can share (S).

The scheduler's leadership rules (L) are in :mod:`workerkit.timing.rules.scheduler`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workerkit.settings import ENV_PREFIX
from workerkit.timing.rules.base import (
    Context,
    Rule,
    declare,
    set_to,
)

if TYPE_CHECKING:
    from workerkit.timing.budget import Finding

__all__ = ("RULES", "sqlite_single_replica")


@declare(
    "S1",
    "error",
    "SQLite only with one replica",
    engines=("sql",),
    settings=("database_url", "replicas"),
    prevents="SQLite claims on several hosts: file locks do not span hosts",
)
def sqlite_single_replica(ctx: Context, rule: Rule) -> list[Finding]:
    s = ctx.settings
    scheme = s.database_url.split(":", 1)[0]  # never the whole URL: it may hold a password
    if not scheme.lower().startswith("sqlite"):
        return [rule.ok(f"database_url is {scheme}, not SQLite: replicas may share it")]
    if s.replicas <= 1:
        return [rule.ok("database_url is SQLite with replicas = 1: one host, as SQLite needs")]
    return [
        rule.fail(
            f"database_url is SQLite ({scheme}) but replicas = {s.replicas}: SQLite's locks "
            f"do not span hosts, so workers on other hosts claim the same jobs or corrupt the "
            f"file",
            f"{set_to('replicas', 1)}, or point database_url at PostgreSQL "
            f"({ENV_PREFIX}DATABASE_URL=postgresql+psycopg://...)",
            {"replicas": 1},
        )
    ]


#: In the order findings are reported.
RULES: tuple[Rule, ...] = (sqlite_single_replica,)
