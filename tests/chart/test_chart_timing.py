"""The chart's timing rules are workerkit's: the same rule ids fail for the same budget.

For each documented bad combination (the broken budgets of docs/concepts/timing-budget.md, as
tests/unit/test_check_golden.py runs them) and for random budgets, the set of rule ids that make
the render fail equals the set of errors of ``workerkit.timing.evaluate`` on the settings built
from the same values; a render that passes has the same warnings (NOTES.txt) as workerkit.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.helm import (
    CHART_DIR,
    container_env,
    deployments,
    failed_rule_ids,
    render,
    render_error,
    render_manifests,
    settings_for,
)
from workerkit.settings import load_settings
from workerkit.timing import RULES, Budget, evaluate, resolve_budget
from workerkit.timing.helm_values import CHART_SCHEDULER_KEYS, CHART_TIMING_KEYS

#: Rules the chart cannot judge from values: the app's tasks (T1), the Celery app's own
#: configuration (C1-C6), the database URL, which is in a Secret (S1).
NOT_IN_CHART = {"T1", "S1", "C1", "C2", "C3", "C4", "C5", "C6"}
CHART_RULES = {r.rule_id for r in RULES} - NOT_IN_CHART
TITLES = {r.rule_id: r.title for r in RULES}
_WARNING_LINE = re.compile(r"timing rule \[([A-Z][0-9])\] warns: ")
#: What the container's secretKeyRefs read.
SECRETS = {
    "database-url": "postgresql+psycopg://u@db.example/jobs",
    "redis-url": "redis://redis.example:6379/0",
}


def _values(engine: str, timing: dict[str, Any], *, scheduler: bool = False) -> dict[str, Any]:
    if scheduler:
        return {
            "workers": {"default": None},
            "scheduler": {"enabled": True, "engine": engine, "app": "p:a", "timing": timing},
        }
    return {"workers": {"default": {"engine": engine, "app": "p:a", "timing": timing}}}


def _outcome(values: dict[str, Any]) -> tuple[set[str], set[str], str]:
    """(failing ids, warning ids, fail message) of one render."""
    try:
        manifests = render_manifests(values)
    except Exception as exc:  # the render's fail
        message = str(exc)
        return failed_rule_ids(message), set(), message
    notes = manifests.get("workerkit/templates/NOTES.txt", "")
    return set(), set(_WARNING_LINE.findall(notes)), ""


def _rendered_budget(values: dict[str, Any], *, scheduler: bool) -> Budget:
    """The budget the rendered container resolves: its args and env, read by load_settings."""
    objects = render(values)
    deployment = deployments(objects)["scheduler" if scheduler else "worker-default"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    env = container_env(deployment, SECRETS)
    workerkit_env = {k: v for k, v in env.items() if k.startswith("WORKERKIT_")}
    loaded = load_settings({"engine": args[1], "app": args[3]}, env=workerkit_env, cwd=CHART_DIR)
    return resolve_budget(loaded)


def _workerkit(values: dict[str, Any], *, scheduler: bool) -> tuple[set[str], set[str]]:
    report = evaluate(settings_for(values, None if scheduler else "default"))
    return {f.rule_id for f in report.errors}, {f.rule_id for f in report.warnings}


def _assert_same(values: dict[str, Any], *, scheduler: bool = False) -> set[str]:
    chart_errors, chart_warnings, message = _outcome(values)
    errors, warnings = _workerkit(values, scheduler=scheduler)
    assert errors <= CHART_RULES
    assert chart_errors == errors, (values, message)
    if not errors:
        assert chart_warnings == warnings & CHART_RULES, values
    return chart_errors


#: (rule, engine, timing values, scheduler?): each documented bad combination the chart checks.
#: Warnings are made errors with strict, as the worker then refuses them too.
DOCUMENTED = [
    ("G1", "sql", {"gracePeriod": 10, "prestopDelay": 10}, False),
    ("G2", "sql", {"gracePeriod": 10, "prestopDelay": 30}, False),
    ("G3", "sql", {"gracePeriod": 8, "strict": True}, False),
    ("F1", "sql", {"checkpointInterval": 20}, False),
    ("F1", "rq", {"gracePeriod": 8, "checkpointInterval": 5}, False),
    ("V1", "celery", {"jobTimeout": 60, "visibilityTimeout": 30}, False),
    ("V1", "celery", {"visibilityTimeout": 200}, False),
    ("V2", "celery", {"maxCountdown": 4000}, False),
    ("V3", "celery", {"visibilityTimeout": 100000, "strict": True}, False),
    ("H1", "rq", {"heartbeatInterval": 12, "strict": True}, False),
    ("H2", "sql", {"heartbeatInterval": 20, "visibilityTimeout": 30}, False),
    ("H2", "rq", {"heartbeatInterval": 1, "visibilityTimeout": 1}, False),
    ("I1", "sql", {"idempotencyInProgressExpiry": 100, "idempotencyRetention": 200}, False),
    (
        "I2",
        "celery",
        {"visibilityTimeout": 310, "idempotencyInProgressExpiry": 400, "strict": True},
        False,
    ),
    (
        "I2",
        "celery",
        {"visibilityTimeout": 400, "idempotencyInProgressExpiry": 500, "strict": True},
        False,
    ),
    ("I3", "sql", {"idempotencyRetention": 300}, False),
    ("L1", "sql", {"leaseDuration": 10, "renewDeadline": 10, "retryPeriod": 9}, True),
    ("L2", "rq", {"renewDeadline": 1, "retryPeriod": 1}, True),
    ("L3", "celery", {"standbyDelay": 3, "misfireGrace": 2}, True),
    ("L4", "sql", {"gracePeriod": 6, "releaseMargin": 1, "retryPeriod": 6, "strict": True}, True),
    (
        "L4",
        "rq",
        {"gracePeriod": 2, "releaseMargin": 1, "checkpointInterval": 0.5, "strict": True},
        False,
    ),
]


def test_every_rule_the_chart_checks_has_a_documented_case() -> None:
    assert {case[0] for case in DOCUMENTED} == CHART_RULES


@pytest.mark.parametrize(
    ("rule", "engine", "timing", "scheduler"),
    DOCUMENTED,
    ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(DOCUMENTED)],
)
def test_documented_bad_combination_fails_with_workerkits_rule(
    rule: str, engine: str, timing: dict[str, Any], scheduler: bool
) -> None:
    values = _values(engine, timing, scheduler=scheduler)
    failed = _assert_same(values, scheduler=scheduler)
    assert rule in failed
    message = render_error(values)
    where = "scheduler" if scheduler else "workers.default"
    line = next(line for line in message.splitlines() if f"[{rule}]" in line)
    assert f"{where}: timing rule [{rule}] failed: {TITLES[rule]} (" in line
    assert line.endswith(f"Run `workerkit check --engine {engine}` with these values for the fix.")


def test_the_failure_names_every_failing_rule_with_workerkits_title() -> None:
    message = render_error(_values("sql", {"gracePeriod": 10, "prestopDelay": 10}))
    found = re.findall(r"timing rule \[([A-Z][0-9])\] failed: (.*?) \(", message)
    assert found
    for rule_id, title in found:
        assert title == TITLES[rule_id]


def test_the_failure_shows_the_values_as_workerkit_does() -> None:
    timing = {"jobTimeout": 0.5, "idempotencyRetention": 1, "visibilityTimeout": 13}
    message = render_error(_values("sql", timing))
    assert "[I3] failed: R > max(V, Ip) (R=1, V=13, Ip=30.5)." in message
    message = render_error(_values("rq", {"heartbeatInterval": 6.25, "visibilityTimeout": 10}))
    assert "[H2] failed: H < V / 2 (extendable leases) (H=6.25, V=10)." in message


def test_warnings_do_not_fail_unless_strict() -> None:
    timing = {"gracePeriod": 8, "checkpointInterval": 1}  # D = 3: G3 warns
    errors, warnings, _ = _outcome(_values("sql", timing))
    assert (errors, warnings) == (set(), {"G3"})
    errors, _, _ = _outcome(_values("sql", {**timing, "strict": True}))
    assert errors == {"G3"}


def test_the_defaults_pass_on_every_engine() -> None:
    for engine in ("sql", "rq", "celery"):
        assert _assert_same(_values(engine, {})) == set()
        assert _assert_same(_values(engine, {}, scheduler=True), scheduler=True) == set()


#: (engine, timing values, scheduler?, rule, holds?): each rule exactly on its bound.
BOUNDARIES = [
    ("sql", {"gracePeriod": 5, "releaseMargin": 5}, False, "G1", False),  # D = 0
    ("sql", {"gracePeriod": 10, "prestopDelay": 10, "releaseMargin": 1}, False, "G2", False),
    ("sql", {"gracePeriod": 10, "checkpointInterval": 2.5}, False, "G3", True),  # D = 5
    ("sql", {"gracePeriod": 15, "checkpointInterval": 5}, False, "F1", True),  # F = D / 2
    ("celery", {"jobTimeout": 70, "visibilityTimeout": 100}, False, "V1", False),  # V = J+D+M
    ("celery", {"maxCountdown": 10, "visibilityTimeout": 340}, False, "V2", False),
    ("celery", {"maxCountdown": 600, "visibilityTimeout": 3720}, False, "V3", True),  # 4 x 930
    ("rq", {"visibilityTimeout": 30, "heartbeatInterval": 10}, False, "H1", True),  # H = V / 3
    ("sql", {"visibilityTimeout": 30, "heartbeatInterval": 15}, False, "H2", False),  # H = V / 2
    ("sql", {"jobTimeout": 100, "idempotencyInProgressExpiry": 100}, False, "I1", False),
    ("celery", {"visibilityTimeout": 3600, "idempotencyInProgressExpiry": 3600}, False, "I2", True),
    ("sql", {"idempotencyRetention": 330}, False, "I3", False),  # R = Ip = J + 30
    ("sql", {"leaseDuration": 10, "renewDeadline": 10}, True, "L1", False),
    ("sql", {"renewDeadline": 6, "retryPeriod": 5}, True, "L2", False),  # 1.2 x Rp = Rd
    ("rq", {"standbyDelay": 2, "misfireGrace": 2}, True, "L3", False),
    (
        "sql",
        {"gracePeriod": 7, "releaseMargin": 5, "checkpointInterval": 1, "retryPeriod": 6},
        True,
        "L4",
        True,
    ),
]


@pytest.mark.parametrize(
    ("engine", "timing", "scheduler", "rule", "holds"),
    BOUNDARIES,
    ids=[f"{c[3]}-{c[0]}" for c in BOUNDARIES],
)
def test_on_the_bound_the_chart_agrees_with_workerkit(
    engine: str, timing: dict[str, Any], scheduler: bool, rule: str, holds: bool
) -> None:
    values = _values(engine, {**timing, "strict": True}, scheduler=scheduler)
    assert (rule not in _assert_same(values, scheduler=scheduler)) == holds


# --- random budgets ---------------------------------------------------------------------------


#: Whole and half seconds: exact in binary floating point and in sprig's decimal arithmetic.
def _halves(low: float, high: float) -> st.SearchStrategy[float]:
    return st.integers(int(low * 2), int(high * 2)).map(lambda n: n / 2)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


_TIMING = st.fixed_dictionaries(
    {
        "gracePeriod": st.integers(1, 400),
        "prestopDelay": st.one_of(st.just(0), st.integers(0, 60)),
        "releaseMargin": _halves(0.5, 40),
        "jobTimeout": st.one_of(_halves(0.5, 100), st.integers(1, 5000).map(float)),
        "visibilityTimeout": _maybe(st.one_of(_halves(1, 100), st.integers(1, 20000).map(float))),
        "heartbeatInterval": _maybe(_halves(0.5, 200)),
        "checkpointInterval": st.one_of(_halves(0.5, 20), _halves(0.5, 200)),
        "idempotencyInProgressExpiry": _maybe(st.integers(1, 6000).map(float)),
        "idempotencyRetention": st.one_of(
            st.just(86400.0),
            st.integers(1, 20000).map(float),
            st.integers(1_000_000, 9_000_000).map(float),  # Helm's float64 text: 1.2e+06
        ),
        "maxCountdown": st.one_of(st.just(0.0), st.integers(0, 5000).map(float)),
        "strict": st.booleans(),
    }
)
_SCHEDULER = st.fixed_dictionaries(
    {
        "leaseDuration": _halves(0.5, 30),
        "renewDeadline": _halves(0.5, 30),
        "retryPeriod": _halves(0.5, 10),
        "standbyDelay": _halves(0, 5),
        "misfireGrace": _halves(0.5, 5),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    engine=st.sampled_from(["sql", "rq", "celery"]),
    timing=_TIMING,
    scheduler=st.one_of(st.none(), _SCHEDULER),
)
def test_random_budgets_fail_with_the_same_rule_ids(
    engine: str, timing: dict[str, Any], scheduler: dict[str, Any] | None
) -> None:
    """The same failing rules; and a budget that renders is the one workerkit resolves from
    the rendered container's env (every value arrived, none was rounded or reformatted)."""
    timing = {k: v for k, v in timing.items() if v is not None}
    if scheduler is None:
        values = _values(engine, timing)
    else:
        values = _values(engine, {**timing, **scheduler}, scheduler=True)
    on_scheduler = scheduler is not None
    if not _assert_same(values, scheduler=on_scheduler):
        expected = resolve_budget(settings_for(values, None if on_scheduler else "default"))
        assert _rendered_budget(values, scheduler=on_scheduler) == expected, values


# --- one source of truth ----------------------------------------------------------------------


def test_each_timing_value_appears_once_in_values_yaml() -> None:
    text = (CHART_DIR / "values.yaml").read_text()
    for key in [*CHART_TIMING_KEYS, "port", "livenessTimeout", "startupTimeout"]:
        lines = re.findall(rf"^\s*{key}:", text, flags=re.MULTILINE)
        assert len(lines) == 1, key
    for key in CHART_SCHEDULER_KEYS:  # documented for scheduler.timing, never given a value
        assert not re.findall(rf"^\s*{key}:", text, flags=re.MULTILINE), key
    values = yaml.safe_load(text)
    assert values["workers"]["default"]["timing"] == {}
    assert values["scheduler"]["timing"] == {}
    for word in ("terminationGracePeriodSeconds", "WORKERKIT_"):
        assert not re.findall(rf"^\s*{word}", text, flags=re.MULTILINE)
