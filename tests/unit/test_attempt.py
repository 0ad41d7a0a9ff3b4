"""What every engine shares: the exception -> verdict table, the keeper, the release loop."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from workerkit.engines.attempt import (
    HEALTH_EVERY,
    HEARTBEAT_EVERY,
    Defer,
    Duty,
    Fail,
    Keeper,
    Propagate,
    Release,
    ReleaseTally,
    Retried,
    RetryOrFail,
    Rules,
    StandDown,
    Unrunnable,
    Verdict,
    check_arguments,
    defer_delay,
    release_each,
    verdict_for,
)
from workerkit.errors import (
    IdempotencyClaimLost,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    JobInterrupted,
    LeaseLost,
    ReleaseJob,
    StoreUnavailable,
)

log = logging.getLogger("tests.attempt")


# Stand-ins for each engine's own exceptions (the engines' are private or need their library).
class TimedOut(BaseException):
    """An engine's own interrupt for a job past its timeout (the SQL worker's JobTimedOut)."""


class PermanentFailure(Exception):
    """An engine's "cannot succeed on any attempt" (unknown task, bad payload)."""


class RetryAsked(Exception):
    """A job's own request for a retry (Celery's Retry)."""


class SoftLimit(Exception):
    """An engine's "ran past its time limit" raised in the job (Celery, RQ)."""


SQL_LIKE = Rules(
    interrupts=(JobInterrupted, TimedOut),
    permanent=(PermanentFailure,),
    settle_base_exceptions=False,
)
RQ_LIKE = Rules(timeouts=(SoftLimit,), permanent=(PermanentFailure,))
CELERY_LIKE = Rules(
    interrupts=(),
    retries=(RetryAsked,),
    timeouts=(SoftLimit,),
    defer_cap=60.0,
    defer_floor=1.0,
    zero_retry_after_is_unknown=True,
)


def verdict(
    exc: BaseException,
    rules: Rules = RQ_LIKE,
    *,
    releasing: bool = False,
    lease_lost: bool = False,
    backoff: float = 2.0,
) -> Verdict:
    return verdict_for(
        exc, rules, backoff=lambda: backoff, releasing=releasing, lease_lost=lease_lost
    )


# --- the table, row by row ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("releasing", "lease_lost"), [(False, False), (True, False), (False, True)]
)
def test_a_jobs_own_release_is_a_release_whatever_the_flags(
    releasing: bool, lease_lost: bool
) -> None:
    assert verdict(ReleaseJob(), releasing=releasing, lease_lost=lease_lost) == Release()


@pytest.mark.parametrize("exc", [LeaseLost(), IdempotencyClaimLost()])
def test_a_lost_lease_stands_down_as_lease_lost_even_while_releasing(exc: LeaseLost) -> None:
    assert verdict(exc) == StandDown("lease_lost")
    assert verdict(exc, releasing=True) == StandDown("lease_lost")


def test_an_interrupt_stands_down_as_released_or_lease_lost_by_the_flags() -> None:
    assert verdict(JobInterrupted(), releasing=True) == StandDown("released")
    assert verdict(JobInterrupted()) == StandDown("lease_lost")
    assert verdict(TimedOut(), SQL_LIKE) == StandDown("lease_lost")


def test_an_engine_that_never_interrupts_treats_job_interrupted_as_a_failure() -> None:
    exc = JobInterrupted()
    assert verdict(exc, CELERY_LIKE) == RetryOrFail(exc)


def test_a_base_exception_propagates_when_the_engine_does_not_settle_them() -> None:
    assert verdict(SystemExit(3), SQL_LIKE) == Propagate()
    # Before the flags: the SQL worker never caught these, lease lost or not.
    assert verdict(KeyboardInterrupt(), SQL_LIKE, lease_lost=True) == Propagate()


