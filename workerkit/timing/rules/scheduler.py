"""Rules for the leader-elected scheduler (L): client-go's lease timing, the standby's delay, and
a grace period long enough for a SIGTERMed leader to hand its lease over.

Why these bounds: a leader stops firing when it has not renewed for Rd, which must come before
its lease (L) can expire and a standby take over (L1); it must get several renewal tries in Rd
(L2); a standby fires an unrecorded time Sd after it only while it is within the misfire grace
(L3); and the kill deadline after SIGTERM leaves the leader a retry period to release (L4).
"""

from __future__ import annotations

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
    smallest_passing,
)

if TYPE_CHECKING:
    from workerkit.timing.budget import Finding

__all__ = (
    "HANDOVER_KILL_FRACTION",
    "LEADER_JITTER_FACTOR",
    "RULES",
    "grace_covers_handover",
    "renew_deadline_below_lease",
    "retries_within_renew_deadline",
    "standby_within_misfire_grace",
)

#: client-go's ``JitterFactor``: the renew deadline must exceed the retry period times this.
LEADER_JITTER_FACTOR = 1.2
#: The supervisor kills its child at D + 0.8 M after SIGTERM, i.e. 0.2 M before G - P.
HANDOVER_KILL_FRACTION = 0.2

_LEASE = "scheduler_lease_duration"
_DEADLINE = "scheduler_renew_deadline"
_RETRY = "scheduler_retry_period"
_STANDBY = "scheduler_standby_delay"
_GRACE = "scheduler_misfire_grace"


@declare(
    "L1",
    "error",
    "Rd < L",
    engines=ALL_ENGINES,
    settings=(_LEASE, _DEADLINE),
    prevents="two schedulers firing on time at once: a standby takes an expired lease while "
    "the old leader still believes it leads",
)
def renew_deadline_below_lease(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    lease, rd = b.leader_lease, b.renew_deadline
    terms = f"{_DEADLINE} Rd = {fmt(rd)} s, {_LEASE} L = {fmt(lease)} s"
    if rd < lease:
        return [rule.ok(f"Rd < L: {terms}")]
    fixed = smallest_passing(1.5 * rd, lambda x: x > rd)
    return [
        rule.fail(
            f"{terms}: the lease can expire, and a standby lead, before the old leader stops "
            f"firing at its renew deadline (fire records stay unique, but two leaders race)",
            set_at_least(_LEASE, fixed),
            {_LEASE: fixed},
        )
    ]


@declare(
    "L2",
    "error",
    f"{LEADER_JITTER_FACTOR:g} x Rp < Rd",
    engines=ALL_ENGINES,
    settings=(_DEADLINE, _RETRY),
    prevents="leadership lost to one slow renewal: the leader gets barely one try before its "
    "renew deadline",
)
def retries_within_renew_deadline(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    rd, rp = b.renew_deadline, b.retry_period
    jitter = LEADER_JITTER_FACTOR * rp
    terms = (
        f"{fmt(LEADER_JITTER_FACTOR)} x {_RETRY} Rp = {fmt(jitter)} s, {_DEADLINE} Rd = {fmt(rd)} s"
    )
    if jitter < rd:
        return [rule.ok(f"{fmt(LEADER_JITTER_FACTOR)} x Rp < Rd: {terms}")]
    problem = f"{terms}: a leader gets barely one renewal try before it must stop firing"
    retry = largest_passing(rd / 5, lambda x: LEADER_JITTER_FACTOR * x < rd and x >= 0.05)
    if retry is not None:
        return [rule.fail(problem, set_at_most(_RETRY, retry), {_RETRY: retry})]
    deadline = smallest_passing(5 * rp, lambda x: jitter < x)
    return [rule.fail(problem, set_at_least(_DEADLINE, deadline), {_DEADLINE: deadline})]


@declare(
    "L3",
    "error",
    "Sd < Mg",
    engines=ALL_ENGINES,
    settings=(_STANDBY, _GRACE),
    prevents="missed fire times after a leader crash: a standby would fire nothing, every time "
    "being past the misfire grace when its delay is over",
)
def standby_within_misfire_grace(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    sd, mg = b.standby_delay, b.misfire_grace
    terms = f"{_STANDBY} Sd = {fmt(sd)} s, {_GRACE} Mg = {fmt(mg)} s"
    if sd < mg:
        return [rule.ok(f"Sd < Mg: {terms}")]
    delay = largest_passing(mg / 4, lambda x: x < mg)
    fix_values: dict[str, float] = {}
    if delay is not None:
        fix, fix_values = set_at_most(_STANDBY, delay), {_STANDBY: delay}
    else:
        grace = smallest_passing(sd + 1, lambda x: sd < x)
        fix, fix_values = set_at_least(_GRACE, grace), {_GRACE: grace}
    return [
        rule.fail(
            f"{terms}: when the leader dies, a standby's fire comes after the misfire grace, "
            f"so it never fires; every fire time until a new leader is missed",
            fix,
            fix_values,
        )
    ]


@declare(
    "L4",
    "warning",
    "Rp <= G - P - 0.2 M",
    engines=ALL_ENGINES,
    settings=("grace_period", "prestop_delay", "release_margin", _RETRY),
    prevents="a SIGTERMed leader killed before it hands its lease over: the lease then "
    "expires instead, and the fires until then come from standbys, late",
)
def grace_covers_handover(ctx: Context, rule: Rule) -> list[Finding]:
    b = ctx.budget
    before_kill = b.prestop_delay + HANDOVER_KILL_FRACTION * b.release_margin
    kill_at = b.grace_period - before_kill
    rp = b.retry_period
    terms = (
        f"after SIGTERM the scheduler is killed at grace_period - prestop_delay - "
        f"{fmt(HANDOVER_KILL_FRACTION)} x release_margin = {fmt(kill_at)} s; "
        f"{_RETRY} Rp = {fmt(rp)} s"
    )
    if rp <= kill_at:
        return [rule.ok(f"{terms}: the leader finishes its store call and releases first")]
    grace = smallest_passing(rp + before_kill, lambda x: rp <= x - before_kill)
    return [
        rule.fail(
            f"{terms}: a leader in the middle of a store call may be killed before it gives "
            f"its lease up, which then expires only after {_LEASE} (standbys fire meanwhile, "
            f"late by {_STANDBY})",
            set_at_least("grace_period", grace),
            {"grace_period": grace},
        )
    ]


#: In the order findings are reported.
RULES: tuple[Rule, ...] = (
    renew_deadline_below_lease,
    retries_within_renew_deadline,
    standby_within_misfire_grace,
    grace_covers_handover,
)
