"""The SQL idempotency store when its database connection is cut: killed sessions, a restart.

Every write (claim, complete, forget) is retried while the database is unreachable, within the
key's claim as the local clock bounds it (complete also past it: the owner token decides), so a
run whose body is done records its result once the database answers again, and a duplicate
replays it instead of running the body a second time. A real PostgreSQL: the shared one for
killed sessions (``pg_terminate_backend``), a private one for the restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.pg_sessions import kill_sessions
from tests.support.servers import PostgresServer, start_postgres
from tests.support.suite import start_or_skip
from workerkit.engines.sql import upgrade
from workerkit.errors import IdempotencyClaimLost
from workerkit.idempotency import idempotent
from workerkit.idempotency.sql import SqlIdempotencyStore
from workerkit.job import JobContext

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LONG = 60.0  # an Ip nothing outlives, however slow the machine
DOWN_FOR = 2.0  # the restart: shorter than LONG, longer than a few retries


@pytest.fixture
def store(postgres_url: str) -> Iterator[SqlIdempotencyStore]:
    made = SqlIdempotencyStore(postgres_url)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def restartable() -> Iterator[list[PostgresServer]]:
    """A private PostgreSQL that keeps its data across a restart; [0] is the one running now."""
    holder = [start_or_skip(start_postgres)]
    try:
        yield holder
    finally:
        holder[0].stop()


class Runs:
    """An idempotent function whose body calls ``before_return`` (the fault) and counts runs."""

    def __init__(
        self,
        store: SqlIdempotencyStore,
        before_return: Callable[[], object],
        *,
        in_progress_expiry: float = LONG,
    ) -> None:
        self.store = store
        self.before_return = before_return
        self.bodies = 0
        self.tokens: list[str] = []

        @idempotent("outage:{n}", store=store, in_progress_expiry=in_progress_expiry)
        def charge(n: int) -> dict[str, Any]:
            self.bodies += 1
            record = store.get(f"outage:{n}")
            assert record is not None
            assert record.state == "in_progress"
            self.tokens.append(record.owner_token)
            self.before_return()
            return {"receipt": n}

        self.charge = charge

    def assert_completed_once(self, n: int) -> None:
        record = self.store.get(f"outage:{n}")
        assert record is not None
        assert record.state == "completed", record
        assert record.owner_token == self.tokens[0], "completed by another attempt"
        assert self.charge(n) == {"receipt": n}  # a second attempt replays the result
        assert self.bodies == 1


def test_complete_after_a_killed_session_is_recorded_by_the_same_attempt(
    store: SqlIdempotencyStore, postgres_url: str
) -> None:
    killed: list[int] = []
    runs = Runs(store, lambda: killed.append(kill_sessions(postgres_url)))
    assert runs.charge(1) == {"receipt": 1}
    assert killed[0] >= 1  # the store's own session was cut right before complete()
    runs.assert_completed_once(1)


def charge_across_a_restart(
    holder: list[PostgresServer], n: int, *, in_progress_expiry: float = LONG
) -> Runs:
    """Run ``charge(n)`` in a job (deadline 30 s) whose body stops the database just before
    it returns; start the database again ``DOWN_FOR`` s later (from this thread: the server
    dies with the thread that started it) while complete() is retrying; the runs."""
    url = holder[0].url()
    upgrade(url)
    stopped = threading.Event()

    def stop_database() -> None:
        holder[0].process.stop()  # down now: complete() runs while the database is gone
        stopped.set()

    store = SqlIdempotencyStore(url)
    runs = Runs(store, stop_database, in_progress_expiry=in_progress_expiry)
    outcome: list[object] = []

    def run_job() -> None:
        job = JobContext(
            job_id=f"job-{n}", task="charge", queue="q", attempt=1, deadline=time.time() + 30
        )
        try:
            with job.activate():
                outcome.append(runs.charge(n))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_job)
    thread.start()
    try:
        assert stopped.wait(30)
        time.sleep(DOWN_FOR)  # the outage itself, as restart_postgres(down_for=...)
    finally:
        old = holder[0]
        holder[0] = start_postgres(port=old.port, directory=old.directory)
        thread.join(30)
    assert outcome == [{"receipt": n}]
    return runs


def test_complete_across_a_short_restart_is_recorded_by_the_same_attempt(
    restartable: list[PostgresServer],
) -> None:
    runs = charge_across_a_restart(restartable, 2)
    try:
        runs.assert_completed_once(2)
    finally:
        runs.store.close()


def test_complete_past_its_claim_lands_when_nobody_took_the_key(
    restartable: list[PostgresServer],
) -> None:
    # Ip (1 s) runs out while the database is down (2 s): nobody could take the key over, so
    # the late completion still matches the owner token and is recorded.
    runs = charge_across_a_restart(restartable, 3, in_progress_expiry=1.0)
    try:
        record = runs.store.get("outage:3")
        assert record is not None
        assert record.state == "completed"
        assert record.owner_token == runs.tokens[0]
    finally:
        runs.store.close()


def test_a_key_taken_over_meanwhile_still_fences_the_retried_complete(
    store: SqlIdempotencyStore, postgres_url: str
) -> None:
    other = SqlIdempotencyStore(postgres_url)

    def taken_over_then_killed() -> None:
        # Our claim (Ip 0.3 s) expires; another attempt takes the key, then our session dies.
        while (record := store.get("outage:4")) is not None and record.expires_in > 0:
            threading.Event().wait(0.05)
        assert other.claim("outage:4", "other-fp", in_progress_expiry=LONG).owned
        kill_sessions(postgres_url)

    try:
        runs = Runs(store, taken_over_then_killed, in_progress_expiry=0.3)
        with pytest.raises(IdempotencyClaimLost):
            runs.charge(4)
        record = store.get("outage:4")
        assert record is not None
        assert record.state == "in_progress"
        assert record.owner_token != runs.tokens[0]
    finally:
        other.close()


def test_claim_and_forget_after_killed_sessions(
    store: SqlIdempotencyStore, postgres_url: str
) -> None:
    assert store.get("outage:5") is None  # a pooled connection, killed next
    kill_sessions(postgres_url)
    claim = store.claim("outage:5", "fp", in_progress_expiry=LONG)
    assert claim.owned
    assert claim.token is not None
    kill_sessions(postgres_url)
    assert store.forget("outage:5", claim.token)
    assert store.get("outage:5") is None  # a retry may claim at once, not wait out Ip
