"""The benchmark figures the docs quote are the recorded ones (tests/docs/figures.py)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tests.docs.blocks import DOCUMENTS, ROOT
from tests.docs.figures import Figure, figures_of, recorded, shown_matches

FIGURES = [figure for page in DOCUMENTS for figure in figures_of(page)]


@pytest.mark.parametrize("figure", FIGURES, ids=[f.where for f in FIGURES])
def test_a_figure_is_the_recorded_value(figure: Figure) -> None:
    assert (ROOT / figure.source).is_file(), f"{figure.where}: no result file {figure.source}"
    assert figure.source.startswith("bench/results/"), figure.source
    value = recorded(figure)
    assert shown_matches(figure.shown, value), (
        f"{figure.where}: the prose says {figure.shown}, {figure.source}#{figure.key} "
        f"records {value}"
    )


def test_the_pages_that_quote_benchmarks_mark_their_figures() -> None:
    marked = {f.page.relative_to(ROOT).as_posix() for f in FIGURES}
    assert {"docs/engines/sql.md", "docs/engines/rq.md"} <= marked


def test_a_stale_figure_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "idle exit 275<!-- figure: bench/results/supervisor.json"
        "#summary.workerkit.sigterm_to_exit.median*1000 --> ms, and 59.7"
        "<!-- figure: bench/results/supervisor.json"
        "#summary.workerkit.sigterm_to_exit.median*1000 --> ms; SimpleWorker +11.3 %"
        "<!-- figure: bench/results/rq_overhead.md#`workerkit.engines.rq.SimpleWorker`/overhead -->"
    )
    stale, current, table = figures_of(page)
    assert (stale.shown, current.shown, table.shown) == ("275", "59.7", "+11.3")
    assert not shown_matches(stale.shown, recorded(stale))
    assert shown_matches(current.shown, recorded(current))
    assert recorded(table) == Decimal("11.3")
    assert shown_matches("60", Decimal("59.7"))
    assert not shown_matches("59.6", Decimal("59.7"))
