"""Rules for running several replicas: scheduler leadership timing (L) and a database that every
replica can share (S). L1/L2 check the leader lease settings the scheduler uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workerkit.settings import ENV_PREFIX
from workerkit.timing.rules.base import (
    ALL_ENGINES,
    Context,
    Rule,
    declare,
    fmt,
    largest_passing,
    set_at_least,
    set_at_most,
    set_to,
    smallest_passing,
)

if TYPE_CHECKING:
    from workerkit.timing.budget import Finding, FixValue

__all__ = (
    "LEADER_JITTER_FACTOR",
    "RULES",
    "leader_renews_within_lease",
    "leader_timing_chain",
    "sqlite_single_replica",
)

#: client-go's ``JitterFactor``: renew_deadline must exceed retry_period times this (rule L1).
LEADER_JITTER_FACTOR = 1.2


@declare(
    "L1",
    "error",
    f"L > Rd > {LEADER_JITTER_FACTOR:g} x Rp",
    engines=ALL_ENGINES,
    settings=("leader_lease", "renew_deadline", "retry_period"),
    prevents="two schedulers leading at once, or leadership lost to one slow renewal",
)
def leader_timing_chain(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    lease, rd, rp = b.leader_lease, b.renew_deadline, b.retry_period
    jitter = LEADER_JITTER_FACTOR * rp
    chain = (
        f"leader_lease L = {fmt(lease)} s, renew_deadline Rd = {fmt(rd)} s, "
        f"{fmt(LEADER_JITTER_FACTOR)} x retry_period Rp = {fmt(jitter)} s"
    )
    if lease > rd > jitter:
        return [rule.ok(f"L > Rd > {fmt(LEADER_JITTER_FACTOR)} x Rp: {chain}")]
    problems: list[str] = []
    fixes: list[str] = []
    values: dict[str, FixValue] = {}
    if not rd > jitter:
        problems.append(
            f"renew_deadline is not above {fmt(LEADER_JITTER_FACTOR)} x retry_period, so a "
            f"leader gets barely one renewal try before it gives up"
        )
        retry = largest_passing(rd / 5, lambda x: rd > LEADER_JITTER_FACTOR * x)
        if retry is not None:
            fixes.append(set_at_most("retry_period", retry))
            values["retry_period"] = retry
        else:  # renew_deadline too small for any retry_period: raise it instead
            rd = smallest_passing(jitter, lambda x: x > jitter)
            fixes.append(set_at_least("renew_deadline", rd))
            values["renew_deadline"] = rd
    if not lease > rd:
        if lease <= b.renew_deadline:
            problems.append(
                "leader_lease is not above renew_deadline, so a standby can take the lease "
                "while the leader is still renewing: two schedulers lead at once"
            )
        new_lease = smallest_passing(1.5 * rd, lambda x: x > rd)
        fixes.append(set_at_least("leader_lease", new_lease))
        values["leader_lease"] = new_lease
    return [rule.fail(f"{chain}: " + "; ".join(problems), " and ".join(fixes), values)]


@declare(
    "L2",
    "warning",
    "Rd + Rp < L",
    engines=ALL_ENGINES,
    settings=("leader_lease", "renew_deadline", "retry_period"),
    prevents="a leader's last renewal try landing after its lease expired",
)
def leader_renews_within_lease(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    lease, rd, rp = b.leader_lease, b.renew_deadline, b.retry_period
    total = rd + rp
    terms = f"renew_deadline + retry_period = {fmt(rd)} + {fmt(rp)} = {fmt(total)} s"
    if total < lease:
        return [rule.ok(f"{terms} < leader_lease L = {fmt(lease)} s")]
    fixed = smallest_passing(total, lambda x: total < x)
    return [
        rule.fail(
            f"{terms} is not below leader_lease L = {fmt(lease)} s: a leader's last renewal try "
            f"can land after its lease expired, when a standby may already lead (fire records "
            f"stay unique, but leadership flaps)",
            set_at_least("leader_lease", fixed),
            {"leader_lease": fixed},
        )
    ]


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
RULES: tuple[Rule, ...] = (leader_timing_chain, leader_renews_within_lease, sqlite_single_replica)
