"""Rules on the Celery app's own configuration (C): workerkit sets every one of these values
itself, so a rule fails only when the app overrides one unsafely. A value the app sets is the
app's even when it equals Celery's default (``task_acks_late = False``): it is kept and checked."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from workerkit.timing.budget import CELERY_CONFIG_KEYS
from workerkit.timing.rules.base import (
    CELERY_ONLY,
    Context,
    Rule,
    declare,
    fmt,
    fmt_exact,
    largest_passing,
    set_at_least,
    set_to,
)

if TYPE_CHECKING:
    from workerkit.timing.budget import Finding, FixValue

__all__ = (
    "RULES",
    "acks_late_kept",
    "hard_limit_within_job_timeout",
    "prefetch_one",
    "reject_on_worker_lost_kept",
    "soft_limit_below_hard",
    "visibility_timeout_agrees",
)


def _celery_flag(ctx: Context, rule: Rule, field_name: str, why: str) -> list[Finding]:
    key = CELERY_CONFIG_KEYS[field_name]
    value = getattr(ctx.celery, field_name)
    if value is None:
        return [rule.ok(f"{key} not overridden by the app (workerkit sets True)")]
    if value:
        return [rule.ok(f"{key} = True (set by the app)")]
    return [
        rule.fail(
            f"the Celery app sets {key} = False: {why}",
            f"set {key} = True in the Celery app, or remove it (workerkit sets True)",
            {f"celery.{field_name}": True},
        )
    ]


@declare(
    "C1",
    "error",
    "task_acks_late is not turned off (celery)",
    engines=CELERY_ONLY,
    settings=("task_acks_late",),
    prevents="a job acknowledged when it starts and lost at SIGKILL or a crash",
)
def acks_late_kept(ctx: Context, rule: Rule) -> list[Finding]:
    return _celery_flag(
        ctx,
        rule,
        "acks_late",
        "a message is acknowledged when its job starts, so a job in hand at SIGKILL or a crash "
        "is lost",
    )


@declare(
    "C2",
    "error",
    "task_reject_on_worker_lost is not turned off (celery)",
    engines=CELERY_ONLY,
    settings=("task_reject_on_worker_lost",),
    prevents="a job whose pool process is killed being acknowledged as failed and never re-run",
)
def reject_on_worker_lost_kept(ctx: Context, rule: Rule) -> list[Finding]:
    return _celery_flag(
        ctx,
        rule,
        "reject_on_worker_lost",
        "a job whose pool process is killed (OOM, SIGKILL) is acknowledged as failed and never "
        "re-run",
    )


@declare(
    "C3",
    "error",
    "worker_prefetch_multiplier is 1 (celery)",
    engines=CELERY_ONLY,
    settings=("worker_prefetch_multiplier",),
    prevents="reserved messages aging unacknowledged behind running jobs, then redelivered",
)
def prefetch_one(ctx: Context, rule: Rule) -> list[Finding]:
    key = CELERY_CONFIG_KEYS["prefetch_multiplier"]
    value = ctx.celery.prefetch_multiplier
    if value is None:
        return [rule.ok(f"{key} not overridden by the app (workerkit sets 1)")]
    if value == 1:
        return [rule.ok(f"{key} = 1 (set by the app)")]
    reserved = "without limit" if value <= 0 else f"{value} x concurrency messages"
    return [
        rule.fail(
            f"the Celery app sets {key} = {value}: the worker reserves {reserved}; they wait "
            f"unacknowledged behind running jobs, their visibility_timeout clock running, and "
            f"can be redelivered to another worker while still queued here",
            f"set {key} = 1 in the Celery app, or remove it (workerkit sets 1)",
            {"celery.prefetch_multiplier": 1},
        )
    ]


@declare(
    "C4",
    "error",
    "soft time limit below the hard time limit (celery)",
    engines=CELERY_ONLY,
    settings=("task_soft_time_limit", "task_time_limit"),
    prevents="a soft limit that never fires, so a job is killed without a chance to checkpoint",
)
def soft_limit_below_hard(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    soft_key, hard_key = CELERY_CONFIG_KEYS["soft_time_limit"], CELERY_CONFIG_KEYS["time_limit"]
    soft, hard = ctx.celery.soft_time_limit, ctx.celery.time_limit
    if hard is None:
        hard, hard_text = b.job_timeout, f"{hard_key} (job_timeout, set by workerkit)"
    else:
        hard_text = hard_key
    if soft is None:
        return [rule.ok(f"{soft_key} not overridden by the app (workerkit sets it below J)")]
    if soft < hard:
        return [rule.ok(f"{soft_key} = {fmt(soft)} s < {hard_text} = {fmt(hard)} s")]
    limit = hard
    fixed = largest_passing(max(hard - b.release_margin, hard / 2), lambda x: x < limit)
    fix = (
        f"set {soft_key} to at most {fmt_exact(fixed)} in the Celery app, or remove it"
        if fixed is not None
        else f"remove {soft_key} from the Celery app"
    )
    values: dict[str, FixValue] = {"celery.soft_time_limit": fixed} if fixed is not None else {}
    return [
        rule.fail(
            f"the Celery app sets {soft_key} = {fmt(soft)} s, not below {hard_text} = "
            f"{fmt(hard)} s: the soft limit never fires first, so the job is killed without a "
            f"chance to checkpoint or release",
            fix,
            values,
            settings=(soft_key, hard_key)
            if ctx.celery.time_limit is not None
            else (
                soft_key,
                "job_timeout",
            ),
        )
    ]


@declare(
    "C5",
    "error",
    "task_time_limit <= job_timeout (celery)",
    engines=CELERY_ONLY,
    settings=("task_time_limit", "job_timeout"),
    prevents="jobs running past the J that visibility_timeout was checked against",
)
def hard_limit_within_job_timeout(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    key = CELERY_CONFIG_KEYS["time_limit"]
    hard, j = ctx.celery.time_limit, b.job_timeout
    if hard is None:
        return [rule.ok(f"{key} not overridden by the app (workerkit sets it to job_timeout)")]
    if hard <= j:
        return [rule.ok(f"{key} = {fmt(hard)} s <= job_timeout J = {fmt(j)} s")]
    return [
        rule.fail(
            f"the Celery app sets {key} = {fmt(hard)} s, above job_timeout J = {fmt(j)} s: jobs "
            f"run past the J that visibility_timeout was checked against",
            f"set {key} to at most {fmt_exact(j)} in the Celery app, or remove it; or "
            f"{set_at_least('job_timeout', math.ceil(hard))}",
            {"celery.time_limit": j},
        )
    ]


@declare(
    "C6",
    "error",
    "the app's visibility timeout agrees with visibility_timeout (celery)",
    engines=CELERY_ONLY,
    settings=("visibility_timeout", "broker_transport_options['visibility_timeout']"),
    prevents="a budget checked against one V while Redis uses another",
)
def visibility_timeout_agrees(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    key = CELERY_CONFIG_KEYS["visibility_timeout"]
    theirs, v = ctx.celery.visibility_timeout, b.visibility_timeout
    if theirs is None:
        return [rule.ok(f"{key} not overridden by the app (workerkit sets visibility_timeout)")]
    if theirs == v:
        return [rule.ok(f"{key} = {fmt(theirs)} s, the same as visibility_timeout")]
    return [
        rule.fail(
            f"the Celery app sets {key} = {fmt(theirs)} s but visibility_timeout V = {fmt(v)} s: "
            f"the budget is checked against a V that Redis does not use",
            f"set {key} to {fmt_exact(v)} in the Celery app or remove it; or "
            f"{set_to('visibility_timeout', theirs)} if that is the V you mean",
            {"celery.visibility_timeout": v},
        )
    ]


#: In the order findings are reported.
RULES: tuple[Rule, ...] = (
    acks_late_kept,
    reject_on_worker_lost_kept,
    prefetch_one,
    soft_limit_below_hard,
    hard_limit_within_job_timeout,
    visibility_timeout_agrees,
)
