"""workerkit.timing.deadlines: where the drain window D and release margin M put each step."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workerkit.timing.deadlines import KILL_FRACTION, RELEASE_FRACTION, Deadlines


def test_the_steps_follow_the_documented_fractions_of_the_margin() -> None:
    deadlines = Deadlines.after(100.0, drain_window=4.0, release_margin=2.0)
    assert deadlines == Deadlines(
        started_at=100.0,
        request_stop_at=104.0,  # + D
        release_at=105.0,  # + D + M/2
        kill_at=pytest.approx(105.6),  # type: ignore[arg-type]  # + D + 0.8 M
        exit_at=106.0,  # + D + M
    )
    assert (RELEASE_FRACTION, KILL_FRACTION) == (0.5, 0.8)


@given(
    st.floats(0, 1e6, allow_nan=False),
    st.floats(-10, 1e4, allow_nan=False),
    st.floats(-10, 1e4, allow_nan=False),
)
def test_the_steps_never_go_back_in_time(start: float, drain: float, margin: float) -> None:
    d = Deadlines.after(start, drain, margin)
    assert d.started_at <= d.request_stop_at <= d.release_at <= d.kill_at <= d.exit_at
    # Subtracting two large instants loses the low bits: compare to the start's precision.
    expected = max(0.0, drain) + max(0.0, margin)
    assert d.exit_at - d.started_at == pytest.approx(expected, abs=1e-9 * max(1.0, start))
