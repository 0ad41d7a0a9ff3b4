"""The Celery engine's per-task path: what each way a task ends is reported as, and raises."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("celery")

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError

import workerkit
from workerkit import errors
from workerkit.engines.attempt import Unrunnable
from workerkit.engines.celery.lease import LEASE_LOST_REASON, now
from workerkit.engines.celery.runtime import Runtime
from workerkit.engines.celery.task import AttemptsExhausted, QuietRelease, run_job
from workerkit.events import Event, JobFinished, JobStarted
from workerkit.idempotency import idempotent
from workerkit.idempotency.memory import InMemoryIdempotencyStore
from workerkit.job import JobContext
from workerkit.settings import Settings


class Recorder:
    """Stands in for the per-task event sender: keeps what was sent."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[Event] = []

    def send(self, event: Event) -> None:
        self.sent.append(event)

    def flush(self) -> None:
        pass


class Retrying(Exception):
    """What the fake task's retry() returns, with the countdown it was given."""

    def __init__(self, exc: BaseException, countdown: float) -> None:
        super().__init__(countdown)
        self.exc = exc
        self.countdown = countdown


class FakeTask:
    """The parts of a Celery task that run_job reads."""

    name = "tests.t"
    time_limit = None

    def __init__(self, crashes: int = 0, retry_raises: BaseException | None = None) -> None:
        self.request = SimpleNamespace(
            id="job-1",
            retries=0,
            delivery_info={"routing_key": "q"},
            workerkit_crashes=crashes,
        )
        self.retry_raises = retry_raises  # what Celery's retry() raises when it cannot publish

    def retry(self, *, exc: BaseException, countdown: float) -> Retrying:
        if self.retry_raises is not None:
            raise self.retry_raises
        return Retrying(exc, countdown)


@pytest.fixture
def runtime() -> Runtime:
    runtime = Runtime(Celery("t"), Settings(engine="celery"))
    runtime.task_events = Recorder()  # type: ignore[assignment]
    return runtime


def finished(runtime: Runtime) -> str:
    recorder: Recorder = runtime.task_events  # type: ignore[assignment]
    assert [type(e) for e in recorder.sent] == [JobStarted, JobFinished]
    event = recorder.sent[1]
    assert isinstance(event, JobFinished)
    assert (event.job_id, event.task, event.queue) == ("job-1", "tests.t", "q")
    return event.outcome


def raising(exc: BaseException) -> Any:
    def run() -> None:
        raise exc

    return run


def test_a_task_that_returns_succeeded(runtime: Runtime) -> None:
    assert run_job(runtime, FakeTask(), lambda x: x * 2, (21,), {}) == 42
    assert finished(runtime) == "succeeded"


def test_a_released_job_is_rejected_with_requeue(runtime: Runtime) -> None:
    with pytest.raises(Reject) as caught:
        run_job(runtime, FakeTask(), raising(errors.ReleaseJob()), (), {})
    assert caught.value.requeue is True
    assert caught.value.__suppress_context__  # raised "from None"
    assert finished(runtime) == "released"


def test_a_release_is_logged_once_at_info_and_celery_s_warning_for_it_is_dropped(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(Reject) as caught:
        run_job(runtime, FakeTask(), raising(errors.ReleaseJob()), (), {})
    (line,) = caplog.records
    fields = vars(line)
    assert (line.levelno, fields["event"], fields["job_id"]) == (
        logging.INFO,
        "job_released",
        "job-1",
    )
    assert line.exc_info is None

    def trace_record(exc: BaseException) -> logging.LogRecord:
        # What celery.app.trace logs for a Reject: a WARNING with the exception's traceback.
        try:
            raise exc
        except Reject:
            exc_info = sys.exc_info()
        return logging.LogRecord(
            "celery.app.trace", logging.WARNING, __file__, 1, "Task %s", ("x",), exc_info
        )

    quiet = QuietRelease()
    assert not quiet.filter(trace_record(caught.value))
    assert quiet.filter(trace_record(Reject("the user's own reject", requeue=True)))


@pytest.mark.parametrize(
    ("retry_after", "countdown"),
    [(None, 5.0), (0.0, 5.0), (0.2, 1.0), (30.0, 30.0), (500.0, 60.0)],
)
def test_a_busy_idempotency_key_retries_after_its_holder_within_bounds(
    runtime: Runtime, retry_after: float | None, countdown: float
) -> None:
    busy = errors.IdempotencyInProgress("held", retry_after=retry_after)
    with pytest.raises(Retrying) as caught:
        run_job(runtime, FakeTask(), raising(busy), (), {})
    assert caught.value.exc is busy
    assert caught.value.countdown == countdown
    assert finished(runtime) == "retried"


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (Retry("again"), "retried"),
        (SoftTimeLimitExceeded(), "timed_out"),
        (errors.LeaseLost("gone"), "lease_lost"),
        (errors.IdempotencyClaimLost("taken"), "lease_lost"),
        # Celery labels the rest "failed" and lets Celery settle them (its own retry options
        # included): an interrupt, a reused key and a BaseException alike.
        (errors.JobInterrupted(), "failed"),
        (errors.IdempotencyKeyMismatch("other args"), "failed"),
        (ValueError("bad"), "failed"),
        (KeyboardInterrupt(), "failed"),
    ],
)
def test_other_exceptions_propagate_as_they_are_with_their_outcome(
    runtime: Runtime, exc: BaseException, outcome: str
) -> None:
    with pytest.raises(type(exc)) as caught:
        run_job(runtime, FakeTask(), raising(exc), (), {})
    assert caught.value is exc
    assert finished(runtime) == outcome


