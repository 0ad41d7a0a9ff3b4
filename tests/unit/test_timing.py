"""The timing budget: every rule fails and passes, names its settings, and its fix fixes it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from workerkit.errors import ConfigurationError, TimingBudgetError
from workerkit.settings import ENGINES, ENV_PREFIX, Settings, load_settings
from workerkit.timing import (
    CELERY_CONFIG_KEYS,
    RULES,
    Budget,
    BudgetReport,
    CeleryFacts,
    Finding,
    TaskTiming,
    evaluate,
    format_seconds,
    resolve_budget,
)
from workerkit.timing.rules.base import Context

pytestmark = pytest.mark.unit

RULE_IDS = tuple(rule.rule_id for rule in RULES)
RULE_BY_ID = {rule.rule_id: rule for rule in RULES}


# --- helpers --------------------------------------------------------------------------------


def make(**changes: Any) -> Settings:
    """Settings with changes, checked like any other source."""
    return Settings().replace(**changes)


def findings_of(report: BudgetReport, rule_id: str, task: str | None = None) -> list[Finding]:
    return [f for f in report.findings if f.rule_id == rule_id and (task is None or f.task == task)]


def the_finding(report: BudgetReport, rule_id: str, task: str | None = None) -> Finding:
    found = findings_of(report, rule_id, task)
    assert len(found) == 1, (rule_id, task, report.findings)
    return found[0]


def apply_fix(
    settings: Settings, celery: CeleryFacts | None, finding: Finding
) -> tuple[Settings, CeleryFacts | None]:
    """Apply a finding's machine-readable fix to the settings and the Celery facts."""
    setting_changes: dict[str, Any] = {}
    celery_changes: dict[str, Any] = {}
    for key, value in finding.fix_values:
        if key.startswith("celery."):
            celery_changes[key.removeprefix("celery.")] = value
        else:
            setting_changes[key] = value
    if setting_changes:
        settings = settings.replace(**setting_changes)
    if celery_changes:
        celery = dataclasses.replace(celery or CeleryFacts(), **celery_changes)
    return settings, celery


def message_names(finding: Finding, key: str) -> bool:
    if key.startswith("celery."):
        return CELERY_CONFIG_KEYS[key.removeprefix("celery.")] in finding.message
    return key in finding.message


def assert_well_formed_failure(finding: Finding) -> None:
    assert not finding.ok
    assert finding.severity == RULE_BY_ID[finding.rule_id].severity
    assert finding.fix
    assert finding.fix in finding.message
    for name in finding.settings:
        assert name in finding.message, (name, finding.message)
    for key, value in finding.fix_values:
        assert message_names(finding, key), (key, finding.message)
        if not isinstance(value, bool):
            shown = format_seconds(value, exact=True)
            assert shown in finding.fix, (shown, finding.fix)
            assert float(shown) == value  # what the message says is exactly what fixes it
        if not key.startswith("celery."):
            assert f"{ENV_PREFIX}{key.upper()}=" in finding.message


def assert_fix_fixes(
    settings: Settings,
    tasks: tuple[TaskTiming, ...],
    celery: CeleryFacts | None,
    finding: Finding,
) -> None:
    fixed_settings, fixed_celery = apply_fix(settings, celery, finding)
    after = evaluate(fixed_settings, tasks, fixed_celery)
    still = [f for f in findings_of(after, finding.rule_id, finding.task) if not f.ok]
    assert not still, (finding.fix_values, still)


# --- every rule: a failing and a passing case ---------------------------------------------------

LONG = TaskTiming("long_import", 600.0)
SHORT = TaskTiming("short_email", 10.0)

