"""The timing budget: one model of the grace period, timeouts and leases, and its rules.

Pure: no I/O, no logging, no clock. ``workerkit check``, the worker at startup, the Helm chart and
the docs (``docs/concepts/timing-budget.md``) all use this module, so the numbers agree.

The symbols (all in seconds), resolved by :func:`resolve_budget` into a :class:`Budget`:

====  =====================================  ===========================================
sym.  Budget field (setting)                 meaning
====  =====================================  ===========================================
G     ``grace_period``                       the pod's terminationGracePeriodSeconds
P     ``prestop_delay``                      preStop hook time, counted inside G
M     ``release_margin``                     kept to stop the job, checkpoint, release, exit
D     ``drain_window`` (derived)             ``G - P - M``: the job in hand may run on this long
J     ``longest_job_timeout``                max over the tasks' timeouts (``job_timeout`` for
                                             tasks that set none; ``job_timeout`` with no tasks)
V     ``visibility_timeout``                 when an unacknowledged job goes to another worker
H     ``heartbeat_interval``                 lease renewal (sql, rq); default V / 3
F     ``checkpoint_interval``                longest a checkpoint may wait before it is saved
Ip    ``idempotency_in_progress_expiry``     when a claimed key may be taken over; default J + 30
R     ``idempotency_retention``              how long a completed key is remembered
L     ``leader_lease``                       scheduler leadership lease
Rd    ``renew_deadline``                     how long a leader keeps trying to renew
Rp    ``retry_period``                       how often leadership is tried or renewed
C     ``longest_countdown``                  longest ETA/countdown: ``max_countdown`` and tasks'
====  =====================================  ===========================================

Kubernetes runs the preStop hook first and sends SIGTERM when it returns, with G counted from the
start of the hook: the pod is told to stop at t=0, SIGTERM lands at t=P (t=0 for workers, whose
P defaults to 0), the job in hand is asked to stop and then released at t=P+D, and the kubelet
sends SIGKILL at t=G.

:func:`evaluate` applies every rule in :data:`RULES` that concerns the engine and returns a
:class:`BudgetReport`. Every finding, passing or not, carries a message; a failing one names the
settings involved and a value that fixes it, also in machine-readable form in
:attr:`Finding.fix_values` (tests apply those values and check the rule passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from workerkit.errors import ConfigurationError, TimingBudgetError
from workerkit.settings import ENGINE_DEFAULT_VISIBILITY_TIMEOUT, ENGINES, ENV_PREFIX, Settings

__all__ = (
    "CELERY_CONFIG_KEYS",
    "IN_PROGRESS_EXPIRY_PAD",
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
    "resolve_budget",
)

Severity = Literal["error", "warning"]

#: A value in :attr:`Finding.fix_values`: a number of seconds or a count, or a boolean.
FixValue = float | int | bool

#: Below this drain window (seconds) nearly every job in hand at a deploy is released, not
#: finished (rule G3).
MIN_DRAIN_WINDOW = 5.0

#: Ip defaults to J + this (seconds).
IN_PROGRESS_EXPIRY_PAD = 30.0

#: Rule V3 warns when celery's V is more than this many times the longest time a message can
#: stay unacknowledged, and above kombu's own default. Up to 4x is headroom (clock skew between
#: the workers that restore unacked messages, a kill at J that takes a moment, a countdown a
#: little longer than declared); beyond it V only delays the redelivery of a job whose pod
#: vanished without releasing it (node loss), which workerkit's own crash recovery cannot cover.
VISIBILITY_SLACK_FACTOR = 4.0

#: client-go's ``JitterFactor``: renew_deadline must exceed retry_period times this (rule L1).
LEADER_JITTER_FACTOR = 1.2

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

_CELERY_DEFAULT_V = ENGINE_DEFAULT_VISIBILITY_TIMEOUT["celery"]
_EXTENDABLE_LEASE_ENGINES = ("sql", "rq")


# --- the model ------------------------------------------------------------------------------


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
            "C": self.longest_countdown,
        }


@dataclass(frozen=True)
class Rule:
    """One rule of the timing budget: a stable id, what it checks and what it prevents."""

    rule_id: str
    severity: Severity
    title: str
    engines: tuple[str, ...]
    settings: tuple[str, ...]
    prevents: str


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
    """Every finding of :func:`evaluate`, and whether workerkit may start.

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


# --- the rules ------------------------------------------------------------------------------

_ALL: tuple[str, ...] = ENGINES
_CELERY: tuple[str, ...] = ("celery",)

