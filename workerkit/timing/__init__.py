"""The timing budget: one model of the grace period, timeouts and leases, its rules, its report.

Pure: no I/O, no logging, no clock. :mod:`~workerkit.timing.budget` resolves the settings into a
:class:`Budget`, :mod:`~workerkit.timing.rules` checks it (:func:`evaluate`) and
:mod:`~workerkit.timing.report` renders the result for ``workerkit check``. The symbols, the
shutdown timeline and every rule are explained in docs/concepts/timing-budget.md.
"""

from __future__ import annotations

from workerkit.timing.budget import (
    CELERY_CONFIG_KEYS,
    IN_PROGRESS_EXPIRY_PAD,
    Budget,
    BudgetReport,
    CeleryFacts,
    Finding,
    FixValue,
    Severity,
    TaskTiming,
    format_seconds,
    resolve_budget,
)
from workerkit.timing.report import JSON_SCHEMA_VERSION, render_json, render_text
from workerkit.timing.rules import (
    LEADER_JITTER_FACTOR,
    MIN_DRAIN_WINDOW,
    RULES,
    VISIBILITY_SLACK_FACTOR,
    Rule,
    evaluate,
)

__all__ = (
    "CELERY_CONFIG_KEYS",
    "IN_PROGRESS_EXPIRY_PAD",
    "JSON_SCHEMA_VERSION",
    "LEADER_JITTER_FACTOR",
    "MIN_DRAIN_WINDOW",
    "RULES",
    "VISIBILITY_SLACK_FACTOR",
    "Budget",
    "BudgetReport",
    "CeleryFacts",
    "Finding",
    "FixValue",
    "Rule",
    "Severity",
    "TaskTiming",
    "evaluate",
    "format_seconds",
    "render_json",
    "render_text",
    "resolve_budget",
)