def test_a_base_exception_is_retried_or_failed_when_the_engine_settles_them() -> None:
    exc = SystemExit(3)
    assert verdict(exc, RQ_LIKE) == RetryOrFail(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("boom"),
        IdempotencyInProgress(retry_after=1.0),
        IdempotencyKeyMismatch(),
        PermanentFailure("UnknownTask: x"),
        SoftLimit(),
        SystemExit(1),
    ],
)
def test_a_failure_of_an_attempt_taken_back_or_lost_stands_down(exc: BaseException) -> None:
    assert verdict(exc, releasing=True) == StandDown("released")
    assert verdict(exc, lease_lost=True) == StandDown("lease_lost")


def test_an_idempotency_key_in_progress_defers_with_the_reason() -> None:
    busy = IdempotencyInProgress("key k is held", retry_after=0.5)
    assert verdict(busy, backoff=2.0) == Defer(0.5, "IdempotencyInProgress: key k is held")


def test_a_retry_the_job_asked_for_is_let_through() -> None:
    assert verdict(RetryAsked(), CELERY_LIKE) == Retried()


def test_a_timeout_is_retried_or_failed_as_timed_out() -> None:
    exc = SoftLimit("too slow")
    result = verdict(exc, RQ_LIKE)
    assert result == RetryOrFail(exc, timed_out=True)


def test_an_idempotency_key_mismatch_fails_at_once_with_its_name() -> None:
    result = verdict(IdempotencyKeyMismatch("key k was used with other arguments"))
    assert result == Fail("IdempotencyKeyMismatch: key k was used with other arguments")


def test_an_engines_permanent_failure_fails_at_once_with_its_message() -> None:
    result = verdict(PermanentFailure("PayloadError: not JSON"), SQL_LIKE)
    assert result == Fail("PayloadError: not JSON")


@pytest.mark.parametrize("rules", [SQL_LIKE, RQ_LIKE, CELERY_LIKE], ids=["sql", "rq", "celery"])
def test_a_job_that_cannot_run_fails_at_once_on_every_engine(rules: Rules) -> None:
    reason = "ArgumentsMismatch: add(x, y): missing a required argument: 'y'"
    assert verdict(Unrunnable(reason), rules) == Fail(reason)


@pytest.mark.parametrize("rules", [SQL_LIKE, RQ_LIKE, CELERY_LIKE], ids=["sql", "rq", "celery"])
@pytest.mark.parametrize("exc", [TypeError("inside the body"), RecursionError("deep")])
def test_a_type_or_recursion_error_of_the_tasks_body_is_still_retried(
    rules: Rules, exc: Exception
) -> None:
    assert verdict(exc, rules) == RetryOrFail(exc)


def test_a_job_that_cannot_run_taken_back_stands_down() -> None:
    assert verdict(Unrunnable("r"), SQL_LIKE, lease_lost=True) == StandDown("lease_lost")


def _add(x: int, y: int, *, scale: int = 1) -> int:
    return (x + y) * scale


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1, 2), {}), ((1,), {"y": 2}), ((), {"x": 1, "y": 2, "scale": 3})],
)
def test_arguments_that_fit_the_signature_pass(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    check_arguments(_add, args, kwargs)


def test_a_decorator_that_injects_an_argument_is_checked_by_what_it_takes() -> None:
    # functools.wraps advertises the inner signature (session, x); the call takes (x) alone.
    def with_session(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn("session", *args, **kwargs)

        return wrapper

    @with_session
    def task(session: str, x: int) -> int:
        return x

    check_arguments(task, (1,), {})
    assert task(1) == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "why"),
    [
        ((1,), {}, "missing a required argument: 'y'"),
        ((1, 2, 3), {}, "too many positional arguments"),
        ((1, 2), {"z": 1}, "got an unexpected keyword argument 'z'"),
        ((1, 2), {"x": 1}, "multiple values for argument 'x'"),
    ],
)
def test_arguments_that_do_not_fit_are_unrunnable_with_the_signature(
    args: tuple[Any, ...], kwargs: dict[str, Any], why: str
) -> None:
    with pytest.raises(Unrunnable) as caught:
        check_arguments(_add, args, kwargs)
    message = str(caught.value)
    assert message.startswith("ArgumentsMismatch: _add(x, y, *, scale=1): ")
    assert why in message