def test_a_message_whose_worker_died_too_often_fails_without_running(runtime: Runtime) -> None:
    ran = []
    with pytest.raises(AttemptsExhausted):
        run_job(runtime, FakeTask(crashes=3), lambda: ran.append(1), (), {})
    assert ran == []
    assert finished(runtime) == "failed"


def test_arguments_that_do_not_fit_the_task_fail_without_running_it(runtime: Runtime) -> None:
    ran = []

    def add(a: int, b: int) -> int:
        ran.append(1)
        return a + b

    with pytest.raises(Unrunnable, match=r"ArgumentsMismatch: .*add\(a, b\): missing .*'b'"):
        run_job(runtime, FakeTask(), add, (1,), {})
    assert ran == []
    assert finished(runtime) == "failed"


def test_a_type_error_inside_the_task_is_the_tasks_own(runtime: Runtime) -> None:
    def sloppy(a: int) -> int:
        return a + "1"  # type: ignore[operator, no-any-return]

    with pytest.raises(TypeError, match="unsupported operand"):
        run_job(runtime, FakeTask(), sloppy, (1,), {})
    assert finished(runtime) == "failed"


def test_a_run_that_ends_once_the_shared_deadline_is_near_settles_as_usual(
    runtime: Runtime,
) -> None:
    # The pool's deadline is shared by every task: it stalls when one lease in hand is lost or
    # a renewal round fails, while this run's own lease may still be held. A run that returned
    # (or failed on its own) settles; its ack is fenced by its own lease (ack.lua), so it is
    # never put back to run a second time.
    runtime.lease.extend(now() - runtime.lease.ttl)
    assert run_job(runtime, FakeTask(), lambda: "done", (), {}) == "done"
    assert finished(runtime) == "succeeded"


def test_a_run_that_fails_once_the_shared_deadline_is_near_fails_as_usual(
    runtime: Runtime,
) -> None:
    runtime.lease.extend(now() - runtime.lease.ttl)
    with pytest.raises(ValueError, match="bad"):
        run_job(runtime, FakeTask(), raising(ValueError("bad")), (), {})
    assert finished(runtime) == "failed"


