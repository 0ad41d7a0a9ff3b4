"""Rules on the shutdown itself: the drain window fits in the grace period (G), long tasks
survive being interrupted (T), and checkpoints come often enough for the drain window (F)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

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
    from workerkit.timing.budget import Budget, Finding

__all__ = (
    "MIN_DRAIN_WINDOW",
    "RULES",
    "checkpoints_within_drain",
    "drain_window_fits",
    "drain_window_long_enough",
    "long_tasks_rerun_safely",
    "prestop_below_grace",
)

#: Below this drain window (seconds) nearly every job in hand at a deploy is released, not
#: finished (rule G3).
MIN_DRAIN_WINDOW = 5.0


def _healthy_drain(b: Budget) -> float:
    """The drain window a grace_period fix aims at: enough for G3 and for F1."""
    return max(MIN_DRAIN_WINDOW, 2 * b.checkpoint_interval)


def _grace_for_drain(b: Budget, drain: float) -> float:
    """The smallest whole grace_period that gives a drain window of at least ``drain``."""
    p, m = b.prestop_delay, b.release_margin
    return smallest_passing(p + m + drain, lambda g: g - p - m >= drain)


@declare(
    "G1",
    "error",
    "P + D + M <= G with a drain window D > 0",
    engines=ALL_ENGINES,
    settings=("grace_period", "prestop_delay", "release_margin"),
    prevents="the kubelet's SIGKILL landing before the job in hand is released",
)
def drain_window_fits(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    g, p, m, d = b.grace_period, b.prestop_delay, b.release_margin, b.drain_window
    if d > 0:
        return [
            rule.ok(
                f"drain window D = grace_period - prestop_delay - release_margin = "
                f"{fmt(g)} - {fmt(p)} - {fmt(m)} = {fmt(d)} s; the job in hand is released "
                f"before SIGKILL",
            )
        ]
    grace = _grace_for_drain(b, _healthy_drain(b))
    return [
        rule.fail(
            f"no drain window: D = grace_period - prestop_delay - release_margin = "
            f"{fmt(g)} - {fmt(p)} - {fmt(m)} = {fmt(d)} s, so P + M does not fit in G and the "
            f"kubelet's SIGKILL lands before the job in hand is released",
            f"{set_at_least('grace_period', grace)}, or lower prestop_delay or release_margin",
            {"grace_period": grace},
        )
    ]


@declare(
    "G2",
    "error",
    "P < G",
    engines=ALL_ENGINES,
    settings=("prestop_delay", "grace_period"),
    prevents="a preStop hook outlasting the grace period: SIGTERM never reaches the worker",
)
def prestop_below_grace(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    g, p, m = b.grace_period, b.prestop_delay, b.release_margin
    if p < g:
        what = "no preStop delay" if p == 0 else f"prestop_delay {fmt(p)} s"
        return [rule.ok(f"{what}, below grace_period {fmt(g)} s: SIGTERM reaches the worker")]
    target = _healthy_drain(b)
    prestop = largest_passing(g - m - target, lambda x: x + m + target <= g) or 0.0
    grace = _grace_for_drain(b, target)
    return [
        rule.fail(
            f"prestop_delay {fmt(p)} s is not below grace_period {fmt(g)} s: the preStop hook "
            f"is still running at SIGKILL, so the worker never gets SIGTERM and never drains",
            f"lower prestop_delay below {fmt(g)}, e.g. {set_to('prestop_delay', prestop)}, or "
            f"set grace_period to at least {fmt(grace)}",
            {"prestop_delay": prestop},
        )
    ]


@declare(
    "G3",
    "warning",
    f"D >= {MIN_DRAIN_WINDOW:g}",
    engines=ALL_ENGINES,
    settings=("grace_period", "prestop_delay", "release_margin"),
    prevents="a drain window so short that nearly every job in hand at a deploy is interrupted",
)
def drain_window_long_enough(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    d = b.drain_window
    if d >= MIN_DRAIN_WINDOW:
        return [rule.ok(f"drain window D = {fmt(d)} s is at least {fmt(MIN_DRAIN_WINDOW)} s")]
    target = _healthy_drain(b)
    grace = _grace_for_drain(b, target)
    return [
        rule.fail(
            f"drain window D = grace_period - prestop_delay - release_margin = {fmt(d)} s is "
            f"under {fmt(MIN_DRAIN_WINDOW)} s: nearly every job in hand at a deploy is "
            f"interrupted and released instead of finishing",
            f"{set_at_least('grace_period', grace)} for a drain window of {fmt(target)} s",
            {"grace_period": grace},
        )
    ]


@declare(
    "T1",
    "warning",
    "a task with J > D is idempotent or checkpointed",
    engines=ALL_ENGINES,
    settings=("job_timeout", "grace_period"),
    prevents="a long task that every deploy interrupts and that re-runs from the start",
)
def long_tasks_rerun_safely(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    d = b.drain_window
    if not b.tasks:
        return [
            rule.ok(
                f"no tasks given; each task's timeout is checked against D = {fmt(d)} s when "
                f"the app's tasks are known",
            )
        ]
    findings: list[Finding] = []
    fits = safe = 0
    for task in b.tasks:
        j = b.task_timeout(task)
        if j <= d:
            fits += 1
            continue
        if task.idempotent or task.checkpointed:
            safe += 1
            continue
        p, m = b.prestop_delay, b.release_margin
        grace = _grace_for_drain(b, j)
        source = "job_timeout" if task.timeout is None else "its timeout"
        lower = f"lower its timeout to at most {fmt(math.floor(d))}, " if math.floor(d) > 0 else ""
        findings.append(
            rule.fail(
                f"task {task.name!r}: J = {fmt(j)} s ({source}) exceeds the drain window "
                f"D = {fmt(d)} s and the task is neither idempotent nor checkpointed: every "
                f"deploy can interrupt it; it will re-run from the start",
                f"checkpoint it or make it idempotent, {lower}or "
                f"{set_at_least('grace_period', grace)} (D = {fmt(grace - p - m)} s)",
                {"grace_period": grace},
                settings=("job_timeout", "grace_period")
                if task.timeout is None
                else ("grace_period",),
                task=task.name,
            )
        )
    if findings:
        return findings
    n = len(b.tasks)
    return [
        rule.ok(
            f"{n} task{'s' if n != 1 else ''}: {fits} finish within D = {fmt(d)} s, "
            f"{safe} longer one{'s' if safe != 1 else ''} re-run safely "
            f"(idempotent or checkpointed)",
        )
    ]


@declare(
    "F1",
    "error",
    "F <= D / 2",
    engines=ALL_ENGINES,
    settings=("checkpoint_interval", "grace_period"),
    prevents="checkpoints so rare that an interrupted job loses more work than a drain can do",
)
def checkpoints_within_drain(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    f, d = b.checkpoint_interval, b.drain_window
    if f <= d / 2:
        return [rule.ok(f"checkpoint_interval F = {fmt(f)} s <= D / 2 = {fmt(d / 2)} s")]
    problem = (
        f"checkpoint_interval F = {fmt(f)} s is above half the drain window "
        f"(D / 2 = {fmt(d / 2)} s): a checkpointed job that cannot stop in time loses up to F "
        f"of work, more than the drain window lets it do"
    )
    interval = largest_passing(d / 2, lambda x: x <= d / 2) if d > 0 else None
    if interval is not None:
        fix = (
            f"{set_at_most('checkpoint_interval', interval)}, or set grace_period to at "
            f"least {fmt(_grace_for_drain(b, 2 * f))}"
        )
        return [rule.fail(problem, fix, {"checkpoint_interval": interval})]
    grace = _grace_for_drain(b, 2 * f)
    return [rule.fail(problem, set_at_least("grace_period", grace), {"grace_period": grace})]


#: In the order findings are reported.
RULES: tuple[Rule, ...] = (
    drain_window_fits,
    prestop_below_grace,
    drain_window_long_enough,
    long_tasks_rerun_safely,
    checkpoints_within_drain,
)
