"""The timing budget's model: the symbols resolved from the settings, and the findings.

Pure: no I/O, no logging, no clock. ``workerkit check``, the worker at startup, the Helm chart and
docs/concepts/timing-budget.md (the symbols and the timeline) all use this model, so the numbers
agree. :func:`resolve_budget` applies every default once; the rules only read a :class:`Budget`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Protocol

from workerkit.errors import ConfigurationError, TimingBudgetError
from workerkit.settings import ENGINES, Settings

__all__ = (
    "CELERY_CONFIG_KEYS",
    "IN_PROGRESS_EXPIRY_PAD",
    "Budget",
    "BudgetReport",
    "CeleryFacts",
    "Finding",
    "FixValue",
    "Severity",
    "TaskTiming",
    "TimedTask",
    "format_seconds",
    "resolve_budget",
)

Severity = Literal["error", "warning"]

#: A value in :attr:`Finding.fix_values`: a number of seconds or a count, or a boolean.
FixValue = float | int | bool

#: Ip defaults to J + this (seconds).
IN_PROGRESS_EXPIRY_PAD = 30.0

#: :class:`CeleryFacts` field -> the Celery configuration key it reflects.
CELERY_CONFIG_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "acks_late": "task_acks_late",
        "reject_on_worker_lost": "task_reject_on_worker_lost",
        "prefetch_multiplier": "worker_prefetch_multiplier",
        "soft_time_limit": "task_soft_time_limit",
        "time_limit": "task_time_limit",
        "visibility_timeout": "broker_transport_options['visibility_timeout']",
    }
)

_EXTENDABLE_LEASE_ENGINES = ("sql", "rq")


# --- the model ------------------------------------------------------------------------------


class TimedTask(Protocol):
    """What a task registry knows of a task's timing."""

    @property
    def name(self) -> str: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def idempotent(self) -> bool: ...
    @property
    def checkpointed(self) -> bool: ...


@dataclass(frozen=True)
class TaskTiming:
    """What the budget needs to know about one task.

    ``timeout`` is the task's own hard limit (None: it uses ``job_timeout``). ``idempotent``
    means a re-run is harmless (it has an idempotency key, or is naturally idempotent);
    ``checkpointed`` means it saves checkpoints and resumes from them. ``max_countdown`` is the
    longest ETA or countdown it is enqueued with.
    """

    name: str
    timeout: float | None
    idempotent: bool = False
    checkpointed: bool = False
    max_countdown: float = 0.0

    @classmethod
    def of(cls, task: TimedTask) -> TaskTiming:
        """The timing of a registered task (an :class:`~workerkit.App`'s or an ``RqApp``'s)."""
        return cls(
            name=task.name,
            timeout=task.timeout,
            idempotent=task.idempotent,
            checkpointed=task.checkpointed,
        )

    def __post_init__(self) -> None:
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigurationError(
                f"task {self.name!r}: timeout must be a positive number of seconds, "
                f"got {self.timeout!r}"
            )
        if not (math.isfinite(self.max_countdown) and self.max_countdown >= 0):
            raise ConfigurationError(
                f"task {self.name!r}: max_countdown must be 0 or more seconds, "
                f"got {self.max_countdown!r}"
            )


@dataclass(frozen=True)
class CeleryFacts:
    """What the user's Celery app configuration says; None means the user did not set it.

    workerkit sets all of these itself (acks late, reject on worker lost, prefetch 1, a soft
    limit below a hard limit of J, the transport's visibility timeout from V); the C rules only
    fail when the app overrides them unsafely.
    """

    acks_late: bool | None = None
    reject_on_worker_lost: bool | None = None
    prefetch_multiplier: int | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    visibility_timeout: float | None = None