RULES: tuple[Rule, ...] = (
    Rule(
        rule_id="G1",
        severity="error",
        title="P + D + M <= G with a drain window D > 0",
        engines=_ALL,
        settings=("grace_period", "prestop_delay", "release_margin"),
        prevents="the kubelet's SIGKILL landing before the job in hand is released",
    ),
    Rule(
        rule_id="G2",
        severity="error",
        title="P < G",
        engines=_ALL,
        settings=("prestop_delay", "grace_period"),
        prevents="a preStop hook outlasting the grace period: SIGTERM never reaches the worker",
    ),
    Rule(
        rule_id="G3",
        severity="warning",
        title=f"D >= {MIN_DRAIN_WINDOW:g}",
        engines=_ALL,
        settings=("grace_period", "prestop_delay", "release_margin"),
        prevents="a drain window so short that nearly every job in hand at a deploy is interrupted",
    ),
    Rule(
        rule_id="T1",
        severity="warning",
        title="a task with J > D is idempotent or checkpointed",
        engines=_ALL,
        settings=("job_timeout", "grace_period"),
        prevents="a long task that every deploy interrupts and that re-runs from the start",
    ),
    Rule(
        rule_id="F1",
        severity="error",
        title="F <= D / 2",
        engines=_ALL,
        settings=("checkpoint_interval", "grace_period"),
        prevents="checkpoints so rare that an interrupted job loses more work than a drain can do",
    ),
    Rule(
        rule_id="V1",
        severity="error",
        title="V > J + D + M (celery)",
        engines=_CELERY,
        settings=("visibility_timeout", "job_timeout"),
        prevents="Redis handing a still-running job to a second worker: it runs twice at once",
    ),
    Rule(
        rule_id="V2",
        severity="error",
        title="V > countdown + J + D + M (celery)",
        engines=_CELERY,
        settings=("visibility_timeout", "max_countdown"),
        prevents="a message waiting for its ETA being redelivered and run twice",
    ),
    Rule(
        rule_id="V3",
        severity="warning",
        title=f"V <= max({_CELERY_DEFAULT_V:g}, {VISIBILITY_SLACK_FACTOR:g} x (C + J + D + M))",
        engines=_CELERY,
        settings=("visibility_timeout",),
        prevents="a job whose pod vanished waiting far longer than needed before it is redelivered",
    ),
    Rule(
        rule_id="H1",
        severity="warning",
        title="H <= V / 3 (extendable leases)",
        engines=("sql", "rq"),
        settings=("heartbeat_interval", "visibility_timeout"),
        prevents="one late heartbeat letting a running job's lease expire",
    ),
    Rule(
        rule_id="H2",
        severity="error",
        title="H < V / 2 (extendable leases)",
        engines=("sql", "rq"),
        settings=("heartbeat_interval", "visibility_timeout"),
        prevents="a single missed heartbeat handing a running job to a second worker",
    ),
    Rule(
        rule_id="I1",
        severity="error",
        title="J < Ip",
        engines=_ALL,
        settings=("idempotency_in_progress_expiry", "job_timeout"),
        prevents="an idempotency key taken over while its first run is still going: both run",
    ),
    Rule(
        rule_id="I2",
        severity="warning",
        title="Ip <= V (celery)",
        engines=_CELERY,
        settings=("idempotency_in_progress_expiry", "visibility_timeout"),
        prevents="a redelivered job burning retries on a key its dead run still holds",
    ),
    Rule(
        rule_id="I3",
        severity="error",
        title="R > max(V, Ip)",
        engines=_ALL,
        settings=("idempotency_retention", "visibility_timeout", "idempotency_in_progress_expiry"),
        prevents="a completed key forgotten before a late redelivery: the job runs again",
    ),
    Rule(
        rule_id="L1",
        severity="error",
        title=f"L > Rd > {LEADER_JITTER_FACTOR:g} x Rp",
        engines=_ALL,
        settings=("leader_lease", "renew_deadline", "retry_period"),
        prevents="two schedulers leading at once, or leadership lost to one slow renewal",
    ),
    Rule(
        rule_id="L2",
        severity="warning",
        title="Rd + Rp < L",
        engines=_ALL,
        settings=("leader_lease", "renew_deadline", "retry_period"),
        prevents="a leader's last renewal try landing after its lease expired",
    ),
    Rule(
        rule_id="S1",
        severity="error",
        title="SQLite only with one replica",
        engines=("sql",),
        settings=("database_url", "replicas"),
        prevents="SQLite claims on several hosts: file locks do not span hosts",
    ),
    Rule(
        rule_id="C1",
        severity="error",
        title="task_acks_late is not turned off (celery)",
        engines=_CELERY,
        settings=("task_acks_late",),
        prevents="a job acknowledged when it starts and lost at SIGKILL or a crash",
    ),
    Rule(
        rule_id="C2",
        severity="error",
        title="task_reject_on_worker_lost is not turned off (celery)",
        engines=_CELERY,
        settings=("task_reject_on_worker_lost",),
        prevents="a job whose pool process is killed being acknowledged as failed and never re-run",
    ),
    Rule(
        rule_id="C3",
        severity="error",
        title="worker_prefetch_multiplier is 1 (celery)",
        engines=_CELERY,
        settings=("worker_prefetch_multiplier",),
        prevents="reserved messages aging unacknowledged behind running jobs, then redelivered",
    ),
    Rule(
        rule_id="C4",
        severity="error",
        title="soft time limit below the hard time limit (celery)",
        engines=_CELERY,
        settings=("task_soft_time_limit", "task_time_limit"),
        prevents="a soft limit that never fires, so a job is killed without a chance to checkpoint",
    ),
    Rule(
        rule_id="C5",
        severity="error",
        title="task_time_limit <= job_timeout (celery)",
        engines=_CELERY,
        settings=("task_time_limit", "job_timeout"),
        prevents="jobs running past the J that visibility_timeout was checked against",
    ),
    Rule(
        rule_id="C6",
        severity="error",
        title="the app's visibility timeout agrees with visibility_timeout (celery)",
        engines=_CELERY,
        settings=("visibility_timeout", "broker_transport_options['visibility_timeout']"),
        prevents="a budget checked against one V while Redis uses another",
    ),
)