# rule id -> (settings changes, tasks, celery facts) that make the rule fail.
FAILING: dict[str, list[tuple[dict[str, Any], tuple[TaskTiming, ...], CeleryFacts | None]]] = {
    "G1": [
        ({"grace_period": 10, "prestop_delay": 10}, (), None),
        ({"grace_period": 5, "release_margin": 5}, (), None),
        ({"grace_period": 3, "prestop_delay": 1, "release_margin": 2.5}, (), None),
    ],
    "G2": [
        ({"grace_period": 10, "prestop_delay": 10}, (), None),
        ({"grace_period": 30, "prestop_delay": 45}, (), None),
    ],
    "G3": [({"grace_period": 8}, (), None), ({"grace_period": 30, "prestop_delay": 22}, (), None)],
    "T1": [
        ({}, (LONG,), None),
        ({}, (TaskTiming("default_timeout", None),), None),
        ({"engine": "celery"}, (LONG, SHORT, TaskTiming("other", 100.0)), None),
    ],
    "F1": [
        ({"checkpoint_interval": 20}, (), None),
        ({"grace_period": 6, "checkpoint_interval": 1}, (), None),
        ({"grace_period": 5.001, "checkpoint_interval": 1}, (), None),
    ],
    "V1": [
        ({"engine": "celery", "job_timeout": 60, "visibility_timeout": 30}, (), None),
        ({"engine": "celery", "job_timeout": 60, "visibility_timeout": 90}, (), None),
        ({"engine": "celery"}, (TaskTiming("huge", 4000.0),), None),
    ],
    "V2": [
        ({"engine": "celery", "max_countdown": 3600}, (), None),
        ({"engine": "celery"}, (TaskTiming("later", 60.0, max_countdown=7200),), None),
    ],
    "V3": [
        ({"engine": "celery", "visibility_timeout": 7200}, (), None),
        ({"engine": "celery", "visibility_timeout": 86400, "job_timeout": 3000}, (), None),
    ],
    "H1": [
        ({"visibility_timeout": 30, "heartbeat_interval": 12}, (), None),
        ({"engine": "rq", "visibility_timeout": 60, "heartbeat_interval": 25}, (), None),
    ],
    "H2": [
        ({"visibility_timeout": 30, "heartbeat_interval": 15}, (), None),
        ({"engine": "rq", "visibility_timeout": 10, "heartbeat_interval": 60}, (), None),
        ({"visibility_timeout": 1, "heartbeat_interval": 1}, (), None),
    ],
    "I1": [
        ({"idempotency_in_progress_expiry": 300}, (), None),
        ({"idempotency_in_progress_expiry": 400}, (LONG,), None),
        ({"engine": "celery", "idempotency_in_progress_expiry": 100}, (), None),
    ],
    "I2": [
        ({"engine": "celery", "idempotency_in_progress_expiry": 5000}, (), None),
        ({"engine": "celery", "job_timeout": 60, "visibility_timeout": 30}, (), None),
        ({"engine": "celery", "job_timeout": 60, "visibility_timeout": 80}, (), None),
    ],
    "I3": [
        ({"engine": "celery", "idempotency_retention": 600}, (), None),
        ({"idempotency_retention": 300}, (), None),
        ({"idempotency_in_progress_expiry": 90000}, (), None),
    ],
    "L1": [
        ({"scheduler_lease_duration": 10, "scheduler_renew_deadline": 10}, (), None),
        ({"scheduler_lease_duration": 5, "scheduler_renew_deadline": 6}, (), None),
    ],
    "L2": [
        ({"scheduler_renew_deadline": 2.4, "scheduler_retry_period": 2}, (), None),
        ({"scheduler_renew_deadline": 6, "scheduler_retry_period": 6}, (), None),
        ({"scheduler_renew_deadline": 0.003, "scheduler_retry_period": 1}, (), None),
    ],
    "L3": [
        ({"scheduler_standby_delay": 2, "scheduler_misfire_grace": 2}, (), None),
        ({"scheduler_standby_delay": 5, "scheduler_misfire_grace": 0.001}, (), None),
    ],
    "L4": [
        ({"grace_period": 3, "release_margin": 1, "scheduler_retry_period": 3}, (), None),
        ({"grace_period": 30, "prestop_delay": 29}, (), None),
    ],
    "S1": [
        ({"replicas": 2}, (), None),
        ({"replicas": 5, "database_url": "sqlite+pysqlite:////data/q.db"}, (), None),
    ],
    "C1": [({"engine": "celery"}, (), CeleryFacts(acks_late=False))],
    "C2": [({"engine": "celery"}, (), CeleryFacts(reject_on_worker_lost=False))],
    "C3": [
        ({"engine": "celery"}, (), CeleryFacts(prefetch_multiplier=4)),
        ({"engine": "celery"}, (), CeleryFacts(prefetch_multiplier=0)),
    ],
    "C4": [
        ({"engine": "celery"}, (), CeleryFacts(soft_time_limit=300, time_limit=300)),
        ({"engine": "celery"}, (), CeleryFacts(soft_time_limit=400)),
    ],
    "C5": [({"engine": "celery"}, (), CeleryFacts(time_limit=600))],
    "C6": [({"engine": "celery"}, (), CeleryFacts(visibility_timeout=43200))],
}

