"""The scheduler suite's analysis (tests/support/sched_records.py): the e2e tests and the bench
judge duplicates, missed fire times and gaps with it, so it is checked on its own first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.sched_records import Run, expected_times, gap_after, load_runs, tally


def run(fire: float, start: float | None = None, pid: int = 1) -> Run:
    return Run("sql", "tick", fire, fire + 0.01 if start is None else start, pid)


def test_expected_times_are_the_aligned_seconds_of_the_window() -> None:
    assert expected_times(10.2, 14.0, 1.0) == [11.0, 12.0, 13.0]
    assert expected_times(10.0, 12.0, 1.0) == [10.0, 11.0]
    assert expected_times(0.0, 10.0, 5.0, anchor=2.0) == [2.0, 7.0]


def test_tally_counts_duplicates_missed_and_delays_per_fire_time() -> None:
    runs = [run(10.0), run(10.0, 10.3, pid=2), run(11.0, 11.5), run(13.0), run(20.0)]
    window = tally(runs, start=10.0, end=14.0, period=1.0)
    assert window.runs == 4  # 20.0 is outside the window
    assert window.duplicated == {10.0: 2}
    assert window.duplicates == 1
    assert window.missed == [12.0]
    assert sorted(round(d, 3) for d in window.delays) == [0.01, 0.01, 0.5]
    assert window.summary()["delay_max_ms"] == 500.0


def test_tally_keys_fire_times_by_whole_milliseconds() -> None:
    window = tally([run(10.0000004)], start=10.0, end=11.0, period=1.0)
    assert window.missed == []


def test_bucketed_runs_count_against_the_second_they_were_sent_in() -> None:
    runs = [run(10.1), run(10.7), run(11.2)]
    window = tally(runs, start=10.0, end=13.0, period=1.0, bucket=True)
    assert window.duplicates == 1
    assert window.missed == [12.0]


def test_gap_after_is_the_longest_pause_between_starts_around_the_kill() -> None:
    runs = [run(t, t) for t in (1.0, 2.0, 3.0, 7.5, 8.0)]
    assert gap_after(runs, 3.2, horizon=6.0) == pytest.approx(4.5)
    # nothing after the kill: the pause runs to the end of the horizon
    assert gap_after(runs[:3], 3.2, horizon=6.0) == pytest.approx(6.2)


def test_load_runs_reads_the_records_of_one_schedule_in_fire_time_order(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    lines = [
        {"engine": "rq", "schedule": "tick", "fire_time": 2.0, "start": 2.1, "pid": 7},
        {"engine": "rq", "schedule": "all", "fire_time": 1.0, "start": 1.1, "pid": 7},
        {"engine": "rq", "schedule": "tick", "fire_time": 1.0, "start": 1.2, "pid": 8},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r.fire_time for r in load_runs(path, schedule="tick")] == [1.0, 2.0]
    assert len(load_runs(path)) == 3
    assert load_runs(tmp_path / "missing.jsonl") == []