def test_a_wrapper_is_checked_by_its_own_signature_as_celery_does() -> None:
    # What Python calls is the wrapper; (*args, **kwargs) binds anything, so the call decides
    # (Celery's own check reads the wrapper too: inspect.getfullargspec ignores __wrapped__).
    @functools.wraps(_add)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        return _add(*args, **kwargs)

    check_arguments(wrapper, (1,), {})


def test_a_callable_without_a_signature_is_not_checked() -> None:
    check_arguments(max, (1, 2, 3, 4), {"key": abs})  # no signature: left to the call


def test_any_other_exception_is_retried_or_failed_with_a_one_line_error() -> None:
    exc = ValueError("boom")
    result = verdict(exc, SQL_LIKE)
    assert result == RetryOrFail(exc)
    assert isinstance(result, RetryOrFail)
    assert result.error == "ValueError: boom"
    assert not result.timed_out


def test_only_a_defer_calls_the_backoff() -> None:
    calls: list[int] = []

    def backoff() -> float:
        calls.append(1)
        return 3.0

    for exc in (ValueError(), ReleaseJob(), LeaseLost(), IdempotencyKeyMismatch()):
        verdict_for(exc, RQ_LIKE, backoff=backoff)
    assert calls == []
    verdict_for(IdempotencyInProgress(), RQ_LIKE, backoff=backoff)
    assert calls == [1]


# --- each engine's table, as its rules give it -------------------------------------------------

ENGINE_TABLE: list[tuple[Rules, BaseException, bool, type[Any], str | None]] = [
    # rules, exception, lease_lost, verdict type, outcome (StandDown) or reason (Fail)
    (SQL_LIKE, JobInterrupted(), False, StandDown, "lease_lost"),
    (SQL_LIKE, TimedOut(), False, StandDown, "lease_lost"),
    (SQL_LIKE, ValueError(), True, StandDown, "lease_lost"),
    (SQL_LIKE, ValueError(), False, RetryOrFail, None),
    (SQL_LIKE, SystemExit(), False, Propagate, None),
    (SQL_LIKE, PermanentFailure("UnknownTask: t"), False, Fail, "UnknownTask: t"),
    (RQ_LIKE, SoftLimit(), False, RetryOrFail, None),
    (RQ_LIKE, IdempotencyInProgress(), True, StandDown, "lease_lost"),
    (RQ_LIKE, KeyboardInterrupt(), False, RetryOrFail, None),
    (CELERY_LIKE, RetryAsked(), False, Retried, None),
    (CELERY_LIKE, SoftLimit(), False, RetryOrFail, None),
    (CELERY_LIKE, IdempotencyKeyMismatch("m"), False, Fail, "IdempotencyKeyMismatch: m"),
    (CELERY_LIKE, SystemExit(), False, RetryOrFail, None),
]


@pytest.mark.parametrize(("rules", "exc", "lease_lost", "kind", "detail"), ENGINE_TABLE)
def test_each_engines_rules_give_its_table(
    rules: Rules, exc: BaseException, lease_lost: bool, kind: type[Any], detail: str | None
) -> None:
    result = verdict(exc, rules, lease_lost=lease_lost)
    assert type(result) is kind
    if isinstance(result, StandDown):
        assert result.outcome == detail
    if isinstance(result, Fail):
        assert result.reason == detail


