"""Rendering a timing-budget report: a timeline and a rule table for people, JSON for machines.

Pure: the functions return strings; ``workerkit check`` prints them. The timeline is scaled so
that the grace period G fills the bar, and draws each task's J from SIGTERM (the worst case: the
job started just before it); docs/concepts/timing-budget.md shows and explains it.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workerkit.timing.budget import format_seconds

if TYPE_CHECKING:
    from workerkit.timing.budget import Budget, BudgetReport, Finding, TaskTiming

__all__ = ("JSON_SCHEMA_VERSION", "render_json", "render_text")

#: Bumped when a key of :func:`render_json`'s output changes meaning or goes away.
JSON_SCHEMA_VERSION = 1

_BAR_WIDTH = 50  # columns for 0..G
_TEXT_WIDTH = 100
_MAX_NAME = 24

_RESET = "\033[0m"
_STYLES = {"ok": "\033[32m", "WARN": "\033[33m", "ERROR": "\033[31m", "bold": "\033[1m"}

_f = format_seconds

# (symbol, Budget field, label shown) in the order of docs/concepts/timing-budget.md.
_SYMBOLS: tuple[tuple[str, str, str], ...] = (
    ("G", "grace_period", "grace_period"),
    ("P", "prestop_delay", "prestop_delay"),
    ("M", "release_margin", "release_margin"),
    ("D", "drain_window", "drain window G-P-M"),
    ("J", "longest_job_timeout", "job_timeout, longest"),
    ("V", "visibility_timeout", "visibility_timeout"),
    ("H", "heartbeat_interval", "heartbeat_interval"),
    ("F", "checkpoint_interval", "checkpoint_interval"),
    ("Ip", "idempotency_in_progress_expiry", "idem. in-progress expiry"),
    ("R", "idempotency_retention", "idempotency_retention"),
    ("L", "leader_lease", "scheduler_lease_duration"),
    ("Rd", "renew_deadline", "scheduler_renew_deadline"),
    ("Rp", "retry_period", "scheduler_retry_period"),
    ("Sd", "standby_delay", "scheduler_standby_delay"),
    ("Mg", "misfire_grace", "scheduler_misfire_grace"),
    ("C", "longest_countdown", "countdown, longest"),
)


def _paint(text: str, style: str, color: bool) -> str:
    return f"{_STYLES[style]}{text}{_RESET}" if color else text


def _status(report: BudgetReport, finding: Finding) -> str:
    if finding.ok:
        return "ok"
    return "ERROR" if report.is_error(finding) else "WARN"


# --- the timeline -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    grace: float
    width: int = _BAR_WIDTH

    def col(self, t: float) -> int:
        t = min(max(t, 0.0), self.grace)
        return round(t / self.grace * self.width)


def _put(row: list[str], col: int, text: str) -> int:
    """Write ``text`` into ``row`` from ``col`` (growing it); return the column after it."""
    while len(row) < col + len(text):
        row.append(" ")
    row[col : col + len(text)] = list(text)
    return col + len(text)


def _label_rows(marks: list[tuple[float, str]], scale: _Scale) -> list[str]:
    """Rows of "NAME t=T" labels, each starting at its mark's column; a label that would run
    into the previous one goes on the next row down, so every label stays over its column."""
    rows: list[list[str]] = []
    free: list[int] = []  # per row, the first column a new label may use
    for t, name in marks:
        col = scale.col(t)
        level = next((i for i, first in enumerate(free) if col >= first), len(rows))
        if level == len(rows):
            rows.append([])
            free.append(0)
        free[level] = _put(rows[level], col, f"{name} t={_f(t)}") + 1
    return ["".join(row).rstrip() for row in rows]


def _segment(row: list[str], start: int, end: int, fill: str, *labels: str) -> None:
    """Fill columns start..end (both bounds drawn as '|'); centre the first label that fits."""
    for col in range(start + 1, end):
        row[col] = fill
    row[start] = "|"
    row[end] = "|"
    inner = end - start - 1
    for label in labels:
        text = f" {label} " if len(label) + 4 <= inner else label
        if len(text) <= inner:
            left = start + 1 + (inner - len(text)) // 2
            row[left : left + len(text)] = list(text)
            return


def _task_note(budget: Budget, task: TaskTiming | None, j: float) -> str:
    if j <= budget.drain_window:
        return "fits in D"
    if task is None:
        return "stopped at D and released (T1 checks each task)"
    if task.checkpointed:
        return "checkpointed: stopped at D, resumes"
    if task.idempotent:
        return "idempotent: released at D, re-runs safely"
    return "released at D, re-runs from the start (T1)"


def _timeline(budget: Budget, indent: str) -> list[str]:
    g, p, d = budget.grace_period, budget.prestop_delay, budget.drain_window
    if not g > 0:
        return [f"{indent}(no timeline: grace_period must be above 0, got {_f(g)})"]
    scale = _Scale(g)
    p_end = min(p, g)
    d_end = min(max(p + d, p_end), g)

    marks: list[tuple[float, str]] = []
    if p > 0:
        marks.append((0.0, "preStop"))
    marks.append((p_end, "SIGTERM"))
    if p_end < d_end < g:
        marks.append((d_end, "release"))
    marks.append((g, "SIGKILL"))
    rows: list[tuple[str, str]] = [("", labels) for labels in _label_rows(marks, scale)]
    bar = [" "] * (scale.width + 1)
    if p_end > 0:
        _segment(bar, 0, scale.col(p_end), "~", f"preStop P={_f(p)}", f"P={_f(p)}", "P")
    if d_end > p_end:
        _segment(
            bar, scale.col(p_end), scale.col(d_end), "-", f"drain D={_f(d)}", f"D={_f(d)}", "D"
        )
    if g > d_end:
        margin = g - d_end
        label = f"M={_f(margin)}" if margin == budget.release_margin else f"M cut to {_f(margin)}"
        _segment(bar, scale.col(d_end), scale.width, "#", label, "M")
    rows.append(("shutdown", "".join(bar)))

    tasks: list[tuple[str, TaskTiming | None]] = [(t.name, t) for t in budget.tasks]
    if not tasks:
        tasks = [("job_timeout", None)]
    for name, task in tasks:
        j = budget.task_timeout(task) if task is not None else budget.job_timeout
        row = [" "] * (scale.width + 1)
        start = scale.col(p_end)
        if p_end + j <= g:
            end = scale.col(p_end + j)
            for col in range(start, end + 1):
                row[col] = "="
            row[start] = "|"
            row[end] = ">" if end > start else "|"
            tail = f"   J={_f(j)} s: {_task_note(budget, task, j)}"
        else:
            for col in range(start, scale.width + 1):
                row[col] = "="
            row[start] = "|"
            tail = f">> J={_f(j)} s: {_task_note(budget, task, j)}"
        rows.append((name, "".join(row).rstrip() + tail))

    width = min(max(len(label) for label, _ in rows), _MAX_NAME)
    out = []
    for label, body in rows:
        shown = label if len(label) <= width else label[: width - 1] + "~"
        out.append(f"{indent}{shown:<{width}}  {body}".rstrip())
    return out


def _symbol_grid(budget: Budget, indent: str) -> list[str]:
    cells = []
    for symbol, field_name, label in _SYMBOLS:
        if symbol == "H" and not budget.lease_extendable:
            continue  # no heartbeats where the lease cannot be extended
        value = getattr(budget, field_name)
        cells.append(f"{symbol:<3}{label:<25}{_f(value):>7}")
    return [indent + "   ".join(cells[i : i + 3]) for i in range(0, len(cells), 3)]


# --- the table and the summary ------------------------------------------------------------------


def _table(report: BudgetReport, indent: str, color: bool) -> list[str]:
    head = f"{indent}{'rule':<5} {'status':<6}  message"
    lines = [head, f"{indent}{'-' * 4:<5} {'-' * 6:<6}  {'-' * 7}"]
    prefix_width = len(indent) + 5 + 1 + 6 + 2
    wrap_width = max(_TEXT_WIDTH - prefix_width, 40)
    for finding in report.findings:
        status = _status(report, finding)
        wrapped = textwrap.wrap(finding.message, wrap_width) or [""]
        first = f"{indent}{finding.rule_id:<5} {_paint(f'{status:<6}', status, color)}  "
        lines.append(first + wrapped[0])
        lines.extend(" " * prefix_width + more for more in wrapped[1:])
    return lines


def _summary(report: BudgetReport, color: bool) -> str:
    errors, warnings = len(report.errors), len(report.warnings)
    counts = f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning"
    counts += "s" if warnings != 1 else ""
    strict = "; strict: warnings count as errors" if report.strict else ""
    if not report.ok:
        text = f"FAILED: {counts}{strict}; workerkit refuses to start with this budget"
        return _paint(text, "ERROR", color)
    if warnings:
        return _paint(f"OK with warnings: {counts}{strict}", "WARN", color)
    return _paint(f"OK: {counts}{strict}", "ok", color)


def render_text(report: BudgetReport, *, color: bool = False) -> str:
    """The report for a person: header, timeline, values, rule table, summary line."""
    budget = report.budget
    indent = "  "
    strict = ", strict" if report.strict else ""
    header = f"workerkit timing budget: engine {budget.engine}{strict} (all values in seconds)"
    lines = [_paint(header, "bold", color), ""]
    lines += _timeline(budget, indent)
    lines += ["", *_symbol_grid(budget, indent), ""]
    lines += _table(report, indent, color)
    lines += ["", _summary(report, color)]
    return "\n".join(lines) + "\n"


# --- JSON ---------------------------------------------------------------------------------------


def _task_json(budget: Budget, task: TaskTiming) -> dict[str, Any]:
    j = budget.task_timeout(task)
    return {
        "name": task.name,
        "timeout": task.timeout,
        "J": j,
        "idempotent": task.idempotent,
        "checkpointed": task.checkpointed,
        "max_countdown": task.max_countdown,
        "fits_drain_window": j <= budget.drain_window,
    }


def _finding_json(report: BudgetReport, finding: Finding) -> dict[str, Any]:
    status = {"ok": "ok", "WARN": "warning", "ERROR": "error"}[_status(report, finding)]
    return {
        "rule_id": finding.rule_id,
        "severity": finding.severity,
        "status": status,
        "ok": finding.ok,
        "title": finding.title,
        "message": finding.message,
        "settings": list(finding.settings),
        "fix": finding.fix,
        "fix_values": dict(finding.fix_values),
        "task": finding.task,
    }


def render_json(report: BudgetReport) -> str:
    """The report as one stable JSON object (``schema`` = :data:`JSON_SCHEMA_VERSION`).

    Keys: ``schema``, ``ok``, ``strict``, ``engine``, ``errors`` and ``warnings`` (counts),
    ``budget`` (symbol -> seconds, plus ``job_timeout``: J for tasks that set none), ``tasks``
    and ``findings`` (``status`` is ok, warning or error, strict mode applied).
    """
    budget = report.budget
    obj = {
        "schema": JSON_SCHEMA_VERSION,
        "ok": report.ok,
        "strict": report.strict,
        "engine": budget.engine,
        "errors": len(report.errors),
        "warnings": len(report.warnings),
        "budget": {**budget.symbols(), "job_timeout": budget.job_timeout},
        "tasks": [_task_json(budget, task) for task in budget.tasks],
        "findings": [_finding_json(report, finding) for finding in report.findings],
    }
    return json.dumps(obj, indent=2)