# rule id -> cases that make the rule pass (defaults pass every rule, see below).
PASSING: dict[str, list[tuple[dict[str, Any], tuple[TaskTiming, ...], CeleryFacts | None]]] = {
    "G1": [({"grace_period": 6, "prestop_delay": 0, "release_margin": 5}, (), None)],
    "G2": [({"grace_period": 60, "prestop_delay": 10}, (), None)],
    "G3": [({"grace_period": 10}, (), None)],
    "T1": [
        ({}, (SHORT,), None),
        ({}, (dataclasses.replace(LONG, idempotent=True),), None),
        ({}, (dataclasses.replace(LONG, checkpointed=True),), None),
        ({"grace_period": 700}, (LONG,), None),
    ],
    "F1": [({"checkpoint_interval": 12.5}, (), None)],
    "V1": [({"engine": "celery", "job_timeout": 60, "visibility_timeout": 91}, (), None)],
    "V2": [
        ({"engine": "celery", "max_countdown": 3000}, (), None),
        ({"engine": "celery"}, (TaskTiming("later", 60.0, max_countdown=600),), None),
    ],
    "V3": [
        ({"engine": "celery", "visibility_timeout": 3600}, (), None),
        ({"engine": "celery", "visibility_timeout": 12000, "job_timeout": 3000}, (), None),
    ],
    "H1": [({"visibility_timeout": 30, "heartbeat_interval": 10}, (), None)],
    "H2": [({"visibility_timeout": 30, "heartbeat_interval": 14.9}, (), None)],
    "I1": [({"idempotency_in_progress_expiry": 301}, (), None), ({}, (LONG,), None)],
    "I2": [({"engine": "celery", "idempotency_in_progress_expiry": 3600}, (), None)],
    "I3": [({"engine": "celery", "idempotency_retention": 3601}, (), None)],
    "L1": [({"scheduler_lease_duration": 10.1, "scheduler_renew_deadline": 10}, (), None)],
    "L2": [({"scheduler_renew_deadline": 10, "scheduler_retry_period": 8}, (), None)],
    "L3": [({"scheduler_standby_delay": 0, "scheduler_misfire_grace": 0.1}, (), None)],
    "L4": [({"grace_period": 4, "release_margin": 1, "scheduler_retry_period": 3.8}, (), None)],
    "S1": [
        ({"replicas": 3, "database_url": "postgresql+psycopg://db/q"}, (), None),
        ({"replicas": 1}, (), None),
    ],
    "C1": [({"engine": "celery"}, (), CeleryFacts(acks_late=True))],
    "C2": [({"engine": "celery"}, (), CeleryFacts(reject_on_worker_lost=True))],
    "C3": [({"engine": "celery"}, (), CeleryFacts(prefetch_multiplier=1))],
    "C4": [({"engine": "celery"}, (), CeleryFacts(soft_time_limit=290, time_limit=300))],
    "C5": [({"engine": "celery"}, (), CeleryFacts(time_limit=300))],
    "C6": [({"engine": "celery"}, (), CeleryFacts(visibility_timeout=3600))],
}