_RULES_BY_ID = {rule.rule_id: rule for rule in RULES}


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
        leader_lease=settings.leader_lease,
        renew_deadline=settings.renew_deadline,
        retry_period=settings.retry_period,
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


def _fx(value: float) -> str:
    return format_seconds(value, exact=True)


_f = format_seconds


def _smallest_passing(start: float, passes: Callable[[float], bool]) -> float:
    """The smallest whole number >= ``start`` for which ``passes`` holds.

    Fix values are searched with the rule's own predicate, so float rounding cannot make a
    suggested value miss the bound it was computed from.
    """
    value = float(max(math.ceil(start), 0))
    for _ in range(100_000):  # a guard: every caller's predicate holds a few steps up
        if passes(value):
            break
        value += 1.0
    return value


def _largest_passing(start: float, passes: Callable[[float], bool]) -> float | None:
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
    shown = str(value) if isinstance(value, bool) else _fx(value)
    return f"{ENV_PREFIX}{name.upper()}={shown}"


def _set_at_least(name: str, value: float) -> str:
    return f"set {name} to at least {_fx(value)} ({_env(name, value)})"


def _set_at_most(name: str, value: float) -> str:
    return f"set {name} to at most {_fx(value)} ({_env(name, value)})"


def _set_to(name: str, value: float) -> str:
    return f"set {name} to {_fx(value)} ({_env(name, value)})"


# --- evaluating -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    settings: Settings
    budget: Budget
    celery: CeleryFacts


def _ok(rule_id: str, message: str, task: str | None = None) -> Finding:
    rule = _RULES_BY_ID[rule_id]
    return Finding(
        rule_id=rule.rule_id,
        severity=rule.severity,
        ok=True,
        title=rule.title,
        message=message,
        settings=rule.settings,
        fix=None,
        task=task,
    )


def _fail(
    rule_id: str,
    problem: str,
    fix: str,
    fix_values: dict[str, FixValue],
    *,
    settings: tuple[str, ...] | None = None,
    task: str | None = None,
) -> Finding:
    rule = _RULES_BY_ID[rule_id]
    return Finding(
        rule_id=rule.rule_id,
        severity=rule.severity,
        ok=False,
        title=rule.title,
        message=f"{problem}; {fix}",
        settings=settings if settings is not None else rule.settings,
        fix=fix,
        fix_values=tuple(fix_values.items()),
        task=task,
    )


def _healthy_drain(b: Budget) -> float:
    """The drain window a grace_period fix aims at: enough for G3 and for F1."""
    return max(MIN_DRAIN_WINDOW, 2 * b.checkpoint_interval)


def _grace_for_drain(b: Budget, drain: float) -> float:
    """The smallest whole grace_period that gives a drain window of at least ``drain``."""
    p, m = b.prestop_delay, b.release_margin
    return _smallest_passing(p + m + drain, lambda g: g - p - m >= drain)


