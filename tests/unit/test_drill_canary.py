"""The canary's body: what each kind does, and what it records (a record store double)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

from workerkit.drill.canary import CanaryFailure, run_canary
from workerkit.drill.plot import require_matplotlib
from workerkit.drill.records import CanaryRun
from workerkit.errors import ConfigurationError, ReleaseJob
from workerkit.job import JobContext


class Records:
    """Keeps the records in a dict, as a store would."""

    def __init__(self) -> None:
        self.by_id: dict[str, CanaryRun] = {}

    def started(self, run: CanaryRun) -> None:
        self.by_id[run.run_id] = run

    def ended(self, run: CanaryRun, ended_at: float, outcome: str) -> None:
        old = self.by_id[run.run_id]
        self.by_id[run.run_id] = CanaryRun(
            **{**old.to_json(), "ended_at": ended_at, "outcome": outcome}
        )

    def completed_before(self, drill_id: str, seq: int) -> bool:
        return any(r.seq == seq and r.completed for r in self.runs(drill_id))

    def runs(self, drill_id: str) -> list[CanaryRun]:
        return [r for r in self.by_id.values() if r.drill_id == drill_id]

    def close(self) -> None:
        pass


def context(attempt: int = 1, checkpoint: Any = None, saved: list[Any] | None = None) -> JobContext:
    sink = saved.append if saved is not None else None
    return JobContext(
        job_id="j", task="workerkit.canary", queue="default", attempt=attempt,
        checkpoint=checkpoint, checkpoint_interval=0.05, save=sink,
    )  # fmt: skip


def canary(records: Records, job: JobContext, kind: str, long_seconds: float = 0.0) -> str:
    with job.activate():
        return run_canary(
            records, drill_id="d", seq=3, kind=kind, enqueued_at=1.0, long_seconds=long_seconds
        )


def test_short_canary_records_one_completed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTNAME", "pod-x")
    records = Records()
    assert canary(records, context(), "short") == "ok"
    [run] = records.runs("d")
    assert (run.seq, run.kind, run.attempt, run.hostname) == (3, "short", 1, "pod-x")
    assert run.outcome == "completed"
    assert run.ended_at is not None
    assert run.ended_at >= run.started_at
    assert not run.resumed


def test_a_canary_delivered_again_after_completing_skips_its_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = Records()
    assert canary(records, context(), "long", long_seconds=0.2) == "ok"
    monkeypatch.setenv("HOSTNAME", "pod-y")
    began = time.monotonic()
    assert canary(records, context(attempt=2), "long", long_seconds=30.0) == "ok"
    assert time.monotonic() - began < 5  # the body (30 s of work) did not run
    again = [r for r in records.runs("d") if r.outcome == "redelivered"]
    assert len(again) == 1
    assert (again[0].hostname, again[0].attempt) == ("pod-y", 2)
    assert again[0].ended_at is not None
    assert 0 <= again[0].ended_at - again[0].started_at < 1
    assert sorted(str(r.outcome) for r in records.runs("d")) == ["completed", "redelivered"]


def test_flaky_canary_fails_its_first_attempt_only() -> None:
    records = Records()
    with pytest.raises(CanaryFailure):
        canary(records, context(attempt=1), "flaky")
    assert canary(records, context(attempt=2), "flaky") == "ok"
    outcomes = sorted((r.attempt, r.outcome) for r in records.runs("d"))
    assert outcomes == [(1, "failed"), (2, "completed")]


def test_long_canary_releases_at_a_stop_and_the_next_attempt_resumes() -> None:
    records = Records()
    saved: list[Any] = []
    job = context(saved=saved)
    threading.Timer(0.3, job.request_stop).start()
    with pytest.raises(ReleaseJob):
        canary(records, job, "long", long_seconds=30)
    [released] = records.runs("d")
    assert released.outcome == "released"
    done = saved[-1]["done"]
    assert 0.2 < done < 5
    # The next attempt starts from the checkpoint: only what is left of the work.
    resumed_job = context(checkpoint={"done": 29.8})
    assert canary(records, resumed_job, "long", long_seconds=30) == "ok"
    second = next(r for r in records.runs("d") if r.run_id != released.run_id)
    assert second.resumed
    assert second.outcome == "completed"
    assert second.ended_at is not None
    assert second.ended_at - second.started_at < 2


def test_stubborn_canary_ignores_a_stop_and_saves_nothing() -> None:
    records = Records()
    saved: list[Any] = []
    job = context(saved=saved)
    job.request_stop()
    assert canary(records, job, "stubborn", long_seconds=0.2) == "ok"
    assert saved == []
    assert records.runs("d")[0].outcome == "completed"


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'workerkit\[plot\]'"):
        require_matplotlib()