@dataclass(frozen=True)
class Budget:
    """The resolved timing budget; field names are the settings', seconds throughout.

    ``job_timeout`` is the setting (J for tasks that set none); ``longest_job_timeout`` is J as
    the rules use it. ``visibility_timeout``, ``heartbeat_interval`` and
    ``idempotency_in_progress_expiry`` have their defaults applied. :meth:`symbols` maps the
    short symbols (G, P, M, D, J, V, H, F, Ip, R, L, Rd, Rp, C) to values.
    """

    engine: str
    grace_period: float
    prestop_delay: float
    release_margin: float
    drain_window: float
    job_timeout: float
    longest_job_timeout: float
    visibility_timeout: float
    heartbeat_interval: float
    checkpoint_interval: float
    idempotency_in_progress_expiry: float
    idempotency_retention: float
    leader_lease: float
    renew_deadline: float
    retry_period: float
    standby_delay: float
    misfire_grace: float
    max_countdown: float
    tasks: tuple[TaskTiming, ...]

    @property
    def longest_countdown(self) -> float:
        """C: the longest ETA or countdown, over ``max_countdown`` and every task's own."""
        return max([self.max_countdown, *(t.max_countdown for t in self.tasks)])

    @property
    def lease_extendable(self) -> bool:
        """True when heartbeats extend V (sql, rq); False when nothing can (celery on Redis)."""
        return self.engine in _EXTENDABLE_LEASE_ENGINES

    def task_timeout(self, task: TaskTiming) -> float:
        """J for one task: its own timeout, else ``job_timeout``."""
        return task.timeout if task.timeout is not None else self.job_timeout

    def task_countdown(self, task: TaskTiming) -> float:
        """The longest countdown one task may wait: its own or ``max_countdown``, the larger."""
        return max(task.max_countdown, self.max_countdown)

    @property
    def run_horizon(self) -> float:
        """J + D + M: the longest a delivered message stays unacknowledged, countdowns aside.

        The broker starts the clock when it hands the message over, which can be while another
        job is still draining, so a full drain window and release margin come on top of J.
        """
        return self.longest_job_timeout + self.drain_window + self.release_margin

    @property
    def unacked_horizon(self) -> float:
        """max over tasks of (countdown + J) + D + M: the longest a message stays unacknowledged.

        A message with an ETA is reserved at once and held, unacknowledged, until it runs.
        """
        if self.tasks:
            longest = max(self.task_countdown(t) + self.task_timeout(t) for t in self.tasks)
        else:
            longest = self.max_countdown + self.job_timeout
        return longest + self.drain_window + self.release_margin

    def symbols(self) -> dict[str, float]:
        """The short symbols of docs/concepts/timing-budget.md, in their documented order."""
        return {
            "G": self.grace_period,
            "P": self.prestop_delay,
            "M": self.release_margin,
            "D": self.drain_window,
            "J": self.longest_job_timeout,
            "V": self.visibility_timeout,
            "H": self.heartbeat_interval,
            "F": self.checkpoint_interval,
            "Ip": self.idempotency_in_progress_expiry,
            "R": self.idempotency_retention,
            "L": self.leader_lease,
            "Rd": self.renew_deadline,
            "Rp": self.retry_period,
            "Sd": self.standby_delay,
            "Mg": self.misfire_grace,
            "C": self.longest_countdown,
        }


@dataclass(frozen=True)
class Finding:
    """The outcome of one rule (T1: of one rule for one task).

    ``message`` is shown either way; when the rule fails it names the settings and ends with
    ``fix``, a change that makes the rule pass. ``fix_values`` is the same change as data:
    setting name -> value, or ``"celery.<CeleryFacts field>"`` -> value for the Celery app.
    """

    rule_id: str
    severity: Severity
    ok: bool
    title: str
    message: str
    settings: tuple[str, ...]
    fix: str | None
    fix_values: tuple[tuple[str, FixValue], ...] = ()
    task: str | None = None