# --- the defer delay ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "rules", "backoff", "expected"),
    [
        (None, Rules(), 2.0, 2.0),  # unknown: the backoff
        (0.5, Rules(), 2.0, 0.5),  # the holder's claim expires sooner
        (9.0, Rules(), 2.0, 2.0),  # capped by the backoff
        (-1.0, Rules(), 2.0, 0.0),  # never in the past
        (0.0, Rules(), 2.0, 0.0),
        # Celery today: max(1, min(retry_after or 5, 60))
        (None, CELERY_LIKE, 5.0, 5.0),
        (0.0, CELERY_LIKE, 5.0, 5.0),
        (0.3, CELERY_LIKE, 5.0, 1.0),
        (30.0, CELERY_LIKE, 5.0, 30.0),
        (100.0, CELERY_LIKE, 5.0, 60.0),
        (-2.0, CELERY_LIKE, 5.0, 1.0),
    ],
)
def test_the_defer_delay(
    retry_after: float | None, rules: Rules, backoff: float, expected: float
) -> None:
    assert defer_delay(retry_after, rules, lambda: backoff) == expected


# --- the keeper ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recorder(ran: list[str], name: str, result: float | None = None) -> Callable[[], float | None]:
    def run() -> float | None:
        ran.append(name)
        return result

    return run


def test_the_cadences_are_defined_once() -> None:
    assert (HEARTBEAT_EVERY, HEALTH_EVERY) == (2.0, 5.0)


def test_the_keeper_runs_each_duty_at_start_then_at_its_cadence_in_order() -> None:
    clock, ran = FakeClock(), list[str]()
    keeper = Keeper(
        [Duty("beat", 2.0, recorder(ran, "beat")), Duty("health", 5.0, recorder(ran, "health"))],
        log=log,
        clock=clock,
        max_wait=10.0,
    )
    assert keeper.run_due() == 2.0
    assert ran == ["beat", "health"]
    clock.now += 1.9
    keeper.run_due()
    assert ran == ["beat", "health"]
    clock.now += 0.1  # 2.0
    assert keeper.run_due() == 2.0
    clock.now += 2.0  # 4.0
    assert keeper.run_due() == 1.0  # health is due at 5.0
    clock.now += 1.0  # 5.0
    keeper.run_due()
    assert ran == ["beat", "health", "beat", "beat", "health"]


def test_a_duty_runs_first_after_its_offset() -> None:
    clock, ran = FakeClock(), list[str]()
    keeper = Keeper([Duty("leases", 3.0, recorder(ran, "leases"), first=3.0)], log=log, clock=clock)
    keeper.run_due()
    assert ran == []
    clock.now += 3.0
    keeper.run_due()
    assert ran == ["leases"]


def test_a_duty_may_set_its_next_run() -> None:
    clock, ran = FakeClock(), list[str]()
    keeper = Keeper(
        [Duty("health", 5.0, recorder(ran, "health", result=0.5))], log=log, clock=clock
    )
    assert keeper.run_due() == 0.5
    clock.now += 0.5
    keeper.run_due()
    assert ran == ["health", "health"]


def test_a_duty_that_is_off_stays_due_and_does_not_make_the_keeper_spin() -> None:
    clock, ran, on = FakeClock(), list[str](), [False]
    keeper = Keeper(
        [
            Duty("scan", 1.0, recorder(ran, "scan"), when=lambda: on[0]),
            Duty("beat", 2.0, recorder(ran, "beat")),
        ],
        log=log,
        clock=clock,
        max_wait=10.0,
    )
    assert keeper.run_due() == 2.0  # the beat's cadence, not the stale scan's 0
    assert ran == ["beat"]
    clock.now += 0.5
    on[0] = True
    keeper.run_due()
    assert ran == ["beat", "scan"]


