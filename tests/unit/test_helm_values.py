"""``workerkit check --format helm-values``: the chart's timing block for a budget."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from click.testing import CliRunner

from workerkit import Settings
from workerkit.cli import main
from workerkit.settings import setting_specs
from workerkit.timing import evaluate
from workerkit.timing.helm_values import (
    CHART_SCHEDULER_KEYS,
    CHART_TIMING_KEYS,
    chart_values,
    render_helm_values,
)

if TYPE_CHECKING:
    import pytest

VALUES_YAML = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "workerkit" / "values.yaml"


def test_the_key_maps_name_settings_and_the_charts_timing_block() -> None:
    names = {spec.name for spec in setting_specs()}
    assert set(CHART_TIMING_KEYS.values()) <= names
    assert set(CHART_SCHEDULER_KEYS.values()) <= names
    chart = yaml.safe_load(VALUES_YAML.read_text())
    assert list(chart["timing"]) == list(CHART_TIMING_KEYS)


def test_the_charts_defaults_are_workerkits() -> None:
    chart = yaml.safe_load(VALUES_YAML.read_text())["timing"]
    defaults = Settings()
    for key, name in CHART_TIMING_KEYS.items():
        assert chart[key] == getattr(defaults, name), key


def test_defaults_print_an_empty_block_after_the_verdicts() -> None:
    settings = Settings()
    out = render_helm_values(evaluate(settings), settings)
    comment, block = out.split("\n", 1)
    assert comment.startswith(
        "# workerkit check --engine sql -- errors: none; warnings: none; ok: G1 G2"
    )
    assert yaml.safe_load(block) == {"timing": {}}


def test_only_values_that_differ_are_printed_and_they_round_trip() -> None:
    settings = Settings(
        engine="celery",
        grace_period=90,
        prestop_delay=5,
        job_timeout=1200,
        visibility_timeout=7200,
        max_countdown=600,
        release_margin=5,  # the default: not printed
        scheduler_lease_duration=30,
        scheduler_namespace="proj",
    )
    report = evaluate(settings)
    out = yaml.safe_load(render_helm_values(report, settings))
    assert out == {
        "timing": {
            "gracePeriod": 90,
            "prestopDelay": 5,
            "jobTimeout": 1200,
            "visibilityTimeout": 7200,
            "maxCountdown": 600,
        },
        "scheduler": {"timing": {"leaseDuration": 30, "namespace": "proj"}},
    }
    back = {CHART_TIMING_KEYS[k]: v for k, v in out["timing"].items()}
    back |= {CHART_SCHEDULER_KEYS[k]: v for k, v in out["scheduler"]["timing"].items()}
    assert Settings(engine="celery", **back) == settings


def test_the_verdicts_name_every_rule_once_errors_first() -> None:
    settings = Settings(grace_period=10, prestop_delay=10)
    report = evaluate(settings)
    comment = render_helm_values(report, settings).splitlines()[0]
    assert comment == (
        "# workerkit check --engine sql -- errors: G1 G2 F1; warnings: G3 L4; "
        "ok: T1 H1 H2 I1 I3 L1 L2 L3 S1"
    )
    strict = Settings(grace_period=8, strict=True)
    comment = render_helm_values(evaluate(strict), strict).splitlines()[0]
    assert comment.startswith(
        "# workerkit check --engine sql --strict -- errors: G3 F1; warnings: none"
    )


def test_fractional_grace_is_flagged_for_the_chart() -> None:
    settings = Settings(grace_period=30.5, prestop_delay=2.5)
    lines = render_helm_values(evaluate(settings), settings).splitlines()
    assert lines[1] == (
        "# the chart takes gracePeriod and prestopDelay in whole seconds, as Kubernetes does: "
        "round up (gracePeriod: 31, prestopDelay: 3) and check again"
    )
    assert yaml.safe_load("\n".join(lines))["timing"] == {"gracePeriod": 30.5, "prestopDelay": 2.5}


def test_chart_values_skips_unset_optional_values() -> None:
    assert chart_values(Settings(), CHART_TIMING_KEYS) == {}
    assert chart_values(Settings(heartbeat_interval=4), CHART_TIMING_KEYS) == {
        "heartbeatInterval": 4
    }


def test_the_command_exits_as_check_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no workerkit.toml or pyproject.toml to find
    for var in [v for v in os.environ if v.startswith("WORKERKIT_")]:
        monkeypatch.delenv(var)
    runner = CliRunner()
    good = runner.invoke(main, ["check", "--format", "helm-values", "--grace-period", "60"])
    bad = runner.invoke(
        main, ["check", "--format", "helm-values", "--engine", "rq", "--grace-period", "5"]
    )
    assert good.exit_code == 0
    assert yaml.safe_load(good.stdout) == {"timing": {"gracePeriod": 60}}
    assert bad.exit_code == 1
    assert bad.stdout.startswith("# workerkit check --engine rq -- errors: G1 F1;")
