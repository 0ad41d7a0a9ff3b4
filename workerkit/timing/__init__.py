"""The timing budget: one model of the grace period, timeouts and leases, its rules, its report.

Pure: no I/O, no logging, no clock. :mod:`~workerkit.timing.budget` resolves the settings into a
:class:`Budget`, :mod:`~workerkit.timing.rules` checks it (:func:`evaluate`) and
:mod:`~workerkit.timing.report` renders the result for ``workerkit check``. The symbols, the
shutdown timeline and every rule are explained in docs/concepts/timing-budget.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from workerkit.timing.report import JSON_SCHEMA_VERSION, render_json, render_text
    from workerkit.timing.rules import (
        LEADER_JITTER_FACTOR,
        MIN_DRAIN_WINDOW,
        RULES,
        VISIBILITY_SLACK_FACTOR,
        Rule,
        evaluate,
    )

# The rules and the report are imported on first use: a worker answering the app check needs
# only the budget's types (TaskTiming), and `workerkit run` imports them before it forks the
# worker, where every millisecond is on the way to ready (supervisor/forked.py).
_LAZY = {
    "JSON_SCHEMA_VERSION": "report",
    "render_json": "report",
    "render_text": "report",
    "LEADER_JITTER_FACTOR": "rules",
    "MIN_DRAIN_WINDOW": "rules",
    "RULES": "rules",
    "VISIBILITY_SLACK_FACTOR": "rules",
    "Rule": "rules",
    "evaluate": "rules",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