def _stopped_by_the_watchdog(then: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        job = workerkit.current_job()
        assert isinstance(job, JobContext)
        job.mark_lease_lost()  # what the pool child's watchdog does at the stop point
        return then()

    return run


@pytest.mark.parametrize(
    "then",
    [
        raising(ValueError("bad")),
        raising(errors.ReleaseJob()),
        raising(SoftTimeLimitExceeded()),
    ],
)
def test_a_run_the_watchdog_stopped_is_given_back_unsettled(runtime: Runtime, then: Any) -> None:
    # Failure, release or the raised stop alike: a Reject with requeue; the main process
    # restores the message only if no other worker holds it.
    runtime.lease.extend(now() - runtime.lease.ttl)
    with pytest.raises(Reject) as caught:
        run_job(runtime, FakeTask(), _stopped_by_the_watchdog(then), (), {})
    assert caught.value.requeue is True
    assert caught.value.reason == LEASE_LOST_REASON
    assert finished(runtime) == "lease_lost"


def test_a_run_that_returns_after_the_watchdog_asked_it_to_stop_settles(
    runtime: Runtime,
) -> None:
    runtime.lease.extend(now() - runtime.lease.ttl)
    assert run_job(runtime, FakeTask(), _stopped_by_the_watchdog(lambda: "done"), (), {}) == "done"
    assert finished(runtime) == "succeeded"


def test_a_run_whose_lease_is_renewed_settles_as_usual(runtime: Runtime) -> None:
    runtime.lease.extend(now())
    assert run_job(runtime, FakeTask(), lambda: "done", (), {}) == "done"
    assert finished(runtime) == "succeeded"


# --- workerkit's own store fails a run, not the task ----------------------------------------
# An idempotency key that cannot be claimed, a deferred task's retry that cannot be published:
# both are released (back to the queue by the fenced restore), never failed and acknowledged:
# the message of a task whose body never ran would be lost (tests/faults/test_celery_faults.py
# has the real-process scenario).

SETTINGS = Settings(engine="celery")


class UnreachableStore(InMemoryIdempotencyStore):
    """An idempotency store whose claims (or completions) meet an outage."""

    def __init__(self, *, claims: bool = True, completions: bool = False) -> None:
        super().__init__()
        self.claims = claims
        self.completions = completions

    def claim(self, key: str, fingerprint: str, *, in_progress_expiry: float) -> Any:
        if self.claims:
            raise errors.StoreUnavailable("redis unavailable: ConnectionError: refused")
        return super().claim(key, fingerprint, in_progress_expiry=in_progress_expiry)

    def complete(self, key: str, token: str, result_json: str, *, retention: float) -> bool:
        if self.completions:
            raise errors.StoreUnavailable("redis unavailable: ConnectionError: refused")
        return super().complete(key, token, result_json, retention=retention)


def outcome(runtime: Runtime) -> str:
    recorder: Recorder = runtime.task_events  # type: ignore[assignment]
    event = recorder.sent[-1]
    assert isinstance(event, JobFinished)
    return event.outcome


def released_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [vars(r) for r in caplog.records if getattr(r, "event", None) == "job_released"]


def test_an_idempotent_task_whose_key_cannot_be_claimed_is_released_not_failed(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    @idempotent("k:{job}", store=UnreachableStore(), in_progress_expiry=3, settings=SETTINGS)
    def body(job: str) -> str:
        ran.append(job)
        return job

    with caplog.at_level(logging.INFO), pytest.raises(Reject) as caught:
        run_job(runtime, FakeTask(), body, ("a",), {})
    assert caught.value.requeue is True
    assert ran == []
    assert outcome(runtime) == "released"
    (line,) = released_lines(caplog)
    assert (line["reason"], line["job_id"]) == ("idempotency_store_unreachable", "job-1")
    assert "redis unavailable" in line["error"]


@pytest.mark.parametrize(
    "store",
    [
        pytest.param(None, id="a task that is not idempotent"),
        pytest.param(UnreachableStore(claims=False, completions=True), id="the body ran"),
    ],
)
def test_a_store_error_of_the_task_itself_or_after_its_body_ran_fails_as_before(
    runtime: Runtime, store: UnreachableStore | None
) -> None:
    def plain(job: str) -> str:
        raise errors.StoreUnavailable("the task's own store")

    run = plain
    if store is not None:
        run = idempotent("k:{job}", store=store, in_progress_expiry=3, settings=SETTINGS)(
            lambda job: job
        )
    with pytest.raises(errors.StoreUnavailable):
        run_job(runtime, FakeTask(), run, ("a",), {})
    assert outcome(runtime) == "failed"


def busy(job: str) -> str:
    raise errors.IdempotencyInProgress("held", retry_after=2.0)


def test_a_deferred_task_whose_retry_cannot_be_published_is_released_not_acknowledged(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # What Celery's Task.retry raises when apply_async fails: a Reject without requeue, which
    # the worker settles as an ack. No retry message exists: the task would be lost.
    unpublished = Reject(OperationalError("Error 111 connecting. Connection refused."))
    with caplog.at_level(logging.INFO), pytest.raises(Reject) as caught:
        run_job(runtime, FakeTask(retry_raises=unpublished), busy, ("a",), {})
    assert caught.value is not unpublished
    assert caught.value.requeue is True
    assert outcome(runtime) == "released"
    (line,) = released_lines(caplog)
    assert line["reason"] == "retry_not_published"


def test_a_deferred_task_retries_as_before_and_other_rejects_of_its_retry_stand(
    runtime: Runtime,
) -> None:
    with pytest.raises(Retrying):
        run_job(runtime, FakeTask(), busy, ("a",), {})
    assert outcome(runtime) == "retried"
    other = Reject(TypeError("not serializable"))
    with pytest.raises(Reject) as caught:
        run_job(runtime, FakeTask(retry_raises=other), busy, ("a",), {})
    assert caught.value is other
