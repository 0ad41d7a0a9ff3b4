"""Every rule of the timing budget, in report order, and :func:`evaluate`, which applies them.

Each rule is one :class:`~workerkit.timing.rules.base.Rule`: its id, severity, settings, what it
prevents and its check, declared together in the module of its family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from workerkit.timing.budget import BudgetReport, CeleryFacts, Finding, TaskTiming, resolve_budget
from workerkit.timing.rules import celery_config, leases, replicas, scheduler, shutdown
from workerkit.timing.rules.base import Context, Rule
from workerkit.timing.rules.leases import VISIBILITY_SLACK_FACTOR
from workerkit.timing.rules.scheduler import LEADER_JITTER_FACTOR
from workerkit.timing.rules.shutdown import MIN_DRAIN_WINDOW

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = (
    "LEADER_JITTER_FACTOR",
    "MIN_DRAIN_WINDOW",
    "RULES",
    "VISIBILITY_SLACK_FACTOR",
    "Rule",
    "evaluate",
)

#: Every rule, in the order findings are reported: G, T, F, V, H, I, L, S, C.
RULES: tuple[Rule, ...] = (
    *shutdown.RULES,
    *leases.RULES,
    *scheduler.RULES,
    *replicas.RULES,
    *celery_config.RULES,
)


def evaluate(
    settings: Settings,
    tasks: Sequence[TaskTiming] = (),
    celery: CeleryFacts | None = None,
) -> BudgetReport:
    """Apply every rule of :data:`RULES` that concerns ``settings.engine``.

    Findings come in the order of :data:`RULES`; T1 gives one finding per offending task.
    ``settings.strict`` turns warnings into errors (see :class:`BudgetReport`).
    """
    budget = resolve_budget(settings, tasks)
    ctx = Context(settings=settings, budget=budget, celery=celery or CeleryFacts())
    findings: list[Finding] = []
    for rule in RULES:
        if budget.engine in rule.engines:
            findings.extend(rule.apply(ctx))
    return BudgetReport(budget=budget, findings=tuple(findings), strict=settings.strict)