def _check_g1(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    g, p, m, d = b.grace_period, b.prestop_delay, b.release_margin, b.drain_window
    if d > 0:
        return [
            _ok(
                "G1",
                f"drain window D = grace_period - prestop_delay - release_margin = "
                f"{_f(g)} - {_f(p)} - {_f(m)} = {_f(d)} s; the job in hand is released "
                f"before SIGKILL",
            )
        ]
    grace = _grace_for_drain(b, _healthy_drain(b))
    return [
        _fail(
            "G1",
            f"no drain window: D = grace_period - prestop_delay - release_margin = "
            f"{_f(g)} - {_f(p)} - {_f(m)} = {_f(d)} s, so P + M does not fit in G and the "
            f"kubelet's SIGKILL lands before the job in hand is released",
            f"{_set_at_least('grace_period', grace)}, or lower prestop_delay or release_margin",
            {"grace_period": grace},
        )
    ]


def _check_g2(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    g, p, m = b.grace_period, b.prestop_delay, b.release_margin
    if p < g:
        what = "no preStop delay" if p == 0 else f"prestop_delay {_f(p)} s"
        return [_ok("G2", f"{what}, below grace_period {_f(g)} s: SIGTERM reaches the worker")]
    target = _healthy_drain(b)
    prestop = _largest_passing(g - m - target, lambda x: x + m + target <= g) or 0.0
    grace = _grace_for_drain(b, target)
    return [
        _fail(
            "G2",
            f"prestop_delay {_f(p)} s is not below grace_period {_f(g)} s: the preStop hook "
            f"is still running at SIGKILL, so the worker never gets SIGTERM and never drains",
            f"lower prestop_delay below {_f(g)}, e.g. {_set_to('prestop_delay', prestop)}, or "
            f"set grace_period to at least {_f(grace)}",
            {"prestop_delay": prestop},
        )
    ]


def _check_g3(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    d = b.drain_window
    if d >= MIN_DRAIN_WINDOW:
        return [_ok("G3", f"drain window D = {_f(d)} s is at least {_f(MIN_DRAIN_WINDOW)} s")]
    target = _healthy_drain(b)
    grace = _grace_for_drain(b, target)
    return [
        _fail(
            "G3",
            f"drain window D = grace_period - prestop_delay - release_margin = {_f(d)} s is "
            f"under {_f(MIN_DRAIN_WINDOW)} s: nearly every job in hand at a deploy is "
            f"interrupted and released instead of finishing",
            f"{_set_at_least('grace_period', grace)} for a drain window of {_f(target)} s",
            {"grace_period": grace},
        )
    ]


def _check_t1(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    d = b.drain_window
    if not b.tasks:
        return [
            _ok(
                "T1",
                f"no tasks given; each task's timeout is checked against D = {_f(d)} s when "
                f"the app's tasks are known",
            )
        ]
    findings: list[Finding] = []
    fits = safe = 0
    for task in b.tasks:
        j = b.task_timeout(task)
        if j <= d:
            fits += 1
            continue
        if task.idempotent or task.checkpointed:
            safe += 1
            continue
        p, m = b.prestop_delay, b.release_margin
        grace = _grace_for_drain(b, j)
        source = "job_timeout" if task.timeout is None else "its timeout"
        lower = f"lower its timeout to at most {_f(math.floor(d))}, " if math.floor(d) > 0 else ""
        findings.append(
            _fail(
                "T1",
                f"task {task.name!r}: J = {_f(j)} s ({source}) exceeds the drain window "
                f"D = {_f(d)} s and the task is neither idempotent nor checkpointed: every "
                f"deploy can interrupt it; it will re-run from the start",
                f"checkpoint it or make it idempotent, {lower}or "
                f"{_set_at_least('grace_period', grace)} (D = {_f(grace - p - m)} s)",
                {"grace_period": grace},
                settings=("job_timeout", "grace_period")
                if task.timeout is None
                else ("grace_period",),
                task=task.name,
            )
        )
    if findings:
        return findings
    n = len(b.tasks)
    return [
        _ok(
            "T1",
            f"{n} task{'s' if n != 1 else ''}: {fits} finish within D = {_f(d)} s, "
            f"{safe} longer one{'s' if safe != 1 else ''} re-run safely "
            f"(idempotent or checkpointed)",
        )
    ]


def _check_f1(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    f, d = b.checkpoint_interval, b.drain_window
    if f <= d / 2:
        return [_ok("F1", f"checkpoint_interval F = {_f(f)} s <= D / 2 = {_f(d / 2)} s")]
    problem = (
        f"checkpoint_interval F = {_f(f)} s is above half the drain window "
        f"(D / 2 = {_f(d / 2)} s): a checkpointed job that cannot stop in time loses up to F "
        f"of work, more than the drain window lets it do"
    )
    interval = _largest_passing(d / 2, lambda x: x <= d / 2) if d > 0 else None
    if interval is not None:
        fix = (
            f"{_set_at_most('checkpoint_interval', interval)}, or set grace_period to at "
            f"least {_f(_grace_for_drain(b, 2 * f))}"
        )
        return [_fail("F1", problem, fix, {"checkpoint_interval": interval})]
    grace = _grace_for_drain(b, 2 * f)
    return [_fail("F1", problem, _set_at_least("grace_period", grace), {"grace_period": grace})]


def _v_text(ctx: _Context) -> str:
    v = ctx.budget.visibility_timeout
    default = " (the celery default)" if ctx.settings.visibility_timeout is None else ""
    return f"visibility_timeout V = {_f(v)} s{default}"


def _check_v1(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    v, j, d, m = b.visibility_timeout, b.longest_job_timeout, b.drain_window, b.release_margin
    bound = b.run_horizon
    terms = f"J + D + M = {_f(j)} + {_f(d)} + {_f(m)} = {_f(bound)} s"
    if v > bound:
        return [_ok("V1", f"{_v_text(ctx)} > {terms}: no job is handed on while it may still run")]
    fixed = _smallest_passing(bound, lambda x: x > bound)
    lower_j = v - d - m
    also = f", or lower job_timeout below {_f(lower_j)}" if lower_j > 0 and not b.tasks else ""
    return [
        _fail(
            "V1",
            f"{_v_text(ctx)} is not above {terms} (J = longest job_timeout): Redis would hand "
            f"a job that is still running to a second worker, which runs it again, "
            f"concurrently",
            f"{_set_at_least('visibility_timeout', fixed)}{also}",
            {"visibility_timeout": fixed},
        )
    ]


def _check_v2(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    v, c = b.visibility_timeout, b.longest_countdown
    if c <= 0:
        return [_ok("V2", "no ETA or countdown declared (max_countdown = 0)")]
    horizon = b.unacked_horizon
    terms = f"max_countdown + J + D + M = {_f(horizon)} s"
    if v > horizon:
        return [_ok("V2", f"{_v_text(ctx)} > {terms}: a waiting ETA message is not redelivered")]
    fixed = _smallest_passing(horizon, lambda x: x > horizon)
    return [
        _fail(
            "V2",
            f"{_v_text(ctx)} is not above {terms} (the longest countdown, {_f(c)} s, plus a "
            f"run): a message waiting for its ETA is held unacknowledged and Redis redelivers "
            f"it, so the job runs twice",
            f"{_set_at_least('visibility_timeout', fixed)}, or lower max_countdown",
            {"visibility_timeout": fixed},
        )
    ]


def _check_v3(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    v = b.visibility_timeout
    horizon = b.unacked_horizon
    limit = max(_CELERY_DEFAULT_V, VISIBILITY_SLACK_FACTOR * horizon)
    terms = (
        f"max({_f(_CELERY_DEFAULT_V)}, {_f(VISIBILITY_SLACK_FACTOR)} x "
        f"(countdown + J + D + M = {_f(horizon)})) = {_f(limit)} s"
    )
    if v <= limit:
        return [_ok("V3", f"{_v_text(ctx)} <= {terms}: redelivery after a crash is not delayed")]
    fixed = _smallest_passing(max(_CELERY_DEFAULT_V, 2 * horizon), lambda x: horizon < x <= limit)
    return [
        _fail(
            "V3",
            f"{_v_text(ctx)} is above {terms}: a job whose pod vanished without releasing it "
            f"(node loss) waits V before another worker runs it",
            _set_to("visibility_timeout", fixed),
            {"visibility_timeout": fixed},
        )
    ]


def _heartbeat_fix(b: Budget) -> float | None:
    v = b.visibility_timeout
    return _largest_passing(v / 3, lambda x: x <= v / 3)


def _h_text(ctx: _Context) -> str:
    h = ctx.budget.heartbeat_interval
    default = " (default V / 3)" if ctx.settings.heartbeat_interval is None else ""
    return f"heartbeat_interval H = {_f(h)} s{default}"


def _check_h(ctx: _Context, rule_id: str) -> list[Finding]:
    b = ctx.budget
    h, v = b.heartbeat_interval, b.visibility_timeout
    if rule_id == "H1":
        ok, bound_text = h <= v / 3, f"V / 3 = {_f(v / 3)} s"
        ok_text = f"{_h_text(ctx)} <= {bound_text}: a lease survives two late heartbeats"
        problem = (
            f"{_h_text(ctx)} is above {bound_text} (V = visibility_timeout, the job lease): "
            f"one late heartbeat (a GC pause, a slow database) lets the lease expire and "
            f"another worker take the running job"
        )
    else:
        ok, bound_text = h < v / 2, f"V / 2 = {_f(v / 2)} s"
        ok_text = f"{_h_text(ctx)} < {bound_text}"
        problem = (
            f"{_h_text(ctx)} is not below {bound_text} (V = visibility_timeout, the job "
            f"lease): a single missed heartbeat lets the lease expire and a second worker run "
            f"the job while it is still running"
        )
    if ok:
        return [_ok(rule_id, ok_text)]
    fixed = _heartbeat_fix(b)
    if fixed is not None:
        fix = (
            f"{_set_at_most('heartbeat_interval', fixed)} (or unset it: V / 3), or set "
            f"visibility_timeout to at least {_f(math.ceil(3 * h))}"
        )
        return [_fail(rule_id, problem, fix, {"heartbeat_interval": fixed})]
    lease = _smallest_passing(3 * h, lambda x: h <= x / 3)
    return [
        _fail(
            rule_id,
            problem,
            _set_at_least("visibility_timeout", lease),
            {"visibility_timeout": lease},
        )
    ]


def _ip_text(ctx: _Context) -> str:
    ip = ctx.budget.idempotency_in_progress_expiry
    default = " (default J + 30)" if ctx.settings.idempotency_in_progress_expiry is None else ""
    return f"idempotency_in_progress_expiry Ip = {_f(ip)} s{default}"


def _good_in_progress(b: Budget) -> float | None:
    """An Ip with J < Ip, and Ip <= V on celery; None when V leaves no room."""
    j, v = b.longest_job_timeout, b.visibility_timeout
    upper = v if not b.lease_extendable else math.inf
    preferred = _smallest_passing(j + IN_PROGRESS_EXPIRY_PAD, lambda x: j < x)
    if preferred <= upper:
        return preferred
    return _largest_passing(upper, lambda x: j < x <= upper)


def _check_i1(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    ip, j = b.idempotency_in_progress_expiry, b.longest_job_timeout
    if j < ip:
        return [_ok("I1", f"{_ip_text(ctx)} > J = {_f(j)} s: a key is not taken over mid-run")]
    fixed = _good_in_progress(b) or _smallest_passing(j + IN_PROGRESS_EXPIRY_PAD, lambda x: j < x)
    return [
        _fail(
            "I1",
            f"{_ip_text(ctx)} is not above J = {_f(j)} s (longest job_timeout): a second "
            f"delivery can take over the key while the first run is still going, and both run",
            f"{_set_at_least('idempotency_in_progress_expiry', fixed)} (or unset it: J + 30)",
            {"idempotency_in_progress_expiry": fixed},
        )
    ]


def _check_i2(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    ip, v, j = b.idempotency_in_progress_expiry, b.visibility_timeout, b.longest_job_timeout
    if ip <= v:
        return [
            _ok(
                "I2",
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
            f"{_set_to('idempotency_in_progress_expiry', fixed)} (above J = {_f(j)}, at most "
            f"V), or set visibility_timeout to at least {_f(math.ceil(ip))}"
        )
        return [_fail("I2", problem, fix, {"idempotency_in_progress_expiry": fixed})]
    # V leaves no room above J: raise V to Ip, and above the V1/V2 bound while at it.
    horizon = b.unacked_horizon
    lease = _smallest_passing(max(ip, horizon), lambda x: ip <= x and x > horizon)
    return [
        _fail(
            "I2", problem, _set_at_least("visibility_timeout", lease), {"visibility_timeout": lease}
        )
    ]


def _check_i3(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    r, v, ip = b.idempotency_retention, b.visibility_timeout, b.idempotency_in_progress_expiry
    horizon = max(v, ip)
    terms = f"max(V = {_f(v)}, Ip = {_f(ip)}) = {_f(horizon)} s"
    if r > horizon:
        return [
            _ok(
                "I3",
                f"idempotency_retention R = {_f(r)} s > {terms}: a completed key outlives any "
                f"redelivery",
            )
        ]
    fixed = _smallest_passing(horizon, lambda x: x > horizon)
    return [
        _fail(
            "I3",
            f"idempotency_retention R = {_f(r)} s is not above the longest redelivery horizon "
            f"{terms} (visibility_timeout, idempotency_in_progress_expiry): a job redelivered "
            f"after it completed (a lost ack), or a delivery that waited on the key, runs again",
            _set_at_least("idempotency_retention", fixed),
            {"idempotency_retention": fixed},
        )
    ]


def _check_l1(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    lease, rd, rp = b.leader_lease, b.renew_deadline, b.retry_period
    jitter = LEADER_JITTER_FACTOR * rp
    chain = (
        f"leader_lease L = {_f(lease)} s, renew_deadline Rd = {_f(rd)} s, "
        f"{_f(LEADER_JITTER_FACTOR)} x retry_period Rp = {_f(jitter)} s"
    )
    if lease > rd > jitter:
        return [_ok("L1", f"L > Rd > {_f(LEADER_JITTER_FACTOR)} x Rp: {chain}")]
    problems: list[str] = []
    fixes: list[str] = []
    values: dict[str, FixValue] = {}
    if not rd > jitter:
        problems.append(
            f"renew_deadline is not above {_f(LEADER_JITTER_FACTOR)} x retry_period, so a "
            f"leader gets barely one renewal try before it gives up"
        )
        retry = _largest_passing(rd / 5, lambda x: rd > LEADER_JITTER_FACTOR * x)
        if retry is not None:
            fixes.append(_set_at_most("retry_period", retry))
            values["retry_period"] = retry
        else:  # renew_deadline too small for any retry_period: raise it instead
            rd = _smallest_passing(jitter, lambda x: x > jitter)
            fixes.append(_set_at_least("renew_deadline", rd))
            values["renew_deadline"] = rd
    if not lease > rd:
        if lease <= b.renew_deadline:
            problems.append(
                "leader_lease is not above renew_deadline, so a standby can take the lease "
                "while the leader is still renewing: two schedulers lead at once"
            )
        new_lease = _smallest_passing(1.5 * rd, lambda x: x > rd)
        fixes.append(_set_at_least("leader_lease", new_lease))
        values["leader_lease"] = new_lease
    return [_fail("L1", f"{chain}: " + "; ".join(problems), " and ".join(fixes), values)]


def _check_l2(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    lease, rd, rp = b.leader_lease, b.renew_deadline, b.retry_period
    total = rd + rp
    terms = f"renew_deadline + retry_period = {_f(rd)} + {_f(rp)} = {_f(total)} s"
    if total < lease:
        return [_ok("L2", f"{terms} < leader_lease L = {_f(lease)} s")]
    fixed = _smallest_passing(total, lambda x: total < x)
    return [
        _fail(
            "L2",
            f"{terms} is not below leader_lease L = {_f(lease)} s: a leader's last renewal try "
            f"can land after its lease expired, when a standby may already lead (fire records "
            f"stay unique, but leadership flaps)",
            _set_at_least("leader_lease", fixed),
            {"leader_lease": fixed},
        )
    ]


def _check_s1(ctx: _Context) -> list[Finding]:
    s = ctx.settings
    scheme = s.database_url.split(":", 1)[0]  # never the whole URL: it may hold a password
    if not scheme.lower().startswith("sqlite"):
        return [_ok("S1", f"database_url is {scheme}, not SQLite: replicas may share it")]
    if s.replicas <= 1:
        return [_ok("S1", "database_url is SQLite with replicas = 1: one host, as SQLite needs")]
    return [
        _fail(
            "S1",
            f"database_url is SQLite ({scheme}) but replicas = {s.replicas}: SQLite's locks "
            f"do not span hosts, so workers on other hosts claim the same jobs or corrupt the "
            f"file",
            f"{_set_to('replicas', 1)}, or point database_url at PostgreSQL "
            f"({ENV_PREFIX}DATABASE_URL=postgresql+psycopg://...)",
            {"replicas": 1},
        )
    ]


def _celery_flag(ctx: _Context, rule_id: str, field_name: str, why: str) -> list[Finding]:
    key = CELERY_CONFIG_KEYS[field_name]
    value = getattr(ctx.celery, field_name)
    if value is None:
        return [_ok(rule_id, f"{key} not overridden by the app (workerkit sets True)")]
    if value:
        return [_ok(rule_id, f"{key} = True")]
    return [
        _fail(
            rule_id,
            f"the Celery app sets {key} = False: {why}",
            f"set {key} = True in the Celery app, or remove it (workerkit sets True)",
            {f"celery.{field_name}": True},
        )
    ]


def _check_c1(ctx: _Context) -> list[Finding]:
    return _celery_flag(
        ctx,
        "C1",
        "acks_late",
        "a message is acknowledged when its job starts, so a job in hand at SIGKILL or a crash "
        "is lost",
    )


def _check_c2(ctx: _Context) -> list[Finding]:
    return _celery_flag(
        ctx,
        "C2",
        "reject_on_worker_lost",
        "a job whose pool process is killed (OOM, SIGKILL) is acknowledged as failed and never "
        "re-run",
    )


def _check_c3(ctx: _Context) -> list[Finding]:
    key = CELERY_CONFIG_KEYS["prefetch_multiplier"]
    value = ctx.celery.prefetch_multiplier
    if value is None:
        return [_ok("C3", f"{key} not overridden by the app (workerkit sets 1)")]
    if value == 1:
        return [_ok("C3", f"{key} = 1")]
    reserved = "without limit" if value <= 0 else f"{value} x concurrency messages"
    return [
        _fail(
            "C3",
            f"the Celery app sets {key} = {value}: the worker reserves {reserved}; they wait "
            f"unacknowledged behind running jobs, their visibility_timeout clock running, and "
            f"can be redelivered to another worker while still queued here",
            f"set {key} = 1 in the Celery app, or remove it (workerkit sets 1)",
            {"celery.prefetch_multiplier": 1},
        )
    ]


def _check_c4(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    soft_key, hard_key = CELERY_CONFIG_KEYS["soft_time_limit"], CELERY_CONFIG_KEYS["time_limit"]
    soft, hard = ctx.celery.soft_time_limit, ctx.celery.time_limit
    if hard is None:
        hard, hard_text = b.job_timeout, f"{hard_key} (job_timeout, set by workerkit)"
    else:
        hard_text = hard_key
    if soft is None:
        return [_ok("C4", f"{soft_key} not overridden by the app (workerkit sets it below J)")]
    if soft < hard:
        return [_ok("C4", f"{soft_key} = {_f(soft)} s < {hard_text} = {_f(hard)} s")]
    limit = hard
    fixed = _largest_passing(max(hard - b.release_margin, hard / 2), lambda x: x < limit)
    fix = (
        f"set {soft_key} to at most {_fx(fixed)} in the Celery app, or remove it"
        if fixed is not None
        else f"remove {soft_key} from the Celery app"
    )
    values: dict[str, FixValue] = {"celery.soft_time_limit": fixed} if fixed is not None else {}
    return [
        _fail(
            "C4",
            f"the Celery app sets {soft_key} = {_f(soft)} s, not below {hard_text} = "
            f"{_f(hard)} s: the soft limit never fires first, so the job is killed without a "
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


def _check_c5(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    key = CELERY_CONFIG_KEYS["time_limit"]
    hard, j = ctx.celery.time_limit, b.job_timeout
    if hard is None:
        return [_ok("C5", f"{key} not overridden by the app (workerkit sets it to job_timeout)")]
    if hard <= j:
        return [_ok("C5", f"{key} = {_f(hard)} s <= job_timeout J = {_f(j)} s")]
    return [
        _fail(
            "C5",
            f"the Celery app sets {key} = {_f(hard)} s, above job_timeout J = {_f(j)} s: jobs "
            f"run past the J that visibility_timeout was checked against",
            f"set {key} to at most {_fx(j)} in the Celery app, or remove it; or "
            f"{_set_at_least('job_timeout', math.ceil(hard))}",
            {"celery.time_limit": j},
        )
    ]


def _check_c6(ctx: _Context) -> list[Finding]:
    b = ctx.budget
    key = CELERY_CONFIG_KEYS["visibility_timeout"]
    theirs, v = ctx.celery.visibility_timeout, b.visibility_timeout
    if theirs is None:
        return [_ok("C6", f"{key} not overridden by the app (workerkit sets visibility_timeout)")]
    if theirs == v:
        return [_ok("C6", f"{key} = {_f(theirs)} s, the same as visibility_timeout")]
    return [
        _fail(
            "C6",
            f"the Celery app sets {key} = {_f(theirs)} s but visibility_timeout V = {_f(v)} s: "
            f"the budget is checked against a V that Redis does not use",
            f"set {key} to {_fx(v)} in the Celery app or remove it; or "
            f"{_set_to('visibility_timeout', theirs)} if that is the V you mean",
            {"celery.visibility_timeout": v},
        )
    ]


_CHECKS: dict[str, Callable[[_Context], list[Finding]]] = {
    "G1": _check_g1,
    "G2": _check_g2,
    "G3": _check_g3,
    "T1": _check_t1,
    "F1": _check_f1,
    "V1": _check_v1,
    "V2": _check_v2,
    "V3": _check_v3,
    "H1": lambda ctx: _check_h(ctx, "H1"),
    "H2": lambda ctx: _check_h(ctx, "H2"),
    "I1": _check_i1,
    "I2": _check_i2,
    "I3": _check_i3,
    "L1": _check_l1,
    "L2": _check_l2,
    "S1": _check_s1,
    "C1": _check_c1,
    "C2": _check_c2,
    "C3": _check_c3,
    "C4": _check_c4,
    "C5": _check_c5,
    "C6": _check_c6,
}


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
    ctx = _Context(settings=settings, budget=budget, celery=celery or CeleryFacts())
    findings: list[Finding] = []
    for rule in RULES:
        if budget.engine in rule.engines:
            findings.extend(_CHECKS[rule.rule_id](ctx))
    return BudgetReport(budget=budget, findings=tuple(findings), strict=settings.strict)