def test_a_duty_made_due_now_runs_at_the_next_wake_then_keeps_its_cadence() -> None:
    clock, ran = FakeClock(), list[str]()
    keeper = Keeper([Duty("health", 5.0, recorder(ran, "health"))], log=log, clock=clock)
    keeper.run_due()
    clock.now += 1.0
    keeper.run_soon("health")  # another thread needs it now
    keeper.run_due()
    assert ran == ["health", "health"]
    clock.now += 4.9  # the cadence goes on from the early run: next at 6.0, not at 5.0
    keeper.run_due()
    assert ran == ["health", "health"]
    clock.now += 0.1
    keeper.run_due()
    assert ran == ["health", "health", "health"]
    with pytest.raises(KeyError, match="nope"):
        keeper.run_soon("nope")


def test_the_wait_is_kept_between_its_bounds() -> None:
    clock = FakeClock()
    keeper = Keeper(
        [Duty("slow", 100.0, lambda: None), Duty("fast", 0.001, lambda: None)],
        log=log,
        clock=clock,
        min_wait=0.05,
        max_wait=1.0,
    )
    assert keeper.run_due() == 0.05
    lone = Keeper([Duty("slow", 100.0, lambda: None)], log=log, clock=clock, max_wait=1.0)
    assert lone.run_due() == 1.0


def test_a_failing_duty_is_reported_and_the_others_still_run() -> None:
    clock, ran = FakeClock(), list[str]()
    errors: list[tuple[str, str]] = []

    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("redis down")

    keeper = Keeper(
        [Duty("broken", 2.0, broken), Duty("beat", 2.0, recorder(ran, "beat"))],
        log=log,
        clock=clock,
        on_error=lambda duty, exc: errors.append((duty.name, str(exc))),
    )
    keeper.run_due()
    assert ran == ["broken", "beat"]
    assert errors == [("broken", "redis down")]
    clock.now += 2.0  # tried again at its cadence
    keeper.run_due()
    assert ran == ["broken", "beat", "broken", "beat"]


def test_a_failing_duty_is_logged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("redis down")

    keeper = Keeper([Duty("health", 5.0, broken)], log=log, clock=FakeClock())
    with caplog.at_level(logging.ERROR, logger=log.name):
        keeper.run_due()
    [record] = caplog.records
    assert record.getMessage() == "upkeep failed; trying again"
    assert (record.__dict__["event"], record.__dict__["duty"]) == ("upkeep_failed", "health")
    assert record.exc_info is not None


def test_duty_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Keeper([Duty("a", 1.0, lambda: None), Duty("a", 2.0, lambda: None)], log=log)


def test_the_keeper_thread_runs_duties_and_stops_at_once() -> None:
    ran = threading.Event()

    def beat() -> None:
        ran.set()

    # Nothing would be due for an hour: only the stop event can end the wait.
    keeper = Keeper([Duty("beat", 3600.0, beat)], log=log, max_wait=3600.0, name="test-keeper")
    keeper.start()
    assert ran.wait(10.0)
    assert keeper.stop(timeout=10.0)


def test_a_wake_runs_its_duties_at_once_and_leaves_the_others_to_their_cadence() -> None:
    """A signal handler's way to reach the keeper (rq: a SIGTERM wakes the dequeue at once),
    so that the duty needs no short cadence, and an idle keeper sleeps."""
    runs: list[str] = []
    first, woken = threading.Event(), threading.Event()

    def check_signals() -> None:
        runs.append("signals")
        if len(runs) > 1:
            woken.set()

    def beat() -> None:
        runs.append("beat")
        first.set()

    keeper = Keeper(
        [Duty("signals", 3600.0, check_signals), Duty("beat", 3600.0, beat)],
        log=log,
        max_wait=3600.0,
        wake_runs=("signals",),
    )
    keeper.start()
    assert first.wait(10.0)
    assert runs == ["signals", "beat"]
    keeper.wake()
    assert woken.wait(10.0)
    assert keeper.stop(timeout=10.0)  # stop() wakes it too: no hour-long wait
    assert runs == ["signals", "beat", "signals"]


def test_wake_runs_name_duties() -> None:
    with pytest.raises(ValueError, match="wake_runs names no duty"):
        Keeper([Duty("a", 1.0, lambda: None)], log=log, wake_runs=("b",))


