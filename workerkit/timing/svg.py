"""``workerkit check --format svg``: the timing budget's timeline as a picture, as SVG text.

Pure, like :mod:`~workerkit.timing.report`, and drawn from the same model: the bar spans 0 to G,
the shutdown row is preStop, drain window and release margin with the supervisor's deadlines
(:class:`~workerkit.timing.deadlines.Deadlines`) inside M, then each task's J from SIGTERM, the
lease with its heartbeats, and every rule's verdict. Written by hand: no plotting dependency.
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

from workerkit.timing.budget import format_seconds
from workerkit.timing.deadlines import Deadlines
from workerkit.timing.report import _task_note

if TYPE_CHECKING:
    from workerkit.timing.budget import Budget, BudgetReport, Finding, TaskTiming

__all__ = ("render_svg",)

_WIDTH = 780
_X0, _X1 = 150, 740  # the bar: 0 .. G
_ROW = 30
_CHAR = 6.6  # width of one character at the 11 px monospace font, for placing labels
_FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace"
_COLORS = {
    "prestop": "#9e9e9e",
    "drain": "#42a5f5",
    "margin": "#ffa726",
    "ok": "#43a047",
    "warning": "#f9a825",
    "error": "#e53935",
    "lease": "#7e57c2",
    "ink": "#212121",
    "grid": "#bdbdbd",
}
_NOTE = "#616161"
_f = format_seconds


class _Canvas:
    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.parts: list[str] = []

    def x(self, t: float) -> float:
        return _X0 + min(max(t, 0.0), self.grace) / self.grace * (_X1 - _X0)

    def text(self, x: float, y: float, text: str, **attrs: str | float) -> None:
        self.parts.append(f"<text x={_num(x)} y={_num(y)}{_attrs(attrs)}>{escape(text)}</text>")

    def rect(self, x: float, y: float, w: float, h: float, fill: str, **attrs: str | float) -> None:
        self.parts.append(
            f"<rect x={_num(x)} y={_num(y)} width={_num(max(w, 0.0))} height={_num(h)}"
            f" fill={quoteattr(fill)}{_attrs(attrs)}/>"
        )

    def line(self, x1: float, y1: float, x2: float, y2: float, **attrs: str | float) -> None:
        self.parts.append(
            f"<line x1={_num(x1)} y1={_num(y1)} x2={_num(x2)} y2={_num(y2)}{_attrs(attrs)}/>"
        )


def _num(value: float) -> str:
    return quoteattr(f"{round(value, 1):g}")


def _attrs(attrs: dict[str, str | float]) -> str:
    return "".join(
        f" {name.rstrip('_').replace('_', '-')}={quoteattr(str(value))}"
        for name, value in attrs.items()
    )


def _marks(budget: Budget) -> list[tuple[float, str]]:
    """The instants labelled above the bar: preStop, SIGTERM, the deadlines in M, SIGKILL."""
    p = min(budget.prestop_delay, budget.grace_period)
    d = Deadlines.after(p, budget.drain_window, budget.release_margin)
    marks = [(0.0, "preStop")] if budget.prestop_delay > 0 else []
    marks.append((p, "SIGTERM"))
    if d.request_stop_at < budget.grace_period:
        marks += [(d.request_stop_at, "stop_requested"), (d.release_at, "release")]
        marks += [(d.kill_at, "kill")]
    marks.append((budget.grace_period, "SIGKILL"))
    return marks


def _label_start(canvas: _Canvas, t: float, text: str) -> float:
    """Where a mark's label starts: right of its line, or left of it near the right edge."""
    x, width = canvas.x(t), len(text) * _CHAR
    return x + 2 if x + 2 + width <= _WIDTH - 6 else x - 2 - width


def _label_levels(canvas: _Canvas, marks: list[tuple[float, str]]) -> list[int]:
    """A level per label (0 nearest the bar) so that no two labels on one level overlap."""
    free: list[float] = []  # per level, the first x a new label may use
    levels = []
    for t, name in marks:
        text = f"{name} t={_f(t)}"
        start = _label_start(canvas, t, text)
        level = next((i for i, first in enumerate(free) if start >= first), len(free))
        if level == len(free):
            free.append(0.0)
        free[level] = start + len(text) * _CHAR + 8
        levels.append(level)
    return levels