@dataclass(frozen=True)
class BudgetReport:
    """Every finding of :func:`~workerkit.timing.evaluate`, and whether workerkit may start.

    ``errors`` and ``warnings`` split the failed findings: in strict mode every failure is an
    error and ``warnings`` is empty.
    """

    budget: Budget
    findings: tuple[Finding, ...]
    strict: bool

    @property
    def failed(self) -> tuple[Finding, ...]:
        """Every finding whose rule does not hold."""
        return tuple(f for f in self.findings if not f.ok)

    @property
    def errors(self) -> tuple[Finding, ...]:
        """Failed findings that refuse start: errors, and warnings too when strict."""
        return tuple(f for f in self.failed if f.severity == "error" or self.strict)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """Failed warnings that do not refuse start (none when strict)."""
        return tuple(f for f in self.failed if f.severity == "warning" and not self.strict)

    @property
    def ok(self) -> bool:
        """True when workerkit may start: no errors."""
        return not self.errors

    def is_error(self, finding: Finding) -> bool:
        """Whether this finding counts as an error in this report (failed, and error or strict)."""
        return not finding.ok and (finding.severity == "error" or self.strict)

    def raise_for_errors(self) -> None:
        """Raise :class:`~workerkit.errors.TimingBudgetError` listing every error, if any."""
        errors = self.errors
        if not errors:
            return
        plural = "s" if len(errors) != 1 else ""
        strict = " (strict: warnings count as errors)" if self.strict else ""
        lines = [f"the timing budget has {len(errors)} error{plural}{strict}:"]
        lines += [f"  [{f.rule_id}] {f.message}" for f in errors]
        raise TimingBudgetError("\n".join(lines))


# --- resolving ------------------------------------------------------------------------------


def resolve_budget(settings: Settings, tasks: Sequence[TaskTiming] = ()) -> Budget:
    """Resolve the symbols from the settings and the tasks, with every default applied.

    J is the longest task timeout (``job_timeout`` for tasks that set none, and with no tasks).
    Ip, when not set, is J + 30 with that J: each task's key then outlives its own runs.
    """
    if settings.engine not in ENGINES:
        raise ConfigurationError(
            f"setting 'engine': got {settings.engine!r}; expected one of {', '.join(ENGINES)}"
        )
    task_tuple = tuple(tasks)
    timeouts = [t.timeout if t.timeout is not None else settings.job_timeout for t in task_tuple]
    longest = max(timeouts) if timeouts else settings.job_timeout
    in_progress = settings.idempotency_in_progress_expiry
    if in_progress is None:
        in_progress = longest + IN_PROGRESS_EXPIRY_PAD
    return Budget(
        engine=settings.engine,
        grace_period=settings.grace_period,
        prestop_delay=settings.prestop_delay,
        release_margin=settings.release_margin,
        drain_window=settings.drain_window,
        job_timeout=settings.job_timeout,
        longest_job_timeout=longest,
        visibility_timeout=settings.effective_visibility_timeout,
        heartbeat_interval=settings.effective_heartbeat_interval,
        checkpoint_interval=settings.checkpoint_interval,
        idempotency_in_progress_expiry=in_progress,
        idempotency_retention=settings.idempotency_retention,
        leader_lease=settings.scheduler_lease_duration,
        renew_deadline=settings.scheduler_renew_deadline,
        retry_period=settings.scheduler_retry_period,
        standby_delay=settings.scheduler_standby_delay,
        misfire_grace=settings.scheduler_misfire_grace,
        max_countdown=settings.max_countdown,
        tasks=task_tuple,
    )


# --- numbers in messages ----------------------------------------------------------------------


def format_seconds(value: float, *, exact: bool = False) -> str:
    """A number as messages show it: ``30``, ``2.5``, ``0.333`` (at most three decimals).

    ``exact`` keeps every digit a value needs when three decimals would change it: suggested
    values are shown that way, so what a message says is exactly what fixes the rule.
    """
    if math.isfinite(value) and value == math.floor(value) and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    if exact and float(text) != value:
        return repr(value)
    return "0" if text == "-0" else text
