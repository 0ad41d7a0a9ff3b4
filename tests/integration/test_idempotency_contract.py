"""One contract for every idempotency store: in memory, SQLite, PostgreSQL and Redis.

Each test runs against all four. ``memory`` expires records by advancing a
:class:`ManualClock`; the real stores use short expiries and poll the record until the *store's*
clock says it expired (never a fixed sleep, never the test machine's clock). A behaviour that
only one store has is a bug in the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import servers
from tests.support.suite import start_or_skip
from workerkit.engines.sql import upgrade
from workerkit.errors import IdempotencyInProgress, SchemaOutOfDate
from workerkit.idempotency import IdempotencyStore, idempotent
from workerkit.idempotency.redis import RedisIdempotencyStore
from workerkit.idempotency.sql import SqlIdempotencyStore
from workerkit.testing import InMemoryIdempotencyStore, ManualClock

REPO = Path(__file__).resolve().parents[2]
LONG = 60.0  # Ip or R where nothing may expire, however slow the machine
SHORT = 0.3  # Ip or R that a test lets expire on the store's clock
FP = "f" * 64
OTHER_FP = "0" * 64


@dataclass
class Backend:
    """How a test reaches one store: store objects on one storage, and expiry."""

    kind: str
    open: Callable[[], IdempotencyStore]  # a new store object (another worker) on the same data
    expire: Callable[[IdempotencyStore, str], None]  # returns once the key's record expired
    spec: str | None = None  # for tests/support/idempotency_proc.py; None: in-process only
    opened: list[IdempotencyStore] = field(default_factory=list)

    def store(self) -> IdempotencyStore:
        store = self.open()
        self.opened.append(store)
        return store


def _wait_for_store_clock(store: IdempotencyStore, key: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        record = store.get(key)
        if record is None or record.expires_in <= 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"record {key!r} did not expire: {record}")
        time.sleep(min(0.01, record.expires_in))


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        clock = ManualClock()
        shared = InMemoryIdempotencyStore(clock=clock)

        def advance(store: IdempotencyStore, key: str) -> None:
            record = store.get(key)
            if record is not None and record.expires_in > 0:
                clock.advance(record.expires_in + 0.001)

        made = Backend(kind, lambda: shared, advance)
    elif kind == "redis":
        url: str = request.getfixturevalue("redis_url")
        made = Backend(
            kind, lambda: RedisIdempotencyStore.from_url(url), _wait_for_store_clock, f"redis:{url}"
        )
    else:
        url = request.getfixturevalue(f"{kind}_url")
        upgrade(url)  # the PostgreSQL template is migrated already; a SQLite file is new
        made = Backend(kind, lambda: SqlIdempotencyStore(url), _wait_for_store_clock, f"sql:{url}")
    try:
        yield made
    finally:
        for store in made.opened:
            store.close()


# --- claim, replay, mismatch, defer --------------------------------------------------------


def test_a_new_key_is_claimed_in_progress_for_ip(backend: Backend) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert claim.outcome == "claimed"
    assert claim.owned
    assert claim.token
    record = store.get("k")
    assert record is not None
    assert (record.state, record.fingerprint, record.owner_token) == (
        "in_progress",
        FP,
        claim.token,
    )
    assert 0 < record.expires_in <= LONG
    assert record.expires_in > LONG - 10
    assert record.result_json is None
    assert record.takeovers == 0
    assert store.get("other") is None


def test_a_completed_key_replays_its_result_to_every_store_object(backend: Backend) -> None:
    first, second = backend.store(), backend.store()
    claim = first.claim("k", FP, in_progress_expiry=LONG)
    assert claim.token is not None
    assert first.complete("k", claim.token, '{"charged":100}', retention=LONG)
    again = second.claim("k", FP, in_progress_expiry=LONG)
    assert again.outcome == "replay"
    assert not again.owned
    assert again.token is None
    assert json.loads(again.result_json or "") == {"charged": 100}
    record = second.get("k")
    assert record is not None
    assert record.state == "completed"
    assert record.result_json == '{"charged":100}'
    assert LONG - 10 < record.expires_in <= LONG


def test_a_null_result_replays_as_null(backend: Backend) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert claim.token is not None
    assert store.complete("k", claim.token, "null", retention=LONG)
    assert store.claim("k", FP, in_progress_expiry=LONG).result_json == "null"


def test_another_fingerprint_is_a_mismatch_whether_completed_or_in_progress(
    backend: Backend,
) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert store.claim("k", OTHER_FP, in_progress_expiry=LONG).outcome == "mismatch"
    assert claim.token is not None
    assert store.complete("k", claim.token, "1", retention=LONG)
    mismatch = store.claim("k", OTHER_FP, in_progress_expiry=LONG)
    assert mismatch.outcome == "mismatch"
    assert mismatch.result_json is None
    record = store.get("k")
    assert record is not None
    assert (record.fingerprint, record.result_json) == (FP, "1")  # untouched


def test_a_live_claim_defers_others_with_the_time_it_has_left(backend: Backend) -> None:
    first, second = backend.store(), backend.store()
    claim = first.claim("k", FP, in_progress_expiry=LONG)
    deferred = second.claim("k", FP, in_progress_expiry=LONG)
    assert deferred.outcome == "in_progress"
    assert deferred.token is None
    assert deferred.retry_after is not None
    assert LONG - 10 < deferred.retry_after <= LONG
    record = first.get("k")
    assert record is not None
    assert record.owner_token == claim.token  # the deferred claim changed nothing


# --- failure, takeover, fencing, retention -------------------------------------------------


def test_forget_deletes_only_the_owners_claim(backend: Backend) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert claim.token is not None
    assert not store.forget("k", "not-the-token")
    assert store.get("k") is not None
    assert store.forget("k", claim.token)
    assert store.get("k") is None
    assert not store.forget("k", claim.token)
    assert store.claim("k", FP, in_progress_expiry=LONG).outcome == "claimed"


def test_forget_never_deletes_a_completed_result(backend: Backend) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert claim.token is not None
    assert store.complete("k", claim.token, "1", retention=LONG)
    assert not store.forget("k", claim.token)
    assert store.claim("k", FP, in_progress_expiry=LONG).outcome == "replay"


def test_an_expired_claim_is_taken_over_and_the_old_owner_is_fenced_out(backend: Backend) -> None:
    old_worker, new_worker = backend.store(), backend.store()
    old = old_worker.claim("k", FP, in_progress_expiry=SHORT)
    assert old.token is not None
    backend.expire(new_worker, "k")

    new = new_worker.claim("k", FP, in_progress_expiry=LONG)
    assert new.outcome == "taken_over"
    assert new.owned
    assert new.token not in (None, old.token)
    # The old owner comes back: its completion and its forget change nothing.
    assert not old_worker.complete("k", old.token, '"stale"', retention=LONG)
    assert not old_worker.forget("k", old.token)
    record = new_worker.get("k")
    assert record is not None
    assert (record.state, record.owner_token, record.takeovers) == ("in_progress", new.token, 1)

    assert new.token is not None
    assert new_worker.complete("k", new.token, '"fresh"', retention=LONG)
    assert not old_worker.complete("k", old.token, '"stale"', retention=LONG)
    assert old_worker.claim("k", FP, in_progress_expiry=LONG).result_json == '"fresh"'


def test_an_expired_claim_nobody_took_over_may_still_complete(backend: Backend) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=SHORT)
    assert claim.token is not None
    backend.expire(store, "k")
    assert store.complete("k", claim.token, "1", retention=LONG)
    assert store.claim("k", FP, in_progress_expiry=LONG).outcome == "replay"


def test_a_result_is_recorded_once(backend: Backend) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert claim.token is not None
    assert store.complete("k", claim.token, "1", retention=LONG)
    assert not store.complete("k", claim.token, "2", retention=LONG)
    assert store.claim("k", FP, in_progress_expiry=LONG).result_json == "1"


def test_a_completed_key_is_forgotten_after_retention(backend: Backend) -> None:
    store = backend.store()
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert claim.token is not None
    assert store.complete("k", claim.token, "1", retention=SHORT)
    backend.expire(store, "k")
    # A new piece of work may use the key now, with any arguments; it is a fresh claim.
    fresh = store.claim("k", OTHER_FP, in_progress_expiry=LONG)
    assert fresh.outcome == "claimed"
    record = store.get("k")
    assert record is not None
    assert (record.fingerprint, record.takeovers, record.result_json) == (OTHER_FP, 0, None)


def test_zero_or_negative_durations_are_refused(backend: Backend) -> None:
    store = backend.store()
    with pytest.raises(ValueError, match="in_progress_expiry"):
        store.claim("k", FP, in_progress_expiry=0)
    claim = store.claim("k", FP, in_progress_expiry=LONG)
    assert claim.token is not None
    with pytest.raises(ValueError, match="retention"):
        store.complete("k", claim.token, "1", retention=-1)


def test_keys_are_opaque_strings(backend: Backend) -> None:
    store = backend.store()
    for key in ("charge:7", "k with spaces", "ключ/ü/{x}", "x" * 500, "'; DROP TABLE x; --"):
        claim = store.claim(key, FP, in_progress_expiry=LONG)
        assert claim.outcome == "claimed", key
        assert claim.token is not None
        assert store.complete(key, claim.token, json.dumps(key), retention=LONG)
        assert store.claim(key, FP, in_progress_expiry=LONG).result_json == json.dumps(key)


# --- races ---------------------------------------------------------------------------------


def test_race_threads_exactly_one_claims(backend: Backend) -> None:
    stores = [backend.store() for _ in range(6)]
    start = threading.Barrier(len(stores))
    claims: list[str] = []
    lock = threading.Lock()

    def claim(store: IdempotencyStore) -> None:
        start.wait()
        outcome = store.claim("k", FP, in_progress_expiry=LONG).outcome
        with lock:
            claims.append(outcome)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(claims) == ["claimed"] + ["in_progress"] * 5


def test_race_threads_one_runs_the_other_defers_then_replays(backend: Backend) -> None:
    ran: list[str] = []
    returned: dict[str, Any] = {}
    deferred: list[str] = []
    start = threading.Barrier(2)
    both_claimed = threading.Event()

    def worker(name: str) -> None:
        @idempotent(
            key="charge:{order_id}",
            store=backend.store(),
            name="shop.charge",
            in_progress_expiry=LONG,
            retention=LONG,
        )
        def charge(order_id: int) -> dict[str, Any]:
            ran.append(name)
            both_claimed.wait(10)  # hold the key until the other worker has tried it
            return {"charged_by": name}

        start.wait()
        while True:
            try:
                returned[name] = charge(7)
                return
            except IdempotencyInProgress:
                deferred.append(name)
                both_claimed.set()
                time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(ran) == 1
    (loser,) = {"a", "b"} - set(ran)
    assert deferred
    assert set(deferred) == {loser}
    assert returned["a"] == returned["b"] == {"charged_by": ran[0]}


def test_race_processes_one_runs_the_other_defers_then_replays(
    backend: Backend, tmp_path: Path
) -> None:
    if backend.spec is None:
        pytest.skip("an in-memory store is not shared between processes")
    go = tmp_path / "go"
    journals = [tmp_path / f"journal-{n}.jsonl" for n in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.idempotency_proc", backend.spec, "race-key",
             str(journal), "race", "--go", str(go)],
            cwd=REPO,
        )
        for journal in journals
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not all(_events(j, "ready") for j in journals):
            assert time.monotonic() < deadline, "the racers did not start"
            assert all(p.poll() is None for p in procs), "a racer died"
            time.sleep(0.01)
        go.touch()
        for proc in procs:
            assert proc.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ran = [j for j in journals if _events(j, "running")]
    assert len(ran) == 1, "exactly one process runs the task"
    (loser,) = set(journals) - set(ran)
    assert _events(loser, "deferred")
    assert not _events(ran[0], "deferred")
    [winner_return] = _events(ran[0], "returned")
    [loser_return] = _events(loser, "returned")
    assert winner_return["ran"] is True
    assert loser_return["ran"] is False
    assert loser_return["result"] == winner_return["result"]
    assert winner_return["result"]["by"] == winner_return["pid"]


def _events(journal: Path, event: str) -> list[dict[str, Any]]:
    if not journal.exists():
        return []
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["event"] == event]


# --- SQL only: purge and the schema --------------------------------------------------------


def test_sql_purge_deletes_only_expired_records(backend: Backend) -> None:
    if backend.kind not in ("sqlite", "postgres", "memory"):
        pytest.skip("Redis expires records by itself")
    store = backend.store()
    assert isinstance(store, SqlIdempotencyStore | InMemoryIdempotencyStore)
    store.claim("short", FP, in_progress_expiry=SHORT)
    store.claim("long", FP, in_progress_expiry=LONG)
    backend.expire(store, "short")
    assert store.purge_expired() == 1
    assert store.get("short") is None
    assert store.get("long") is not None


def test_sql_store_without_the_table_says_to_upgrade(sqlite_url: str) -> None:
    store = SqlIdempotencyStore(sqlite_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="workerkit db upgrade"):
            store.claim("k", FP, in_progress_expiry=LONG)
    finally:
        store.close()


def test_a_redis_claim_rides_out_a_short_outage() -> None:
    # Redis gone for a moment (a restart, a failover) as a job claims its key: the claim is
    # tried again, reconnecting, instead of failing a job whose body has not run.
    server = start_or_skip(servers.start_redis)
    store = RedisIdempotencyStore.from_url(server.url())
    claims: list[str] = []
    try:
        assert store.claim("before", "fp", in_progress_expiry=30).outcome == "claimed"
        server.process.stop()
        claiming = threading.Thread(
            target=lambda: claims.append(store.claim("during", "fp", in_progress_expiry=30).outcome)
        )
        claiming.start()
        server = servers.start_redis(port=server.port, directory=server.directory)
        claiming.join(10)
        assert claims == ["claimed"]
    finally:
        store.close()
        server.stop()