def _shutdown(canvas: _Canvas, budget: Budget, top: float) -> float:
    marks = _marks(budget)
    levels = _label_levels(canvas, marks)
    depth = max(levels) + 1
    bar_y = top + depth * 16 + 6
    for (t, name), level in zip(marks, levels, strict=True):
        x, text = canvas.x(t), f"{name} t={_f(t)}"
        label_y = bar_y - 8 - level * 16
        canvas.line(x, label_y + 3, x, bar_y + _ROW, stroke=_COLORS["grid"], stroke_dasharray="3,3")
        canvas.text(_label_start(canvas, t, text), label_y, text, fill=_COLORS["ink"])
    g, p = budget.grace_period, min(budget.prestop_delay, budget.grace_period)
    d_end = min(max(p + budget.drain_window, p), g)
    segments = (
        (0.0, p, "prestop", f"preStop P={_f(budget.prestop_delay)}"),
        (p, d_end, "drain", f"drain window D={_f(budget.drain_window)}"),
        (d_end, g, "margin", f"M={_f(g - d_end)}"),
    )
    canvas.text(12, bar_y + 19, "shutdown", fill=_COLORS["ink"])
    for start, end, kind, label in segments:
        if end <= start:
            continue
        x, w = canvas.x(start), canvas.x(end) - canvas.x(start)
        canvas.rect(x, bar_y, w, _ROW - 8, _COLORS[kind], class_=kind)
        if len(label) * _CHAR + 6 <= w:
            canvas.text(x + w / 2, bar_y + 15, label, text_anchor="middle", fill="#ffffff")
    return bar_y + _ROW


def _bar(canvas: _Canvas, y: float, start: float, length: float, color: str, kind: str) -> None:
    """A bar from ``start`` for ``length`` seconds, cut at G with an arrow when longer."""
    end = start + length
    x0, x1 = canvas.x(start), canvas.x(end)
    canvas.rect(x0, y, x1 - x0, _ROW - 14, color, class_=kind)
    if end > canvas.grace:
        canvas.parts.append(
            f'<path d="M{x1:g},{y - 3:g} L{x1 + 9:g},{y + 8:g} L{x1:g},{y + 19:g} Z"'
            f" fill={quoteattr(color)}/>"
        )


def _task_color(budget: Budget, task: TaskTiming | None, j: float) -> str:
    if j <= budget.drain_window:
        return _COLORS["ok"]
    if task is None or task.checkpointed or task.idempotent:
        return _COLORS["warning"]
    return _COLORS["error"]


