"""Rules on leases: the visibility timeout V outlasts a run (V), heartbeats keep an extendable
lease alive (H), and idempotency keys outlive runs and redeliveries (I)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from workerkit.settings import ENGINE_DEFAULT_VISIBILITY_TIMEOUT
from workerkit.timing.budget import IN_PROGRESS_EXPIRY_PAD
from workerkit.timing.rules.base import (
    ALL_ENGINES,
    CELERY_ONLY,
    LEASE_ENGINES,
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
    "RULES",
    "VISIBILITY_SLACK_FACTOR",
    "completed_key_outlives_redelivery",
    "heartbeat_survives_one_missed",
    "heartbeat_survives_two_late",
    "key_expires_before_redelivery",
    "key_outlives_run",
    "lease_not_too_long",
    "lease_outlasts_countdown",
    "lease_outlasts_run",
)

#: Rule V3 warns when celery's V is more than this many times the longest time a message can
#: stay unacknowledged, and above kombu's own default (why 4: docs/concepts/timing-budget.md, V3).
VISIBILITY_SLACK_FACTOR = 4.0

_CELERY_DEFAULT_V = ENGINE_DEFAULT_VISIBILITY_TIMEOUT["celery"]


def _v_text(ctx: Context) -> str:
    v = ctx.budget.visibility_timeout
    default = " (the celery default)" if ctx.settings.visibility_timeout is None else ""
    return f"visibility_timeout V = {fmt(v)} s{default}"


@declare(
    "V1",
    "error",
    "V > J + D + M (celery)",
    engines=CELERY_ONLY,
    settings=("visibility_timeout", "job_timeout"),
    prevents="Redis handing a still-running job to a second worker: it runs twice at once",
)
def lease_outlasts_run(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    v, j, d, m = b.visibility_timeout, b.longest_job_timeout, b.drain_window, b.release_margin
    bound = b.run_horizon
    terms = f"J + D + M = {fmt(j)} + {fmt(d)} + {fmt(m)} = {fmt(bound)} s"
    if v > bound:
        return [rule.ok(f"{_v_text(ctx)} > {terms}: no job is handed on while it may still run")]
    fixed = smallest_passing(bound, lambda x: x > bound)
    lower_j = v - d - m
    also = f", or lower job_timeout below {fmt(lower_j)}" if lower_j > 0 and not b.tasks else ""
    return [
        rule.fail(
            f"{_v_text(ctx)} is not above {terms} (J = longest job_timeout): Redis would hand "
            f"a job that is still running to a second worker, which runs it again, "
            f"concurrently",
            f"{set_at_least('visibility_timeout', fixed)}{also}",
            {"visibility_timeout": fixed},
        )
    ]


@declare(
    "V2",
    "error",
    "V > countdown + J + D + M (celery)",
    engines=CELERY_ONLY,
    settings=("visibility_timeout", "max_countdown"),
    prevents="a message waiting for its ETA being redelivered and run twice",
)
def lease_outlasts_countdown(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    v, c = b.visibility_timeout, b.longest_countdown
    if c <= 0:
        return [rule.ok("no ETA or countdown declared (max_countdown = 0)")]
    horizon = b.unacked_horizon
    terms = f"max_countdown + J + D + M = {fmt(horizon)} s"
    if v > horizon:
        return [rule.ok(f"{_v_text(ctx)} > {terms}: a waiting ETA message is not redelivered")]
    fixed = smallest_passing(horizon, lambda x: x > horizon)
    return [
        rule.fail(
            f"{_v_text(ctx)} is not above {terms} (the longest countdown, {fmt(c)} s, plus a "
            f"run): a message waiting for its ETA is held unacknowledged and Redis redelivers "
            f"it, so the job runs twice",
            f"{set_at_least('visibility_timeout', fixed)}, or lower max_countdown",
            {"visibility_timeout": fixed},
        )
    ]


@declare(
    "V3",
    "warning",
    f"V <= max({_CELERY_DEFAULT_V:g}, {VISIBILITY_SLACK_FACTOR:g} x (C + J + D + M))",
    engines=CELERY_ONLY,
    settings=("visibility_timeout",),
    prevents="a job whose pod vanished waiting far longer than needed before it is redelivered",
)
def lease_not_too_long(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    v = b.visibility_timeout
    horizon = b.unacked_horizon
    limit = max(_CELERY_DEFAULT_V, VISIBILITY_SLACK_FACTOR * horizon)
    terms = (
        f"max({fmt(_CELERY_DEFAULT_V)}, {fmt(VISIBILITY_SLACK_FACTOR)} x "
        f"(countdown + J + D + M = {fmt(horizon)})) = {fmt(limit)} s"
    )
    if v <= limit:
        return [rule.ok(f"{_v_text(ctx)} <= {terms}: redelivery after a crash is not delayed")]
    fixed = smallest_passing(max(_CELERY_DEFAULT_V, 2 * horizon), lambda x: horizon < x <= limit)
    return [
        rule.fail(
            f"{_v_text(ctx)} is above {terms}: a job whose pod vanished without releasing it "
            f"(node loss) waits V before another worker runs it",
            set_to("visibility_timeout", fixed),
            {"visibility_timeout": fixed},
        )
    ]


def _heartbeat_fix(b: Budget) -> float | None:
    v = b.visibility_timeout
    return largest_passing(v / 3, lambda x: x <= v / 3)


def _h_text(ctx: Context) -> str:
    h = ctx.budget.heartbeat_interval
    default = " (default V / 3)" if ctx.settings.heartbeat_interval is None else ""
    return f"heartbeat_interval H = {fmt(h)} s{default}"


def _heartbeat_finding(
    ctx: Context, rule: Rule, ok: bool, ok_text: str, problem: str
) -> list[Finding]:
    if ok:
        return [rule.ok(ok_text)]
    b = ctx.budget
    h = b.heartbeat_interval
    fixed = _heartbeat_fix(b)
    if fixed is not None:
        fix = (
            f"{set_at_most('heartbeat_interval', fixed)} (or unset it: V / 3), or set "
            f"visibility_timeout to at least {fmt(math.ceil(3 * h))}"
        )
        return [rule.fail(problem, fix, {"heartbeat_interval": fixed})]
    lease = smallest_passing(3 * h, lambda x: h <= x / 3)
    return [
        rule.fail(problem, set_at_least("visibility_timeout", lease), {"visibility_timeout": lease})
    ]


@declare(
    "H1",
    "warning",
    "H <= V / 3 (extendable leases)",
    engines=LEASE_ENGINES,
    settings=("heartbeat_interval", "visibility_timeout"),
    prevents="one late heartbeat letting a running job's lease expire",
)
def heartbeat_survives_two_late(ctx: Context, rule: Rule) -> list[Finding]:
    h, v = ctx.budget.heartbeat_interval, ctx.budget.visibility_timeout
    bound_text = f"V / 3 = {fmt(v / 3)} s"
    return _heartbeat_finding(
        ctx,
        rule,
        h <= v / 3,
        f"{_h_text(ctx)} <= {bound_text}: a lease survives two late heartbeats",
        f"{_h_text(ctx)} is above {bound_text} (V = visibility_timeout, the job lease): "
        f"one late heartbeat (a GC pause, a slow database) lets the lease expire and "
        f"another worker take the running job",
    )


@declare(
    "H2",
    "error",
    "H < V / 2 (extendable leases)",
    engines=LEASE_ENGINES,
    settings=("heartbeat_interval", "visibility_timeout"),
    prevents="a single missed heartbeat handing a running job to a second worker",
)
def heartbeat_survives_one_missed(ctx: Context, rule: Rule) -> list[Finding]:
    h, v = ctx.budget.heartbeat_interval, ctx.budget.visibility_timeout
    bound_text = f"V / 2 = {fmt(v / 2)} s"
    return _heartbeat_finding(
        ctx,
        rule,
        h < v / 2,
        f"{_h_text(ctx)} < {bound_text}",
        f"{_h_text(ctx)} is not below {bound_text} (V = visibility_timeout, the job "
        f"lease): a single missed heartbeat lets the lease expire and a second worker run "
        f"the job while it is still running",
    )


def _ip_text(ctx: Context) -> str:
    ip = ctx.budget.idempotency_in_progress_expiry
    default = " (default J + 30)" if ctx.settings.idempotency_in_progress_expiry is None else ""
    return f"idempotency_in_progress_expiry Ip = {fmt(ip)} s{default}"


def _good_in_progress(b: Budget) -> float | None:
    """An Ip with J < Ip, and Ip <= V on celery; None when V leaves no room."""
    j, v = b.longest_job_timeout, b.visibility_timeout
    upper = v if not b.lease_extendable else math.inf
    preferred = smallest_passing(j + IN_PROGRESS_EXPIRY_PAD, lambda x: j < x)
    if preferred <= upper:
        return preferred
    return largest_passing(upper, lambda x: j < x <= upper)


@declare(
    "I1",
    "error",
    "J < Ip",
    engines=ALL_ENGINES,
    settings=("idempotency_in_progress_expiry", "job_timeout"),
    prevents="an idempotency key taken over while its first run is still going: both run",
)
def key_outlives_run(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    ip, j = b.idempotency_in_progress_expiry, b.longest_job_timeout
    if j < ip:
        return [rule.ok(f"{_ip_text(ctx)} > J = {fmt(j)} s: a key is not taken over mid-run")]
    fixed = _good_in_progress(b) or smallest_passing(j + IN_PROGRESS_EXPIRY_PAD, lambda x: j < x)
    return [
        rule.fail(
            f"{_ip_text(ctx)} is not above J = {fmt(j)} s (longest job_timeout): a second "
            f"delivery can take over the key while the first run is still going, and both run",
            f"{set_at_least('idempotency_in_progress_expiry', fixed)} (or unset it: J + 30)",
            {"idempotency_in_progress_expiry": fixed},
        )
    ]


@declare(
    "I2",
    "warning",
    "Ip <= V (celery)",
    engines=CELERY_ONLY,
    settings=("idempotency_in_progress_expiry", "visibility_timeout"),
    prevents="a redelivered job burning retries on a key its dead run still holds",
)
def key_expires_before_redelivery(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    ip, v, j = b.idempotency_in_progress_expiry, b.visibility_timeout, b.longest_job_timeout
    if ip <= v:
        return [
            rule.ok(
                f"{_ip_text(ctx)} <= {_v_text(ctx)}: a key held by a crashed run has expired "
                f"when its message is redelivered",
            )
        ]
    problem = (
        f"{_ip_text(ctx)} is above {_v_text(ctx)}: a message redelivered after a crash finds "
        f"its idempotency key still held by the dead run and backs off, using up retries, "
        f"until Ip"
    )
    fixed = _good_in_progress(b)
    if fixed is not None:
        fix = (
            f"{set_to('idempotency_in_progress_expiry', fixed)} (above J = {fmt(j)}, at most "
            f"V), or set visibility_timeout to at least {fmt(math.ceil(ip))}"
        )
        return [rule.fail(problem, fix, {"idempotency_in_progress_expiry": fixed})]
    # V leaves no room above J: raise V to Ip, and above the V1/V2 bound while at it.
    horizon = b.unacked_horizon
    lease = smallest_passing(max(ip, horizon), lambda x: ip <= x and x > horizon)
    return [
        rule.fail(problem, set_at_least("visibility_timeout", lease), {"visibility_timeout": lease})
    ]


@declare(
    "I3",
    "error",
    "R > max(V, Ip)",
    engines=ALL_ENGINES,
    settings=("idempotency_retention", "visibility_timeout", "idempotency_in_progress_expiry"),
    prevents="a completed key forgotten before a late redelivery: the job runs again",
)
def completed_key_outlives_redelivery(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    r, v, ip = b.idempotency_retention, b.visibility_timeout, b.idempotency_in_progress_expiry
    horizon = max(v, ip)
    terms = f"max(V = {fmt(v)}, Ip = {fmt(ip)}) = {fmt(horizon)} s"
    if r > horizon:
        return [
            rule.ok(
                f"idempotency_retention R = {fmt(r)} s > {terms}: a completed key outlives any "
                f"redelivery",
            )
        ]
    fixed = smallest_passing(horizon, lambda x: x > horizon)
    return [
        rule.fail(
            f"idempotency_retention R = {fmt(r)} s is not above the longest redelivery horizon "
            f"{terms} (visibility_timeout, idempotency_in_progress_expiry): a job redelivered "
            f"after it completed (a lost ack), or a delivery that waited on the key, runs again",
            set_at_least("idempotency_retention", fixed),
            {"idempotency_retention": fixed},
        )
    ]


#: In the order findings are reported.
RULES: tuple[Rule, ...] = (
    lease_outlasts_run,
    lease_outlasts_countdown,
    lease_not_too_long,
    heartbeat_survives_two_late,
    heartbeat_survives_one_missed,
    key_outlives_run,
    key_expires_before_redelivery,
    completed_key_outlives_redelivery,
)
