"""Rendering the timing budget: a timeline and a table for people, stable JSON for machines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from workerkit.settings import ENGINES, Settings
from workerkit.timing import (
    JSON_SCHEMA_VERSION,
    RULES,
    CeleryFacts,
    TaskTiming,
    evaluate,
    render_json,
    render_text,
)

pytestmark = pytest.mark.unit


def make(**changes: object) -> Settings:
    return Settings().replace(**changes)


def line_with(text: str, needle: str) -> str:
    lines = [line for line in text.splitlines() if needle in line]
    assert lines, (needle, text)
    return lines[0]


# --- text -------------------------------------------------------------------------------------


def label_columns(text: str) -> dict[str, int]:
    """Each timeline label ("SIGTERM t=0") and the column it starts at."""
    columns: dict[str, int] = {}
    for line in text.splitlines()[2:]:
        if "shutdown" in line:
            break
        for name in ("preStop", "SIGTERM", "release", "SIGKILL"):
            if name in line:
                columns[line[line.index(name) :].split("  ")[0].strip()] = line.index(name)
    return dict(sorted(columns.items(), key=lambda item: item[1]))


def test_defaults_show_the_shutdown_timeline() -> None:
    text = render_text(evaluate(make()))
    bar = line_with(text, "shutdown")
    assert "drain D=25" in bar
    assert "M=5" in bar
    labels = label_columns(text)
    assert list(labels) == ["SIGTERM t=0", "release t=25", "SIGKILL t=30"]
    # each '|' of the bar sits under its label: SIGTERM, the drain deadline, SIGKILL
    assert [i for i, ch in enumerate(bar) if ch == "|"] == list(labels.values())


def test_defaults_draw_job_timeout_clipped_with_an_arrow_and_the_number() -> None:
    text = render_text(evaluate(make()))
    row = line_with(text, "job_timeout  ")
    assert ">> J=300 s" in row


def test_each_task_gets_a_line_with_its_j() -> None:
    tasks = (
        TaskTiming("send_email", 10.0),
        TaskTiming("backfill", 3600.0, checkpointed=True),
        TaskTiming("charge", 120.0, idempotent=True),
        TaskTiming("report", None),
    )
    text = render_text(evaluate(make(), tasks))
    short = line_with(text, "send_email")
    assert ">>" not in short
    assert "J=10 s: fits in D" in short
    assert "=>" in short
    assert ">> J=3600 s: checkpointed" in line_with(text, "backfill")
    assert ">> J=120 s: idempotent" in line_with(text, "charge")
    assert "J=300 s: released at D, re-runs from the start (T1)" in line_with(text, "report ")
    # the short task's bar ends where 10 s falls: a third of the way to G = 30
    bar = line_with(text, "shutdown")
    start = bar.index("|")
    assert short.index(">") - start == round(10 / 30 * 50)


def test_prestop_delay_is_drawn_before_sigterm() -> None:
    text = render_text(evaluate(make(grace_period=60, prestop_delay=10)))
    labels = label_columns(text)
    assert list(labels) == ["preStop t=0", "SIGTERM t=10", "release t=55", "SIGKILL t=60"]
    bar = line_with(text, "shutdown")
    assert "P=10" in bar
    assert [i for i, ch in enumerate(bar) if ch == "|"] == list(labels.values())


def test_the_table_has_every_finding_with_its_status() -> None:
    report = evaluate(make(engine="celery", job_timeout=60, visibility_timeout=30))
    text = render_text(report)
    for finding in report.findings:
        assert f"  {finding.rule_id} " in text
    v1 = line_with(text, "  V1 ")
    assert "ERROR" in v1
    assert "visibility_timeout" in v1
    assert "WARN" in line_with(text, "  I2 ")
    assert "ok" in line_with(text, "  G1 ")
    assert "91 (WORKERKIT_VISIBILITY_TIMEOUT=91)" in " ".join(text.split())
    assert text.rstrip().endswith("workerkit refuses to start with this budget")
    assert "FAILED: 1 error, 1 warning" in text


def test_summary_for_a_clean_budget() -> None:
    assert render_text(evaluate(make())).rstrip().splitlines()[-1] == "OK: 0 errors, 0 warnings"


def test_summary_with_warnings() -> None:
    text = render_text(evaluate(make(), (TaskTiming("long", 600.0),)))
    assert text.rstrip().splitlines()[-1] == "OK with warnings: 0 errors, 1 warning"


def test_strict_shows_warnings_as_errors() -> None:
    report = evaluate(make(strict=True), (TaskTiming("long", 600.0),))
    text = render_text(report)
    assert "ERROR" in line_with(text, "  T1 ")
    assert "strict" in text.splitlines()[0]
    assert "strict: warnings count as errors" in text


def test_table_lines_fit_in_a_terminal() -> None:
    report = evaluate(make(engine="celery", job_timeout=60, visibility_timeout=30))
    text = render_text(report)
    table = text[text.index("  rule  status") :]
    assert all(len(line) <= 100 for line in table.splitlines())


def test_color_only_when_asked() -> None:
    report = evaluate(make(engine="celery", job_timeout=60, visibility_timeout=30))
    assert "\033[" not in render_text(report)
    colored = render_text(report, color=True)
    assert "\033[31mERROR" in colored
    assert "\033[0m" in colored


@pytest.mark.parametrize(
    "changes",
    [
        {"grace_period": 10, "prestop_delay": 10},
        {"grace_period": 10, "prestop_delay": 30},
        {"grace_period": 5, "release_margin": 5},
        {"grace_period": 0.01, "release_margin": 0.001},
    ],
)
def test_broken_budgets_still_render(changes: dict[str, object]) -> None:
    text = render_text(evaluate(make(**changes)))
    assert "SIGKILL" in text
    assert "FAILED" in text


def test_headline_names_the_engine() -> None:
    for engine in ENGINES:
        assert f"engine {engine}" in render_text(evaluate(make(engine=engine))).splitlines()[0]


def test_heartbeat_is_not_shown_for_celery() -> None:
    assert "heartbeat_interval" not in render_text(evaluate(make(engine="celery")))
    assert "heartbeat_interval" in render_text(evaluate(make(engine="sql")))


def test_the_docs_show_the_real_output_for_defaults() -> None:
    doc = Path(__file__).parents[2] / "docs" / "concepts" / "timing-budget.md"
    text = doc.read_text(encoding="utf-8")
    marker = "<!-- sample: defaults"
    sample = text[text.index(marker) :].split("```text\n", 1)[1].split("```", 1)[0]
    assert sample == render_text(evaluate(Settings()))


# --- JSON -------------------------------------------------------------------------------------


def test_json_has_a_stable_shape() -> None:
    tasks = (TaskTiming("send_email", 10.0), TaskTiming("report", None))
    report = evaluate(make(engine="celery"), tasks, CeleryFacts(prefetch_multiplier=4))
    data = json.loads(render_json(report))
    assert list(data) == [
        "schema", "ok", "strict", "engine", "errors", "warnings", "budget", "tasks", "findings",
    ]  # fmt: skip
    assert data["schema"] == JSON_SCHEMA_VERSION
    assert data["ok"] is False
    assert data["engine"] == "celery"
    assert data["errors"] == 1
    assert list(data["budget"]) == [
        "G", "P", "M", "D", "J", "V", "H", "F", "Ip", "R", "L", "Rd", "Rp", "Sd", "Mg", "C",
        "job_timeout",
    ]  # fmt: skip
    assert data["budget"]["D"] == 25
    assert data["budget"]["V"] == 3600
    assert [t["name"] for t in data["tasks"]] == ["send_email", "report"]
    assert data["tasks"][1]["J"] == 300
    assert data["tasks"][0]["fits_drain_window"] is True
    c3 = next(f for f in data["findings"] if f["rule_id"] == "C3")
    assert c3["status"] == "error"
    assert c3["fix_values"] == {"celery.prefetch_multiplier": 1}
    assert c3["settings"] == ["worker_prefetch_multiplier"]
    assert set(c3) == {
        "rule_id", "severity", "status", "ok", "title", "message", "settings", "fix",
        "fix_values", "task",
    }  # fmt: skip
    assert [f["rule_id"] for f in data["findings"]] == [f.rule_id for f in report.findings]


def test_json_status_applies_strict_mode() -> None:
    report = evaluate(make(strict=True), (TaskTiming("long", 600.0),))
    data = json.loads(render_json(report))
    t1 = next(f for f in data["findings"] if f["rule_id"] == "T1")
    assert t1["severity"] == "warning"
    assert t1["status"] == "error"
    assert t1["task"] == "long"
    assert data["ok"] is False


# --- properties ---------------------------------------------------------------------------------

seconds = st.floats(min_value=0.01, max_value=5000, allow_nan=False, allow_infinity=False)


@st.composite
def reports(draw: st.DrawFn) -> tuple[Settings, tuple[TaskTiming, ...]]:
    settings = Settings(
        engine=draw(st.sampled_from(ENGINES)),
        grace_period=draw(seconds),
        prestop_delay=draw(st.one_of(st.just(0.0), seconds)),
        release_margin=draw(seconds),
        job_timeout=draw(seconds),
        visibility_timeout=draw(st.one_of(st.none(), seconds)),
        checkpoint_interval=draw(seconds),
        strict=draw(st.booleans()),
    )
    tasks = draw(
        st.lists(
            st.builds(
                TaskTiming,
                name=st.text(min_size=1, max_size=40),
                timeout=st.one_of(st.none(), seconds),
                idempotent=st.booleans(),
                checkpointed=st.booleans(),
            ),
            max_size=3,
        )
    )
    return settings, tuple(tasks)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reports())
def test_any_report_renders_and_round_trips(case: tuple[Settings, tuple[TaskTiming, ...]]) -> None:
    settings, tasks = case
    report = evaluate(settings, tasks)
    text = render_text(report)
    assert "SIGKILL" in text
    assert ("FAILED" in text) == (not report.ok)
    data = json.loads(render_json(report))
    assert data["ok"] == report.ok
    assert len(data["findings"]) == len(report.findings)
    assert data["budget"]["G"] == settings.grace_period
    assert {f["rule_id"] for f in data["findings"]} <= {r.rule_id for r in RULES}
