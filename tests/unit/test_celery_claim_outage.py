"""The Celery engine's per-task path when workerkit's own store fails a run, not the task: an
idempotency key that cannot be claimed, a deferred task's retry that cannot be published. Both
are released (back to the queue by the fenced restore), never failed and acknowledged: the
message of a task whose body never ran would be lost (tests/faults/test_celery_faults.py has
the real-process scenario).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from workerkit import errors
from workerkit.engines.celery.runtime import Runtime
from workerkit.engines.celery.task import run_job
from workerkit.events import Event, JobFinished
from workerkit.idempotency import idempotent
from workerkit.idempotency.memory import InMemoryIdempotencyStore
from workerkit.settings import Settings

SETTINGS = Settings(engine="celery")


class Recorder:
    """Stands in for the per-task event sender: keeps what was sent."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[Event] = []

    def send(self, event: Event) -> None:
        self.sent.append(event)

    def flush(self) -> None:
        pass


class FakeTask:
    """The parts of a Celery task that run_job reads; ``retry`` raises what Celery's would."""

    name = "tests.t"
    time_limit = None

    def __init__(self, retry_raises: BaseException | None = None) -> None:
        self.request = SimpleNamespace(id="job-1", retries=0, delivery_info={"routing_key": "q"})
        self.retry_raises = retry_raises

    def retry(self, *, exc: BaseException, countdown: float) -> Exception:
        if self.retry_raises is not None:
            raise self.retry_raises
        return RuntimeError("retry published")


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


@pytest.fixture
def runtime() -> Runtime:
    runtime = Runtime(Celery("t"), Settings(engine="celery"))
    runtime.task_events = Recorder()  # type: ignore[assignment]
    return runtime


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
    with pytest.raises(RuntimeError, match="retry published"):
        run_job(runtime, FakeTask(), busy, ("a",), {})
    assert outcome(runtime) == "retried"
    other = Reject(TypeError("not serializable"))
    with pytest.raises(Reject) as caught:
        run_job(runtime, FakeTask(retry_raises=other), busy, ("a",), {})
    assert caught.value is other