def test_the_keeper_stops_on_an_engines_own_event() -> None:
    release_requested = threading.Event()
    ran = threading.Event()
    keeper = Keeper(
        [Duty("leases", 3600.0, ran.set)],
        log=log,
        stop_event=release_requested,
        max_wait=3600.0,
    )
    keeper.start()
    assert ran.wait(10.0)
    release_requested.set()
    assert keeper.stop(timeout=10.0)


def test_a_duty_may_stop_its_keeper() -> None:
    ran: list[str] = []
    keeper: Keeper

    def last() -> None:
        ran.append("last")
        keeper.stop()  # from the keeper's own thread: does not wait for itself

    keeper = Keeper([Duty("last", 1.0, last), Duty("never", 1.0, recorder(ran, "never"))], log=log)
    keeper.run()  # in this thread: returns once stopped
    assert ran == ["last"]
    assert keeper.stop()


# --- the release loop ---------------------------------------------------------------------------


def release_failed(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    keys = ("event", "error", "left", "job_id")
    return [
        (r.getMessage(), {k: r.__dict__[k] for k in keys if k in r.__dict__})
        for r in caplog.records
    ]


def test_release_each_counts_what_was_released_and_what_was_not() -> None:
    tally = release_each([1, 2, 3, 4], lambda n: n % 2 == 0, log=log)
    assert tally == ReleaseTally(released=2, not_released=2)


def test_release_each_logs_a_bad_item_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def release(ref: dict[str, str]) -> bool:
        if "token" not in ref:
            raise KeyError("token")
        if ref["token"] == "":
            raise ValueError("empty token")
        return True

    refs = [{"job_id": "a"}, {"token": ""}, {"token": "t"}]
    with caplog.at_level(logging.WARNING, logger=log.name):
        tally = release_each(refs, release, log=log, skip_on=(KeyError, ValueError))
    assert tally == ReleaseTally(released=1, failed=2)
    assert release_failed(caplog) == [
        ("bad delivery ref", {"event": "release_failed", "error": "KeyError('token')"}),
        ("bad delivery ref", {"event": "release_failed", "error": "empty token"}),
    ]


def test_release_each_gives_up_when_the_store_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tried: list[int] = []

    def release(n: int) -> bool:
        tried.append(n)
        if n == 2:
            raise StoreUnavailable("connection refused")
        return True

    with caplog.at_level(logging.WARNING, logger=log.name):
        tally = release_each([1, 2, 3, 4], release, log=log, give_up_on=(StoreUnavailable,))
    assert tried == [1, 2]
    assert tally == ReleaseTally(released=1, left=3)
    assert release_failed(caplog) == [
        (
            "cannot release in-flight jobs; their leases will expire instead",
            {"event": "release_failed", "error": "connection refused", "left": 3},
        )
    ]


def test_release_each_logs_with_the_engines_message_and_item_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def release(job_id: str) -> bool:
        if job_id == "b":
            raise ConnectionError("broker gone")
        return True

    message = "cannot release a message; crash recovery will"
    with caplog.at_level(logging.WARNING, logger=log.name):
        tally = release_each(
            ["a", "b", "c"],
            release,
            log=log,
            skip_on=(Exception,),
            skip_message=message,
            fields=lambda job_id: {"job_id": job_id},
        )
    assert tally == ReleaseTally(released=2, failed=1)
    assert release_failed(caplog) == [
        (message, {"event": "release_failed", "error": "broker gone", "job_id": "b"})
    ]


def test_release_each_lets_an_unexpected_error_through() -> None:
    def release(n: int) -> bool:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        release_each([1], release, log=log, give_up_on=(StoreUnavailable,), skip_on=(ValueError,))


def test_release_each_of_nothing_releases_nothing() -> None:
    assert release_each([], lambda item: True, log=log) == ReleaseTally()
