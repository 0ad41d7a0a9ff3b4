"""Idempotency keys without servers: fingerprints, keys, the decorator's semantics, the app.

The store is :class:`InMemoryIdempotencyStore` on a :class:`ManualClock`; the same store
semantics are checked against SQLite, PostgreSQL and Redis in
tests/integration/test_idempotency_contract.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import workerkit
from tests.support.native_worker import Harness, RecordingEvents, wait_until
from workerkit import events as events_module
from workerkit.app import App
from workerkit.errors import (
    ConfigurationError,
    IdempotencyClaimLost,
    IdempotencyError,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    LeaseLost,
)
from workerkit.idempotency import (
    IDEMPOTENCY_OUTCOMES,
    default_store,
    fingerprint,
    idempotency_of,
    idempotent,
    in_progress_expiry_for,
    outcome_of,
)
from workerkit.idempotency.redis import RedisIdempotencyStore
from workerkit.idempotency.sql import SqlIdempotencyStore
from workerkit.job import JobContext
from workerkit.settings import Settings
from workerkit.testing import InMemoryIdempotencyStore, InMemoryQueue, ManualClock

IP = 60.0  # in-progress expiry of the tests' tasks
RETENTION = 3600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_000_000.0)


@pytest.fixture
def store(clock: ManualClock) -> InMemoryIdempotencyStore:
    return InMemoryIdempotencyStore(clock=clock)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> RecordingEvents:
    """The events the decorator sends to the supervisor."""
    recorder = RecordingEvents()
    monkeypatch.setattr(events_module, "client", lambda role="executor": recorder)
    return recorder


def outcomes(sent: RecordingEvents) -> list[str]:
    return [e.outcome for e in sent.of_type(events_module.Idempotency)]


class Charges:
    """A task with a side effect the tests can count."""

    def __init__(self, store: InMemoryIdempotencyStore, **options: Any) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail_next = False
        self.during: Any = None  # called inside the run, for tests that interleave

        @idempotent(
            key="charge:{order_id}",
            store=store,
            in_progress_expiry=IP,
            retention=RETENTION,
            name="shop.charge",
            **options,
        )
        def charge(order_id: int, amount: int, currency: str = "EUR") -> dict[str, Any]:
            self.calls.append((order_id, amount))
            if self.during is not None:
                self.during()
            if self.fail_next:
                self.fail_next = False
                raise ConnectionError("payment gateway timed out")
            return {"order": order_id, "charged": amount, "currency": currency}

        self.charge = charge


# --- fingerprints --------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_canonical_json_independent_of_key_order() -> None:
    one = fingerprint("t", [1, (2, 3)], {"b": 1, "a": {"y": 2, "x": 1}})
    two = fingerprint("t", [1, [2, 3]], {"a": {"x": 1, "y": 2}, "b": 1})
    assert one == two
    assert len(one) == 64
    assert int(one, 16) >= 0


def test_fingerprint_differs_by_task_args_and_types() -> None:
    base = fingerprint("t", [], {"n": 1})
    assert fingerprint("u", [], {"n": 1}) != base
    assert fingerprint("t", [], {"n": 2}) != base
    assert fingerprint("t", [], {"n": "1"}) != base
    assert fingerprint("t", [1], {}) != base


def test_fingerprint_refuses_arguments_that_are_not_json() -> None:
    with pytest.raises(IdempotencyError, match="must be JSON"):
        fingerprint("t", [object()], {})
    with pytest.raises(IdempotencyError, match="must be JSON"):
        fingerprint("t", [float("nan")], {})


def test_positional_and_keyword_calls_of_one_call_share_a_fingerprint(
    store: InMemoryIdempotencyStore,
) -> None:
    charges = Charges(store)
    policy = idempotency_of(charges.charge)
    assert policy is not None
    by_position = policy.fingerprint_for((7, 100), {})
    by_name = policy.fingerprint_for((), {"amount": 100, "order_id": 7})
    assert by_position == by_name
    assert policy.fingerprint_for((7, 101), {}) != by_position


def test_a_new_parameter_with_a_default_keeps_old_fingerprints(
    store: InMemoryIdempotencyStore,
) -> None:
    # A deploy that adds an optional parameter must not turn redeliveries into mismatches.
    @idempotent(key="k:{n}", store=store, name="t")
    def before(n: int) -> None: ...

    @idempotent(key="k:{n}", store=store, name="t")
    def after(n: int, dry_run: bool = False) -> None: ...

    old, new = idempotency_of(before), idempotency_of(after)
    assert old is not None
    assert new is not None
    assert old.fingerprint_for((5,), {}) == new.fingerprint_for((5,), {})


def test_excluded_parameters_are_left_out_of_the_fingerprint(
    store: InMemoryIdempotencyStore,
) -> None:
    @idempotent(key="k:{n}", store=store, exclude=("trace",))
    def task(n: int, trace: object = None) -> None: ...

    policy = idempotency_of(task)
    assert policy is not None
    assert policy.fingerprint_for((1, object()), {}) == policy.fingerprint_for((1,), {})


# --- keys ----------------------------------------------------------------------------------


def test_template_key_is_filled_from_arguments_by_name_with_defaults(
    store: InMemoryIdempotencyStore,
) -> None:
    @idempotent(key="charge:{order_id}:{currency}", store=store)
    def charge(order_id: int, currency: str = "EUR", **extra: Any) -> None: ...

    policy = idempotency_of(charge)
    assert policy is not None
    assert policy.key_for((7,), {}) == "charge:7:EUR"
    assert policy.key_for((), {"order_id": 7, "currency": "USD", "note": "x"}) == "charge:7:USD"


def test_callable_key_gets_every_argument_by_name(store: InMemoryIdempotencyStore) -> None:
    seen: list[dict[str, Any]] = []

    def key(**arguments: Any) -> str:
        seen.append(arguments)
        return f"charge:{arguments['order_id']}"

    @idempotent(key=key, store=store)
    def charge(order_id: int, amount: int, currency: str = "EUR", **extra: Any) -> None: ...

    policy = idempotency_of(charge)
    assert policy is not None
    assert policy.key_for((7, 100), {"source": "api"}) == "charge:7"
    assert seen == [{"order_id": 7, "amount": 100, "currency": "EUR", "source": "api"}]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("charge:{customer}", "not a parameter"),
        ("charge:{}", "positional field"),
        ("charge:{0}", "positional field"),
        ("charge", "names no parameter"),
        ("charge:{order_id", "malformed"),
        ("", "non-empty"),
    ],
)
def test_a_bad_key_template_is_refused_when_the_task_is_defined(key: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):

        @idempotent(key=key)
        def charge(order_id: int) -> None: ...


def test_a_key_callable_that_returns_no_string_fails_the_run(
    store: InMemoryIdempotencyStore,
) -> None:
    @idempotent(key=lambda **_: "", store=store)
    def task() -> None: ...

    with pytest.raises(IdempotencyError, match="non-empty string"):
        task()


def test_async_functions_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="async"):

        @idempotent(key="k:{n}")
        async def task(n: int) -> None: ...


# --- the semantics table -------------------------------------------------------------------


def test_first_run_claims_runs_and_records_the_result(
    store: InMemoryIdempotencyStore, sent: RecordingEvents
) -> None:
    charges = Charges(store)
    assert charges.charge(7, 100) == {"order": 7, "charged": 100, "currency": "EUR"}
    assert charges.calls == [(7, 100)]
    record = store.get("charge:7")
    assert record is not None
    assert record.state == "completed"
    assert record.expires_in == pytest.approx(RETENTION)
    assert outcomes(sent) == ["claimed"]


def test_a_duplicate_does_not_run_and_returns_the_stored_result(
    store: InMemoryIdempotencyStore, sent: RecordingEvents
) -> None:
    charges = Charges(store)
    first = charges.charge(7, 100)
    again = charges.charge(order_id=7, amount=100)
    assert again == first
    assert charges.calls == [(7, 100)]
    assert outcomes(sent) == ["claimed", "replayed"]


def test_a_reused_key_with_other_arguments_fails_permanently_saying_so(
    store: InMemoryIdempotencyStore, sent: RecordingEvents
) -> None:
    charges = Charges(store)
    charges.charge(7, 100)
    with pytest.raises(IdempotencyKeyMismatch, match="already used with other arguments") as info:
        charges.charge(7, 250)
    assert info.value.key == "charge:7"
    assert charges.calls == [(7, 100)]
    assert outcomes(sent) == ["claimed", "mismatched"]


def test_a_run_while_a_live_run_holds_the_key_is_deferred(
    store: InMemoryIdempotencyStore, clock: ManualClock, sent: RecordingEvents
) -> None:
    charges = Charges(store)
    deferred: list[IdempotencyInProgress] = []

    def duplicate_arrives() -> None:
        clock.advance(10)
        with pytest.raises(IdempotencyInProgress) as info:
            charges.charge(7, 100)
        deferred.append(info.value)

    charges.during = duplicate_arrives
    charges.charge(7, 100)
    assert charges.calls == [(7, 100)]  # the duplicate did not run
    assert deferred[0].retry_after == pytest.approx(IP - 10)
    assert deferred[0].key == "charge:7"
    assert outcomes(sent) == ["claimed", "deferred"]
    # ... and once the first run completed, the duplicate's retry replays its result.
    charges.during = None
    assert charges.charge(7, 100)["charged"] == 100
    assert charges.calls == [(7, 100)]
    assert outcomes(sent)[-1] == "replayed"


def test_a_failed_run_forgets_its_claim_so_a_retry_runs(
    store: InMemoryIdempotencyStore, sent: RecordingEvents
) -> None:
    charges = Charges(store)
    charges.fail_next = True
    with pytest.raises(ConnectionError):
        charges.charge(7, 100)
    assert store.get("charge:7") is None
    assert charges.charge(7, 100)["charged"] == 100
    assert charges.calls == [(7, 100), (7, 100)]
    assert outcomes(sent) == ["claimed", "claimed"]


def test_a_release_or_interrupt_also_forgets_the_claim(store: InMemoryIdempotencyStore) -> None:
    @idempotent(key="k:{n}", store=store, in_progress_expiry=IP)
    def task(n: int) -> None:
        raise KeyboardInterrupt  # any BaseException: JobInterrupted, ReleaseJob...

    with pytest.raises(KeyboardInterrupt):
        task(1)
    assert store.get("k:1") is None


def test_an_expired_claim_is_taken_over_and_the_old_owner_cannot_complete(
    store: InMemoryIdempotencyStore, clock: ManualClock, sent: RecordingEvents
) -> None:
    charges = Charges(store)

    def stalls_past_ip_while_another_run_takes_over() -> None:
        clock.advance(IP + 1)
        charges.during = None
        assert charges.charge(7, 100)["charged"] == 100  # the takeover runs and completes

    charges.during = stalls_past_ip_while_another_run_takes_over
    with pytest.raises(IdempotencyClaimLost, match="was not recorded") as info:
        charges.charge(7, 100)
    assert isinstance(info.value, LeaseLost)  # engines treat it as a lost lease
    assert charges.calls == [(7, 100), (7, 100)]
    assert outcomes(sent) == ["claimed", "taken_over"]
    record = store.get("charge:7")
    assert record is not None
    assert record.state == "completed"
    assert record.takeovers == 1


def test_a_completed_key_is_forgotten_after_retention(
    store: InMemoryIdempotencyStore, clock: ManualClock, sent: RecordingEvents
) -> None:
    charges = Charges(store)
    charges.charge(7, 100)
    clock.advance(RETENTION + 1)
    charges.charge(7, 250)  # a new piece of work now: no mismatch
    assert charges.calls == [(7, 100), (7, 250)]
    assert outcomes(sent) == ["claimed", "claimed"]


def test_a_result_that_is_not_json_fails_the_run_and_drops_the_claim(
    store: InMemoryIdempotencyStore,
) -> None:
    @idempotent(key="k:{n}", store=store)
    def task(n: int) -> object:
        return object()

    with pytest.raises(IdempotencyError, match="must be JSON"):
        task(1)
    assert store.get("k:1") is None


def test_a_replayed_result_comes_back_as_json(store: InMemoryIdempotencyStore) -> None:
    @idempotent(key="k:{n}", store=store)
    def task(n: int) -> tuple[int, int]:
        return (n, n)

    assert task(1) == (1, 1)
    assert task(1) == [1, 1]


def test_events_name_the_job_context_task_and_queue(
    store: InMemoryIdempotencyStore, sent: RecordingEvents
) -> None:
    charges = Charges(store)
    context = JobContext(job_id="j1", task="shop.charge", queue="payments", attempt=1)
    with context.activate():
        charges.charge(7, 100)
    charges.charge(7, 100)
    assert outcome_of(context) == "claimed"
    with context.activate():
        charges.charge(7, 100)
    assert outcome_of(context) == "replayed"  # the engine reports a skipped duplicate
    events = sent.of_type(events_module.Idempotency)
    assert events[0] == events_module.Idempotency("shop.charge", "payments", "claimed")
    assert events[1].queue == ""
    assert {e.outcome for e in events} <= IDEMPOTENCY_OUTCOMES
    assert "idempotency" in events_module.EVENT_TYPES


def test_concurrent_threads_one_key_exactly_one_runs(store: InMemoryIdempotencyStore) -> None:
    ran: list[int] = []
    go = threading.Barrier(8)
    release = threading.Event()
    results: list[str] = []
    lock = threading.Lock()

    @idempotent(key="k:{n}", store=store, in_progress_expiry=IP)
    def task(n: int = 0) -> str:
        ran.append(1)
        release.wait(5)
        return "done"

    def worker() -> None:
        go.wait()
        try:
            outcome = task()
        except IdempotencyInProgress:
            outcome = "deferred"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(results) == 7)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(ran) == 1
    assert sorted(results) == ["deferred"] * 7 + ["done"]
    assert task() == "done"
    assert len(ran) == 1


# --- Ip, R and the store from the settings -------------------------------------------------


def test_ip_defaults_to_the_tasks_own_timeout_plus_30() -> None:
    assert in_progress_expiry_for(Settings(job_timeout=100)) == 130
    assert in_progress_expiry_for(Settings(job_timeout=100), timeout=900) == 930
    explicit = Settings(job_timeout=100, idempotency_in_progress_expiry=500)
    assert in_progress_expiry_for(explicit, timeout=900) == 500


def test_decorator_takes_ip_and_r_from_the_settings(store: InMemoryIdempotencyStore) -> None:
    settings = Settings(job_timeout=50, idempotency_retention=7200)

    @idempotent(key="k:{n}", store=store, settings=settings, timeout=20)
    def task(n: int) -> None: ...

    policy = idempotency_of(task)
    assert policy is not None
    assert policy.effective_in_progress_expiry() == 50
    assert policy.effective_retention() == 7200
    task(1)
    record = store.get("k:1")
    assert record is not None
    assert record.expires_in == pytest.approx(7200)


def test_default_store_follows_the_engine(tmp_path: Any) -> None:
    sql = default_store(Settings(engine="sql", database_url=f"sqlite:///{tmp_path}/a.db"))
    assert isinstance(sql, SqlIdempotencyStore)
    assert default_store(Settings(engine="sql", database_url=f"sqlite:///{tmp_path}/a.db")) is sql
    for engine in ("rq", "celery"):
        redis_store = default_store(Settings(engine=engine, redis_url="redis://127.0.0.1:1/3"))
        assert isinstance(redis_store, RedisIdempotencyStore)


def test_bad_durations_are_refused_at_definition() -> None:
    with pytest.raises(ConfigurationError, match="in_progress_expiry"):

        @idempotent(key="k:{n}", in_progress_expiry=0)
        def task(n: int) -> None: ...


# --- native tasks --------------------------------------------------------------------------


def test_idempotency_key_on_a_native_task_marks_it_idempotent_for_the_budget() -> None:
    app = App(backend=InMemoryQueue(), settings=Settings())

    @app.task(idempotency_key=lambda order_id, **_: f"charge:{order_id}", timeout=600)
    def charge(order_id: int) -> int:
        return order_id

    @app.task
    @workerkit.idempotent(key="refund:{order_id}")
    def refund(order_id: int) -> None: ...

    @app.task
    def plain() -> None: ...

    timings = {t.name: t for t in app.task_timings()}
    assert timings[charge.name].idempotent
    assert timings[refund.name].idempotent
    assert not timings[plain.name].idempotent
    policy = idempotency_of(charge.fn)
    assert policy is not None
    assert policy.name == charge.name
    assert policy.effective_in_progress_expiry() == 630  # this task's J + 30
    assert isinstance(app.idempotency_store, InMemoryIdempotencyStore)


def test_idempotency_key_and_the_decorator_together_are_refused() -> None:
    app = App(backend=InMemoryQueue(), settings=Settings())
    with pytest.raises(ConfigurationError, match="not both"):

        @app.task(idempotency_key="a:{n}")
        @workerkit.idempotent(key="b:{n}")
        def task(n: int) -> None: ...


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    if h.worker is not None and h.thread is not None and h.thread.is_alive():
        h.worker.request_release()
        h.thread.join(5)


def test_native_worker_runs_a_duplicate_job_once_and_replays_its_result(
    harness: Harness,
) -> None:
    @harness.app.task(idempotency_key="charge:{order_id}")
    def charge(order_id: int, amount: int) -> dict[str, int]:
        harness.log.append(f"charged {order_id}")
        return {"order": order_id, "amount": amount}

    first = charge.enqueue(7, 100)
    harness.start()
    wait_until(lambda: harness.state(first) == "succeeded")
    second = charge.enqueue(order_id=7, amount=100)
    wait_until(lambda: harness.state(second) == "succeeded")
    assert harness.log == ["charged 7"]
    results = [harness.queue.get_job(i)["result"] for i in (first, second)]  # type: ignore[index]
    assert results == [{"order": 7, "amount": 100}] * 2
    assert harness.outcomes() == ["succeeded", "skipped_duplicate"]


def test_native_worker_defers_while_a_live_attempt_holds_the_key_without_using_attempts() -> None:
    harness = Harness(concurrency=2)
    holding = threading.Event()
    finish = threading.Event()

    @harness.app.task(idempotency_key="report:{day}", max_attempts=1, retry_backoff=0.05)
    def report(day: str) -> str:
        harness.log.append(f"built {day}")
        holding.set()
        finish.wait(10)
        return f"report {day}"

    first = report.enqueue("mon")
    worker = harness.start()
    assert holding.wait(5)
    second = report.enqueue("mon")
    wait_until(lambda: "deferred" in harness.outcomes())
    waiting = harness.queue.get_job(second)
    assert waiting is not None
    assert (waiting["state"], waiting["attempts"]) == ("ready", 0)  # max_attempts=1, not used up
    finish.set()
    wait_until(lambda: harness.state(first) == "succeeded" and harness.state(second) == "succeeded")
    worker.stop_fetching()
    assert harness.join() == 0
    assert harness.log == ["built mon"]
    assert harness.queue.get_job(second)["result"] == "report mon"  # type: ignore[index]
    assert harness.outcomes()[-1] == "skipped_duplicate"


def test_native_worker_fails_a_mismatched_key_at_once_without_retrying(
    harness: Harness,
) -> None:
    @harness.app.task(idempotency_key="charge:{order_id}", max_attempts=5, retry_backoff=0.01)
    def charge(order_id: int, amount: int) -> None:
        harness.log.append(f"charged {order_id} {amount}")

    first = charge.enqueue(7, 100)
    harness.start()
    wait_until(lambda: harness.state(first) == "succeeded")
    second = charge.enqueue(7, 250)
    wait_until(lambda: harness.state(second) == "failed")
    job = harness.queue.get_job(second)
    assert job is not None
    assert job["attempts"] == 1
    assert "IdempotencyKeyMismatch" in job["last_error"]
    assert "already used with other arguments" in job["last_error"]
    assert harness.log == ["charged 7 100"]
