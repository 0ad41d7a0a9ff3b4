"""The RQ engine's exception -> outcome rules, its defer backoff and its bad-ref check."""

from __future__ import annotations

from typing import Any

import pytest
from rq.exceptions import DeserializationError
from rq.timeouts import JobTimeoutException

from workerkit.engines.attempt import Defer, Fail, Release, RetryOrFail, StandDown, verdict_for
from workerkit.engines.rq import TaskNotAllowed, WorkerkitJob
from workerkit.engines.rq.perform import DEFER_BACKOFF, RULES, defer_backoff
from workerkit.engines.rq.recovery import BadRef, Recovery
from workerkit.errors import (
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    JobInterrupted,
    ReleaseJob,
)


def _no_backoff() -> float:
    raise AssertionError("the backoff is drawn only for a defer")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (JobTimeoutException("too long"), RetryOrFail),
        (TaskNotAllowed("not allowed"), Fail),
        (DeserializationError("bad payload"), Fail),
        (IdempotencyKeyMismatch("other arguments"), Fail),
        (ValueError("boom"), RetryOrFail),
        (SystemExit(3), RetryOrFail),  # the RQ worker settles a BaseException as a failure
        (ReleaseJob(), Release),
    ],
)
def test_rq_rules_map_each_exception_to_its_verdict(exc: BaseException, expected: type) -> None:
    verdict = verdict_for(exc, RULES, backoff=_no_backoff)
    assert isinstance(verdict, expected)
    if isinstance(verdict, RetryOrFail):
        assert verdict.timed_out == isinstance(exc, JobTimeoutException)


def test_rq_rules_stand_down_when_taken_back_or_lost() -> None:
    assert verdict_for(JobInterrupted(), RULES, backoff=_no_backoff, releasing=True) == StandDown(
        "released"
    )
    assert verdict_for(
        ValueError("boom"), RULES, backoff=_no_backoff, lease_lost=True
    ) == StandDown("lease_lost")
    busy = IdempotencyInProgress("held", retry_after=0.5)
    assert verdict_for(busy, RULES, backoff=_no_backoff, lease_lost=True) == StandDown("lease_lost")


def test_defer_backoff_is_the_backoff_with_equal_jitter() -> None:
    draws = [defer_backoff() for _ in range(200)]
    assert all(DEFER_BACKOFF / 2 <= draw <= DEFER_BACKOFF for draw in draws)
    assert len(set(draws)) > 1


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [(None, 1.0, 2.0), (0.25, 0.25, 0.25), (60.0, 1.0, 2.0), (-1.0, 0.0, 0.0)],
)
def test_a_busy_job_is_deferred_until_the_holder_may_be_done(
    retry_after: float | None, low: float, high: float
) -> None:
    busy = IdempotencyInProgress("held", retry_after=retry_after)
    verdict = verdict_for(busy, RULES, backoff=defer_backoff)
    assert isinstance(verdict, Defer)
    assert low <= verdict.delay <= high
    assert verdict.reason == "IdempotencyInProgress: held"


@pytest.mark.parametrize("missing", ["job_id", "token", "queue"])
def test_a_ref_without_a_field_is_a_bad_ref(missing: str) -> None:
    ref: dict[str, Any] = {"job_id": "j1", "token": "t1", "queue": "default"}
    del ref[missing]
    recovery = Recovery(None, None, WorkerkitJob, None)  # type: ignore[arg-type]
    with pytest.raises(BadRef) as raised:
        recovery.release_ref(ref)
    assert str(raised.value) == repr(KeyError(missing))