FAILING_CASES = [
    pytest.param(rule_id, *case, id=f"{rule_id}-{i}")
    for rule_id, cases in FAILING.items()
    for i, case in enumerate(cases)
]
PASSING_CASES = [
    pytest.param(rule_id, *case, id=f"{rule_id}-{i}")
    for rule_id, cases in PASSING.items()
    for i, case in enumerate(cases)
]


def test_every_rule_has_failing_and_passing_cases() -> None:
    assert set(FAILING) == set(RULE_IDS)
    assert set(PASSING) == set(RULE_IDS)


def test_rule_ids_are_stable() -> None:
    # Ids are referenced by docs, logs and users' suppressions: renaming one is a breaking change.
    assert RULE_IDS == (
        "G1", "G2", "G3", "T1", "F1", "V1", "V2", "V3", "H1", "H2", "I1", "I2", "I3",
        "L1", "L2", "L3", "L4", "S1", "C1", "C2", "C3", "C4", "C5", "C6",
    )  # fmt: skip
    assert len(set(RULE_IDS)) == len(RULE_IDS)
    for rule in RULES:
        assert rule.severity in ("error", "warning")
        assert set(rule.engines) <= set(ENGINES)
        assert rule.title
        assert rule.prevents


@pytest.mark.parametrize(("rule_id", "changes", "tasks", "celery"), FAILING_CASES + PASSING_CASES)
def test_each_finding_carries_the_declaration_of_its_rule(
    rule_id: str, changes: dict[str, Any], tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    settings = make(**changes)
    ctx = Context(settings, resolve_budget(settings, tasks), celery or CeleryFacts())
    for rule in RULES:
        if settings.engine not in rule.engines:
            continue
        for finding in rule.apply(ctx):
            assert (finding.rule_id, finding.severity) == (rule.rule_id, rule.severity)
            assert finding.title == rule.title


@pytest.mark.parametrize(("rule_id", "changes", "tasks", "celery"), FAILING_CASES)
def test_rule_fails_naming_its_settings_and_a_fixing_value(
    rule_id: str, changes: dict[str, Any], tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    report = evaluate(make(**changes), tasks, celery)
    failed = [f for f in findings_of(report, rule_id) if not f.ok]
    assert failed, report.findings
    for finding in failed:
        assert_well_formed_failure(finding)
        assert finding.fix_values


@pytest.mark.parametrize(("rule_id", "changes", "tasks", "celery"), FAILING_CASES)
def test_applying_the_suggested_fix_makes_the_rule_pass(
    rule_id: str, changes: dict[str, Any], tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    settings = make(**changes)
    report = evaluate(settings, tasks, celery)
    for finding in findings_of(report, rule_id):
        if not finding.ok:
            assert_fix_fixes(settings, tasks, celery, finding)


@pytest.mark.parametrize(("rule_id", "changes", "tasks", "celery"), PASSING_CASES)
def test_rule_passes_with_a_short_message(
    rule_id: str, changes: dict[str, Any], tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    report = evaluate(make(**changes), tasks, celery)
    finding = the_finding(report, rule_id)
    assert finding.ok
    assert finding.message
    assert finding.fix is None
    assert finding.fix_values == ()


@pytest.mark.parametrize("engine", ENGINES)
def test_defaults_have_no_errors_and_no_warnings_on_every_engine(engine: str) -> None:
    report = evaluate(make(engine=engine))
    assert report.ok
    assert report.failed == ()
    report.raise_for_errors()


@pytest.mark.parametrize("engine", ENGINES)
def test_only_the_rules_of_the_engine_are_applied(engine: str) -> None:
    report = evaluate(make(engine=engine))
    applied = [f.rule_id for f in report.findings]
    expected = [rule.rule_id for rule in RULES if engine in rule.engines]
    assert applied == expected


# --- the cases the brief pins down ----------------------------------------------------------


def test_celery_visibility_below_job_timeout_is_an_error_with_the_fixing_value(
    tmp_path: Path,
) -> None:
    env = {
        "WORKERKIT_ENGINE": "celery",
        "WORKERKIT_JOB_TIMEOUT": "60",
        "WORKERKIT_VISIBILITY_TIMEOUT": "30",
    }
    report = evaluate(load_settings(env=env, cwd=tmp_path))
    assert not report.ok
    v1 = the_finding(report, "V1")
    assert v1 in report.errors
    assert "visibility_timeout" in v1.message
    assert "at least 91" in v1.message
    assert "WORKERKIT_VISIBILITY_TIMEOUT=91" in v1.message
    assert v1.fix_values == (("visibility_timeout", 91.0),)
    with pytest.raises(TimingBudgetError, match="visibility_timeout"):
        report.raise_for_errors()


def test_prestop_delay_filling_the_grace_period_is_an_error_naming_grace_period(
    tmp_path: Path,
) -> None:
    env = {"WORKERKIT_GRACE_PERIOD": "10", "WORKERKIT_PRESTOP_DELAY": "10"}
    report = evaluate(load_settings(env=env, cwd=tmp_path))
    assert not report.ok
    ids = {f.rule_id for f in report.errors}
    assert {"G1", "G2"} <= ids
    assert all("grace_period" in f.message for f in report.errors)
    assert "lower prestop_delay below 10" in the_finding(report, "G2").message


def test_celery_default_visibility_timeout_is_not_far_above_the_bound() -> None:
    # 3600 s against J + D + M = 330 s: workerkit's own crash recovery makes a long V intended.
    assert the_finding(evaluate(make(engine="celery")), "V3").ok


# --- the rules' details ---------------------------------------------------------------------


def test_t1_reports_each_offending_task_by_name() -> None:
    tasks = (
        LONG,
        SHORT,
        TaskTiming("also_long", 120.0),
        TaskTiming("safe", 900.0, idempotent=True),
    )
    report = evaluate(make(), tasks)
    failing = [f for f in findings_of(report, "T1") if not f.ok]
    assert [f.task for f in failing] == ["long_import", "also_long"]
    assert "'long_import'" in failing[0].message
    assert "every deploy can interrupt it; it will re-run from the start" in failing[0].message
    assert report.ok  # a warning


def test_t1_is_an_error_in_strict_mode() -> None:
    report = evaluate(make(strict=True), (LONG,))
    assert not report.ok
    assert [f.rule_id for f in report.errors] == ["T1"]
    assert report.warnings == ()
    with pytest.raises(TimingBudgetError, match="strict"):
        report.raise_for_errors()


def test_warnings_do_not_refuse_start_unless_strict() -> None:
    report = evaluate(make(grace_period=8, checkpoint_interval=1))
    assert [f.rule_id for f in report.warnings] == ["G3"]
    assert report.errors == ()
    assert report.ok
    report.raise_for_errors()


def test_heartbeat_between_a_third_and_a_half_of_the_lease_warns() -> None:
    report = evaluate(make(visibility_timeout=30, heartbeat_interval=12))
    assert not the_finding(report, "H1").ok
    assert the_finding(report, "H2").ok
    assert report.ok


def test_heartbeat_of_half_the_lease_is_an_error() -> None:
    report = evaluate(make(engine="rq", visibility_timeout=30, heartbeat_interval=15))
    assert the_finding(report, "H2") in report.errors


def test_celery_has_no_heartbeat_rules_and_sql_no_visibility_rules() -> None:
    celery = {f.rule_id for f in evaluate(make(engine="celery")).findings}
    sql = {f.rule_id for f in evaluate(make(engine="sql")).findings}
    assert not {"H1", "H2", "S1"} & celery
    assert not {"V1", "V2", "V3", "I2", "C1"} & sql


def test_sqlite_replicas_are_only_checked_on_the_sql_engine() -> None:
    # On rq and celery the queue is Redis; database_url keeps its (unused) SQLite default.
    assert evaluate(make(engine="rq", replicas=4)).ok


def test_s1_never_prints_the_database_password() -> None:
    report = evaluate(make(replicas=2, database_url="sqlite:///secret-pw.db"))
    assert "secret-pw" not in the_finding(report, "S1").message


def test_v2_counts_the_countdown_and_the_run() -> None:
    # A message with a 3000 s countdown is held unacknowledged 3000 s, then runs up to J + D + M.
    report = evaluate(make(engine="celery", max_countdown=3300))
    v2 = the_finding(report, "V2")
    assert not v2.ok
    assert v2.fix_values == (("visibility_timeout", 3631.0),)


def test_c4_compares_the_soft_limit_with_job_timeout_when_no_hard_limit_is_set() -> None:
    report = evaluate(make(engine="celery"), (), CeleryFacts(soft_time_limit=300))
    c4 = the_finding(report, "C4")
    assert not c4.ok
    assert "job_timeout" in c4.message


def test_l1_and_l2_fixes_together_fix_a_chain_broken_twice() -> None:
    settings = make(
        scheduler_lease_duration=2, scheduler_renew_deadline=2, scheduler_retry_period=2
    )
    report = evaluate(settings)
    l1, l2 = the_finding(report, "L1"), the_finding(report, "L2")
    assert dict(l1.fix_values) == {"scheduler_lease_duration": 3.0}
    assert set(dict(l2.fix_values)) == {"scheduler_retry_period"}
    fixed = settings.replace(**dict(l1.fix_values), **dict(l2.fix_values))
    assert all(f.ok for f in evaluate(fixed).findings if f.rule_id in ("L1", "L2"))


# --- resolving --------------------------------------------------------------------------------


def test_resolve_budget_uses_the_longest_task_timeout_and_derives_the_rest() -> None:
    tasks = (TaskTiming("a", 10.0), TaskTiming("b", None), TaskTiming("c", 900.0, max_countdown=60))
    budget = resolve_budget(make(grace_period=40, prestop_delay=5, max_countdown=30), tasks)
    assert budget.drain_window == 30
    assert budget.job_timeout == 300
    assert budget.longest_job_timeout == 900
    assert budget.idempotency_in_progress_expiry == 930
    assert budget.max_countdown == 30
    assert budget.longest_countdown == 60
    assert budget.task_timeout(tasks[1]) == 300
    assert budget.task_countdown(tasks[0]) == 30
    assert budget.unacked_horizon == 60 + 900 + 30 + 5
    assert budget.task_countdown(tasks[2]) == 60
    assert budget.symbols()["J"] == 900
    assert budget.symbols()["C"] == 60


def test_resolve_budget_without_tasks_uses_job_timeout() -> None:
    budget = resolve_budget(make(job_timeout=42))
    assert budget.longest_job_timeout == 42
    assert budget.idempotency_in_progress_expiry == 72


def test_resolve_budget_applies_engine_defaults() -> None:
    assert resolve_budget(make(engine="sql")).visibility_timeout == 30
    assert resolve_budget(make(engine="rq")).heartbeat_interval == 10
    celery = resolve_budget(make(engine="celery"))
    assert celery.visibility_timeout == 3600
    assert not celery.lease_extendable


def test_explicit_in_progress_expiry_is_kept() -> None:
    assert resolve_budget(make(idempotency_in_progress_expiry=77)).symbols()["Ip"] == 77


def test_unknown_engine_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="engine"):
        resolve_budget(dataclasses.replace(Settings(), engine="kafka"))


@pytest.mark.parametrize("timeout", [0.0, -1.0, math.inf, math.nan])
def test_task_timing_refuses_impossible_timeouts(timeout: float) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        TaskTiming("bad", timeout)


def test_task_timing_refuses_negative_countdowns() -> None:
    with pytest.raises(ConfigurationError, match="max_countdown"):
        TaskTiming("bad", None, max_countdown=-1)


@pytest.mark.parametrize(
    ("value", "text"),
    [(30.0, "30"), (2.5, "2.5"), (1 / 3, "0.333"), (0.0, "0"), (86400.0, "86400")],
)
def test_format_seconds(value: float, text: str) -> None:
    assert format_seconds(value) == text


# --- properties ---------------------------------------------------------------------------------

seconds = st.one_of(
    st.integers(min_value=1, max_value=600).map(float),
    st.floats(min_value=0.01, max_value=600, allow_nan=False, allow_infinity=False),
)
long_seconds = st.one_of(
    st.integers(min_value=1, max_value=100_000).map(float),
    st.floats(min_value=0.01, max_value=100_000, allow_nan=False, allow_infinity=False),
)
# The settings' own lower bounds: a lease of at least 1 s, a heartbeat of at least 0.1 s.
lease_seconds = st.one_of(
    st.integers(min_value=1, max_value=100_000).map(float),
    st.floats(min_value=1, max_value=100_000, allow_nan=False, allow_infinity=False),
)
heartbeat_seconds = st.one_of(
    st.integers(min_value=1, max_value=600).map(float),
    st.floats(min_value=0.1, max_value=600, allow_nan=False, allow_infinity=False),
)


@st.composite
def settings_strategy(draw: st.DrawFn) -> Settings:
    return Settings(
        engine=draw(st.sampled_from(ENGINES)),
        grace_period=draw(seconds),
        prestop_delay=draw(st.one_of(st.just(0.0), seconds)),
        release_margin=draw(seconds),
        job_timeout=draw(long_seconds),
        visibility_timeout=draw(st.one_of(st.none(), lease_seconds)),
        heartbeat_interval=draw(st.one_of(st.none(), heartbeat_seconds)),
        checkpoint_interval=draw(seconds),
        idempotency_in_progress_expiry=draw(st.one_of(st.none(), long_seconds)),
        idempotency_retention=draw(st.one_of(st.just(86400.0), long_seconds)),
        max_countdown=draw(st.one_of(st.just(0.0), long_seconds)),
        scheduler_lease_duration=draw(seconds),
        scheduler_renew_deadline=draw(seconds),
        scheduler_retry_period=draw(seconds),
        scheduler_standby_delay=draw(st.one_of(st.just(0.0), seconds)),
        scheduler_misfire_grace=draw(seconds),
        replicas=draw(st.integers(min_value=1, max_value=4)),
        database_url=draw(st.sampled_from(["sqlite:///q.db", "postgresql+psycopg://db/q"])),
        strict=draw(st.booleans()),
    )


tasks_strategy = st.lists(
    st.builds(
        TaskTiming,
        name=st.text("abcdefgh_", min_size=1, max_size=12),
        timeout=st.one_of(st.none(), long_seconds),
        idempotent=st.booleans(),
        checkpointed=st.booleans(),
        max_countdown=st.one_of(st.just(0.0), long_seconds),
    ),
    max_size=4,
    unique_by=lambda t: t.name,
).map(tuple)

celery_strategy = st.one_of(
    st.none(),
    st.builds(
        CeleryFacts,
        acks_late=st.one_of(st.none(), st.booleans()),
        reject_on_worker_lost=st.one_of(st.none(), st.booleans()),
        prefetch_multiplier=st.one_of(st.none(), st.integers(min_value=0, max_value=8)),
        soft_time_limit=st.one_of(st.none(), long_seconds),
        time_limit=st.one_of(st.none(), long_seconds),
        visibility_timeout=st.one_of(st.none(), long_seconds),
    ),
)

fast = hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _budget_holds(b: Budget) -> None:
    assert b.prestop_delay + b.drain_window + b.release_margin <= b.grace_period + 1e-9
    assert b.drain_window > 0
    assert b.prestop_delay < b.grace_period
    assert b.checkpoint_interval <= b.drain_window / 2
    assert b.longest_job_timeout < b.idempotency_in_progress_expiry
    assert b.idempotency_retention > max(b.visibility_timeout, b.idempotency_in_progress_expiry)
    assert b.leader_lease > b.renew_deadline > 1.2 * b.retry_period


@fast
@given(settings_strategy(), tasks_strategy, celery_strategy)
def test_no_error_means_the_budget_holds(
    settings: Settings, tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    report = evaluate(settings, tasks, celery)
    if report.errors:
        return
    b = report.budget
    _budget_holds(b)
    if b.engine == "celery":
        assert b.visibility_timeout > b.longest_job_timeout + b.drain_window + b.release_margin
        assert b.visibility_timeout > b.unacked_horizon
    else:
        assert b.heartbeat_interval < b.visibility_timeout / 2
    if b.engine == "sql" and settings.database_url.startswith("sqlite"):
        assert settings.replicas == 1
    if settings.strict:
        assert report.failed == ()
        for task in tasks:
            assert b.task_timeout(task) <= b.drain_window or task.idempotent or task.checkpointed


@fast
@given(settings_strategy(), tasks_strategy, celery_strategy)
def test_every_failure_names_its_settings_and_its_fix_fixes_it(
    settings: Settings, tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    report = evaluate(settings, tasks, celery)
    for finding in report.failed:
        assert_well_formed_failure(finding)
        if finding.fix_values:
            assert_fix_fixes(settings, tasks, celery, finding)


@fast
@given(settings_strategy(), tasks_strategy, celery_strategy)
def test_errors_and_warnings_split_the_failures(
    settings: Settings, tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    report = evaluate(settings, tasks, celery)
    assert set(report.errors) | set(report.warnings) == set(report.failed)
    assert not set(report.errors) & set(report.warnings)
    assert report.ok == (not report.errors)
    if report.strict:
        assert report.warnings == ()
    assert {f.rule_id for f in report.findings} <= set(RULE_IDS)
    assert all(f.message for f in report.findings)
    assert all(report.budget.engine in RULE_BY_ID[f.rule_id].engines for f in report.findings)


@fast
@given(settings_strategy(), tasks_strategy)
def test_resolved_budget_matches_the_definitions(
    settings: Settings, tasks: tuple[TaskTiming, ...]
) -> None:
    b = resolve_budget(settings, tasks)
    assert (
        b.drain_window == settings.grace_period - settings.prestop_delay - settings.release_margin
    )
    timeouts = [t.timeout if t.timeout is not None else settings.job_timeout for t in tasks]
    assert b.longest_job_timeout == (max(timeouts) if timeouts else settings.job_timeout)
    assert all(b.task_timeout(t) <= b.longest_job_timeout for t in tasks)
    assert b.visibility_timeout == settings.effective_visibility_timeout
    assert b.heartbeat_interval == settings.effective_heartbeat_interval
    assert b.unacked_horizon >= b.run_horizon


@fast
@given(settings_strategy(), tasks_strategy, celery_strategy)
def test_following_the_suggested_fixes_reaches_a_valid_budget(
    settings: Settings, tasks: tuple[TaskTiming, ...], celery: CeleryFacts | None
) -> None:
    # What an operator does with `workerkit check`: apply what it says until it says nothing.
    settings = settings.replace(strict=True)
    for _ in range(len(RULES) * 3):
        report = evaluate(settings, tasks, celery)
        if report.ok:
            break
        finding = report.errors[0]
        if not finding.fix_values:  # only T1 can ask for a code change (checkpoint the task)
            pytest.fail(f"no fix values: {finding}")
        settings, celery = apply_fix(settings, celery, finding)
    else:
        pytest.fail(f"fixes did not converge: {[f.message for f in report.errors]}")
    _budget_holds(report.budget)
