"""What a rule is: its metadata and its check in one :class:`Rule`, declared with :func:`declare`.

A check gets the :class:`Context` and its own :class:`Rule`, and builds findings with
:meth:`Rule.ok` and :meth:`Rule.fail`, so a finding's id, severity and title always come from
the declaration. The helpers below word the fixes; every suggested value is searched with the
rule's own predicate, so float rounding cannot make it miss the bound it was computed from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from workerkit.settings import ENGINES, ENV_PREFIX, Settings
from workerkit.timing.budget import Budget, CeleryFacts, Finding, FixValue, Severity, format_seconds

__all__ = (
    "ALL_ENGINES",
    "CELERY_ONLY",
    "LEASE_ENGINES",
    "Check",
    "Context",
    "Rule",
    "declare",
    "fmt",
    "fmt_exact",
    "largest_passing",
    "set_at_least",
    "set_at_most",
    "set_to",
    "smallest_passing",
)

ALL_ENGINES: tuple[str, ...] = ENGINES
CELERY_ONLY: tuple[str, ...] = ("celery",)
#: The engines whose heartbeats extend the job lease V.
LEASE_ENGINES: tuple[str, ...] = ("sql", "rq")


@dataclass(frozen=True)
class Context:
    """What a check reads: the settings as given, the resolved budget, the Celery app's facts."""

    settings: Settings
    budget: Budget
    celery: CeleryFacts


#: A rule's check: every finding of the rule (T1: one per offending task).
Check = Callable[[Context, "Rule"], list[Finding]]


@dataclass(frozen=True)
class Rule:
    """One rule of the timing budget: a stable id, what it checks, what it prevents, its check."""

    rule_id: str
    severity: Severity
    title: str
    engines: tuple[str, ...]
    settings: tuple[str, ...]
    prevents: str
    check: Check = field(repr=False, compare=False)

    def apply(self, ctx: Context) -> list[Finding]:
        """Every finding of this rule for ``ctx``."""
        return self.check(ctx, self)

    def ok(self, message: str) -> Finding:
        """A passing finding; ``message`` says why the rule holds."""
        return Finding(
            rule_id=self.rule_id,
            severity=self.severity,
            ok=True,
            title=self.title,
            message=message,
            settings=self.settings,
            fix=None,
        )

    def fail(
        self,
        problem: str,
        fix: str,
        fix_values: dict[str, FixValue],
        *,
        settings: tuple[str, ...] | None = None,
        task: str | None = None,
    ) -> Finding:
        """A failing finding: the problem, then ``fix``; ``fix_values`` is the fix as data."""
        return Finding(
            rule_id=self.rule_id,
            severity=self.severity,
            ok=False,
            title=self.title,
            message=f"{problem}; {fix}",
            settings=settings if settings is not None else self.settings,
            fix=fix,
            fix_values=tuple(fix_values.items()),
            task=task,
        )


def declare(
    rule_id: str,
    severity: Severity,
    title: str,
    *,
    engines: tuple[str, ...],
    settings: tuple[str, ...],
    prevents: str,
) -> Callable[[Check], Rule]:
    """Declare a rule: decorates its check, which becomes the :class:`Rule` itself."""

    def make(check: Check) -> Rule:
        return Rule(rule_id, severity, title, engines, settings, prevents, check)

    return make


# --- numbers and fixes in messages --------------------------------------------------------------

fmt = format_seconds


def fmt_exact(value: float) -> str:
    """A suggested value, with every digit it needs (what the message says is what fixes it)."""
    return format_seconds(value, exact=True)


def smallest_passing(start: float, passes: Callable[[float], bool]) -> float:
    """The smallest whole number >= ``start`` for which ``passes`` holds."""
    value = float(max(math.ceil(start), 0))
    for _ in range(100_000):  # a guard: every caller's predicate holds a few steps up
        if passes(value):
            break
        value += 1.0
    return value


def largest_passing(start: float, passes: Callable[[float], bool]) -> float | None:
    """The largest "round" positive value <= ``start`` for which ``passes`` holds, or None.

    Whole numbers when ``start >= 1``, else three decimals.
    """
    # Callers start at or just below their bound, so a few steps suffice; the ranges are guards.
    if start >= 1:
        whole = math.floor(start)
        for value in range(whole, max(whole - 1000, 0), -1):
            if passes(float(value)):
                return float(value)
        start = min(start, 0.999)
    milli = math.floor(start * 1000)
    for step in range(milli, max(milli - 1000, 0), -1):
        if passes(step / 1000):
            return step / 1000
    return None


def _env(name: str, value: FixValue) -> str:
    shown = str(value) if isinstance(value, bool) else fmt_exact(value)
    return f"{ENV_PREFIX}{name.upper()}={shown}"


def set_at_least(name: str, value: float) -> str:
    """``set NAME to at least VALUE (WORKERKIT_NAME=VALUE)``."""
    return f"set {name} to at least {fmt_exact(value)} ({_env(name, value)})"


def set_at_most(name: str, value: float) -> str:
    """``set NAME to at most VALUE (WORKERKIT_NAME=VALUE)``."""
    return f"set {name} to at most {fmt_exact(value)} ({_env(name, value)})"


def set_to(name: str, value: float) -> str:
    """``set NAME to VALUE (WORKERKIT_NAME=VALUE)``."""
    return f"set {name} to {fmt_exact(value)} ({_env(name, value)})"
