"""The job context: throttled, fenced checkpoints; stop requests; release; current_job()."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from workerkit.errors import LeaseLost, NoCurrentJob, ReleaseJob
from workerkit.job import JobContext, active_contexts, current_job, current_job_or_none
from workerkit.testing import ManualClock


def make(saved: list[Any], clock: ManualClock, **kwargs: Any) -> JobContext:
    return JobContext(
        job_id="j1",
        task="t",
        queue="default",
        attempt=1,
        checkpoint_interval=5,
        save=saved.append,
        clock=clock,
        **kwargs,
    )


def test_checkpoints_are_throttled_by_the_interval_and_kept_meanwhile() -> None:
    saved: list[Any] = []
    clock = ManualClock(start=0)
    job = make(saved, clock)
    assert job.save_checkpoint(1) is False  # within F of the start: kept, not written
    assert job.checkpoint == 1
    clock.advance(5)
    assert job.save_checkpoint(2) is True
    assert job.save_checkpoint(3) is False
    assert saved == [2]
    job.flush()
    assert saved == [2, 3]


def test_force_and_stop_requested_write_at_once() -> None:
    saved: list[Any] = []
    clock = ManualClock(start=0)
    job = make(saved, clock)
    assert job.save_checkpoint("forced", force=True) is True
    job.request_stop()
    assert job.stop_requested
    assert job.save_checkpoint("stopping") is True
    assert saved == ["forced", "stopping"]


def test_release_saves_the_state_and_raises_release_job() -> None:
    saved: list[Any] = []
    job = make(saved, ManualClock(start=0))
    with pytest.raises(ReleaseJob):
        job.release({"cursor": 10})
    assert saved == [{"cursor": 10}]
    assert job.checkpoint == {"cursor": 10}


def test_release_job_is_not_caught_by_except_exception() -> None:
    job = make([], ManualClock(start=0))

    def task_with_a_broad_handler() -> None:
        try:
            job.release()
        except Exception:
            pytest.fail("ReleaseJob must pass through except Exception")

    with pytest.raises(ReleaseJob):
        task_with_a_broad_handler()


def test_a_lost_lease_stops_the_job_and_surfaces() -> None:
    def fenced(state: Any) -> None:
        raise LeaseLost

    job = JobContext(job_id="j", task="t", queue="q", attempt=2, save=fenced)
    with pytest.raises(LeaseLost):
        job.save_checkpoint("x", force=True)
    assert job.lease_lost
    assert job.stop_requested


def test_current_job_is_per_thread_and_only_inside_activate() -> None:
    job = make([], ManualClock(start=0))
    with pytest.raises(NoCurrentJob):
        current_job()
    seen_elsewhere: list[JobContext | None] = []
    with job.activate():
        assert current_job() is job
        assert job in active_contexts()
        other = threading.Thread(target=lambda: seen_elsewhere.append(current_job_or_none()))
        other.start()
        other.join()
    assert seen_elsewhere == [None]
    assert current_job_or_none() is None
    assert job not in active_contexts()


def test_wait_for_stop_wakes_on_a_stop_from_another_thread() -> None:
    context = JobContext(job_id="j", task="t", queue="q", attempt=1)
    assert not context.wait_for_stop(0.01)
    timer = threading.Timer(0.05, context.request_stop)
    timer.start()
    started = time.monotonic()
    assert context.wait_for_stop(10)
    assert time.monotonic() - started < 5
    timer.join()
    # Once stopped, a wait returns at once, and so does a wait on a context stopped before
    # anyone waited.
    assert context.wait_for_stop(10)
    already = JobContext(job_id="k", task="t", queue="q", attempt=1)
    already.mark_lease_lost()
    assert already.stop_requested
    assert already.wait_for_stop(10)
