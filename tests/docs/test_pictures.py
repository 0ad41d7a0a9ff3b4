"""The docs' pictures are what the code draws today: a stale one fails.

docs/pictures/ holds ``workerkit check --format svg`` for the defaults and for the broken Celery
budget of docs/concepts/timing-budget.md, and the supervisor's lifecycle as its state machine
behaves (tests/docs/lifecycle_diagram.py). After a deliberate change of the rules or the
drawing, rewrite them with ``GOLDEN_UPDATE=1 pytest tests/docs/test_pictures.py`` and look at
the diff (and the pictures).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.docs.lifecycle_diagram import draw, table, transitions
from workerkit.cli import main
from workerkit.settings import ENV_PREFIX

ROOT = Path(__file__).resolve().parents[2]
PICTURES = ROOT / "docs" / "pictures"
UPDATE = os.environ.get("GOLDEN_UPDATE") == "1"

BUDGETS = {
    "budget-defaults.svg": ((), 0),
    "budget-broken.svg": (
        ("--engine", "celery", "--job-timeout", "60", "--visibility-timeout", "30"),
        1,
    ),
}


def check_or_update(path: Path, drawn: str) -> None:
    if UPDATE:
        path.write_text(drawn, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == drawn, f"{path.name} is stale: GOLDEN_UPDATE=1"


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_the_budget_pictures_are_what_check_draws(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no workerkit.toml or pyproject.toml to find
    args, exit_code = BUDGETS[name]
    cleared: dict[str, str | None] = {k: None for k in os.environ if k.startswith(ENV_PREFIX)}
    result = CliRunner().invoke(main, ["check", "--format", "svg", *args], env=cleared)
    assert result.exit_code == exit_code, result.output
    check_or_update(PICTURES / name, result.stdout)


def test_every_picture_is_generated_and_shown() -> None:
    shown = "".join(page.read_text(encoding="utf-8") for page in (ROOT / "docs").rglob("*.md"))
    pictures = {path.name for path in PICTURES.iterdir()}
    assert pictures == set(BUDGETS) | GENERATED_ELSEWHERE
    assert [name for name in sorted(pictures) if f"pictures/{name})" not in shown] == []


GENERATED_ELSEWHERE = {"lifecycle.svg"}


LIFECYCLE_PAGE = ROOT / "docs" / "operations" / "lifecycle.md"
TABLE_BEGIN = "<!-- generated: lifecycle transitions (tests/docs/test_pictures.py) -->\n"
TABLE_END = "<!-- end of generated lifecycle transitions -->\n"


def test_the_lifecycle_picture_and_its_table_are_what_the_state_machine_does() -> None:
    edges = transitions()
    check_or_update(PICTURES / "lifecycle.svg", draw(edges))
    page = LIFECYCLE_PAGE.read_text(encoding="utf-8")
    before, rest = page.split(TABLE_BEGIN)
    _, after = rest.split(TABLE_END)
    wanted = f"{before}{TABLE_BEGIN}\n{table(edges)}\n{TABLE_END}{after}"
    check_or_update(LIFECYCLE_PAGE, wanted)