def _rows(canvas: _Canvas, budget: Budget, top: float) -> float:
    p = min(budget.prestop_delay, budget.grace_period)
    tasks: list[tuple[str, TaskTiming | None]] = [(t.name, t) for t in budget.tasks]
    y = top + 6
    for name, task in tasks or [("job_timeout", None)]:
        j = budget.task_timeout(task) if task is not None else budget.job_timeout
        shown = name if len(name) <= 22 else name[:21] + "~"
        canvas.text(12, y + 12, shown, fill=_COLORS["ink"])
        _bar(canvas, y, p, j, _task_color(budget, task, j), "task")
        note = f"J={_f(j)} s: {_task_note(budget, task, j)}"
        canvas.text(_X0, y + 28, note, font_size=10, fill=_NOTE)
        y += _ROW + 10
    v = budget.visibility_timeout
    canvas.text(12, y + 12, "lease V" if budget.lease_extendable else "visibility V")
    _bar(canvas, y, 0.0, v, _COLORS["lease"], "lease")
    if budget.lease_extendable and budget.heartbeat_interval > 0:
        beats = int(min(budget.grace_period, v * 50) // budget.heartbeat_interval)
        for k in range(1, beats + 1):
            x = canvas.x(k * budget.heartbeat_interval)
            canvas.line(x, y - 2, x, y + _ROW - 12, stroke="#ffffff", stroke_width=2)
        note = f"V={_f(v)} s, renewed every H={_f(budget.heartbeat_interval)} s (white ticks)"
    else:
        note = f"V={_f(v)} s: an unacknowledged message is redelivered after V"
    canvas.text(_X0, y + 28, note, font_size=10, fill=_NOTE)
    return y + _ROW + 10


def _axis(canvas: _Canvas, y: float) -> float:
    g = canvas.grace
    power = 10.0 ** math.floor(math.log10(g / 8))
    step = next(power * k for k in (1, 2, 5, 10) if g / (power * k) <= 8)
    canvas.line(_X0, y, _X1, y, stroke=_COLORS["ink"])
    ticks = [round(k * step, 9) for k in range(int(g / step + 1e-9) + 1)]
    if g - ticks[-1] > step / 4:
        ticks.append(g)
    for t in ticks:
        canvas.line(canvas.x(t), y, canvas.x(t), y + 4, stroke=_COLORS["ink"])
        canvas.text(canvas.x(t), y + 16, f"{_f(t)} s", text_anchor="middle")
    canvas.text(12, y + 16, "seconds")
    return y + 24


def _status(report: BudgetReport, finding: Finding) -> str:
    if finding.ok:
        return "ok"
    return "error" if report.is_error(finding) else "warning"


def _verdicts(canvas: _Canvas, report: BudgetReport, top: float) -> float:
    x, y = 12.0, top + 8
    canvas.text(x, y + 12, "rules")
    x = 60.0
    for finding in report.findings:
        label = finding.rule_id if finding.task is None else f"{finding.rule_id}:{finding.task}"
        width = len(label) * _CHAR + 10
        if x + width > _WIDTH - 12:
            x, y = 60.0, y + 20
        status = _status(report, finding)
        canvas.rect(x, y, width, 16, _COLORS[status], rx=3, class_=f"rule {status}")
        canvas.text(x + 5, y + 12, label, fill="#ffffff")
        x += width + 4
    y += 28
    for finding in report.failed:
        status = _status(report, finding).upper()
        lines = textwrap.wrap(f"{finding.rule_id} {status}: {finding.message}", 100)
        for number, line in enumerate(lines):
            color = _COLORS[_status(report, finding)] if number == 0 else _COLORS["ink"]
            canvas.text(12 if number == 0 else 24, y + 12, line, fill=color)
            y += 15
        y += 4
    return y


def _summary(report: BudgetReport) -> tuple[str, str]:
    errors, warnings = len(report.errors), len(report.warnings)
    counts = f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning"
    counts += "s" if warnings != 1 else ""
    if not report.ok:
        return f"FAILED: {counts}; workerkit refuses to start", _COLORS["error"]
    if warnings:
        return f"OK with warnings: {counts}", _COLORS["warning"]
    return f"OK: {counts}", _COLORS["ok"]


def render_svg(report: BudgetReport) -> str:
    """The report as an SVG picture: the timeline, the tasks and the lease, the rules' verdicts."""
    budget = report.budget
    strict = ", strict" if report.strict else ""
    summary, color = _summary(report)
    canvas = _Canvas(budget.grace_period)
    canvas.text(
        12, 22, f"workerkit timing budget: engine {budget.engine}{strict}", font_weight="bold"
    )
    canvas.text(_WIDTH - 16, 22, summary, fill=color, font_weight="bold", text_anchor="end")
    if not budget.grace_period > 0:
        canvas.text(
            12, 50, f"(no timeline: grace_period must be above 0, got {_f(budget.grace_period)})"
        )
        y = 60.0
    else:
        y = _shutdown(canvas, budget, 34)
        y = _rows(canvas, budget, y)
        y = _axis(canvas, y + 4)
    y = _verdicts(canvas, report, y)
    height = round(y + 8)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}"'
        f' viewBox="0 0 {_WIDTH} {height}" font-family={quoteattr(_FONT)} font-size="11"'
        f' fill="{_COLORS["ink"]}" role="img">'
    )
    title = (
        f"<title>{escape(f'workerkit timing budget, engine {budget.engine}: {summary}')}</title>"
    )
    background = f'<rect width="{_WIDTH}" height="{height}" fill="#ffffff"/>'
    return "\n".join([head, title, background, *canvas.parts, "</svg>"]) + "\n"
