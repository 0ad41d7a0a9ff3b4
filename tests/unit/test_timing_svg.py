"""``workerkit check --format svg``: the timeline as a picture, from the budget and the rules."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from workerkit.cli import main
from workerkit.settings import Settings
from workerkit.timing import RULES, TaskTiming, evaluate
from workerkit.timing.svg import render_svg

pytestmark = pytest.mark.unit

SVG = "{http://www.w3.org/2000/svg}"


def make(**changes: object) -> Settings:
    return Settings().replace(**changes)


def picture(settings: Settings, tasks: tuple[TaskTiming, ...] = ()) -> ET.Element:
    return ET.fromstring(  # noqa: S314 (our own output)
        render_svg(evaluate(settings, tasks))
    )


def rects(root: ET.Element, kind: str) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if kind in r.get("class", "").split()]


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_the_defaults_draw_the_drain_window_and_the_margin_to_scale() -> None:
    root = picture(make())
    drain, margin = rects(root, "drain")[0], rects(root, "margin")[0]
    assert rects(root, "prestop") == []
    d_width, m_width = float(drain.get("width", 0)), float(margin.get("width", 0))
    assert d_width / m_width == pytest.approx(25 / 5, rel=0.02)
    labels = texts(root)
    for mark in ("SIGTERM t=0", "stop_requested t=25", "release t=27.5", "kill t=29"):
        assert mark in labels
    assert "SIGKILL t=30" in labels
    assert "OK: 0 errors, 0 warnings" in labels


def test_a_prestop_hook_comes_before_sigterm() -> None:
    root = picture(make(grace_period=60, prestop_delay=10))
    prestop, drain = rects(root, "prestop")[0], rects(root, "drain")[0]
    assert float(prestop.get("x", 0)) < float(drain.get("x", 0))
    assert {"preStop t=0", "SIGTERM t=10", "stop_requested t=55"} <= set(texts(root))


def test_each_task_gets_a_bar_and_its_verdict() -> None:
    tasks = (TaskTiming("send_email", 10.0), TaskTiming("report", None))
    root = picture(make(), tasks)
    short, long_ = rects(root, "task")
    assert float(short.get("width", 0)) < float(long_.get("width", 0))
    assert "J=10 s: fits in D" in texts(root)
    assert "J=300 s: released at D, re-runs from the start (T1)" in texts(root)


def test_every_rule_has_a_chip_coloured_by_its_verdict() -> None:
    report = evaluate(make(engine="celery", job_timeout=60, visibility_timeout=30))
    root = ET.fromstring(  # noqa: S314 (our own output)
        render_svg(report)
    )
    chips = rects(root, "rule")
    assert len(chips) == len(report.findings)
    assert len(rects(root, "error")) == len(report.errors)
    assert len(rects(root, "warning")) == len(report.warnings)
    assert any(line.startswith("V1 ERROR: visibility_timeout") for line in texts(root))
    assert any(line.startswith("FAILED: 1 error") for line in texts(root))


def test_the_picture_changes_with_the_values_and_the_rules() -> None:
    assert render_svg(evaluate(make())) != render_svg(evaluate(make(release_margin=10)))
    assert len(rects(picture(make()), "rule")) <= len(RULES)


def test_a_grace_period_too_short_for_a_timeline_still_renders() -> None:
    root = picture(make(grace_period=0.01, release_margin=0.001))
    assert root.tag == f"{SVG}svg"


def test_check_format_svg_prints_the_picture_and_exits_like_the_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no workerkit.toml or pyproject.toml to find
    ok = CliRunner().invoke(main, ["check", "--format", "svg"], env={"WORKERKIT_CONFIG": None})
    assert ok.exit_code == 0, ok.output
    assert (
        ET.fromstring(  # noqa: S314 (our own output)
            ok.stdout
        ).tag
        == f"{SVG}svg"
    )
    broken = CliRunner().invoke(
        main, ["check", "--format", "svg", "--grace-period", "10", "--prestop-delay", "10"]
    )
    assert broken.exit_code == 1
    assert "FAILED" in broken.stdout
