"""The SQL scheduler store on SQLite and PostgreSQL: what only a real database can show.

The contract every store shares is in tests/support/scheduler_contract.py (subclassed below);
here: the fire and its job commit together (a process SIGKILLed between the two leaves neither),
a change of leader cannot slip between a fire's epoch check and its commit, the job carries its
schedule and fire time into ``current_job()`` in the SQL worker, ``open_scheduler``, bounded
lock waits (a dead leader's session cannot stall the standbys), and namespaces.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from tests.support.scheduler_contract import Enqueued, SchedulerStoreContract
from tests.support.servers import PostgresServer, start_postgres
from tests.support.sql_sched_proc import PATIENT, TICK, tick_schedule
from tests.support.suite import start_or_skip
from workerkit.app import App
from workerkit.engines.sql import upgrade
from workerkit.engines.sql.queue import SqlQueue
from workerkit.engines.sql.scheduling import SqlSchedulerStore, open_scheduler
from workerkit.errors import ConfigurationError, SchemaOutOfDate, StoreUnavailable
from workerkit.job import current_job
from workerkit.scheduler.contract import FireOutcome, Lease, Schedule, fire_job_id
from workerkit.settings import Settings
from workerkit.testing import run_jobs

REPO = Path(__file__).resolve().parents[2]
FIRE_TIME = 1_800_000_000.0  # any fire time: the store never compares it with a clock
WAIT = 20.0  # generous bound for a subprocess or a backend to reach a state


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def url(database_url: str) -> str:
    if database_url.startswith("sqlite"):
        upgrade(database_url)  # the PostgreSQL copies come migrated from the template
    return database_url


@pytest.fixture
def open_store(url: str) -> Iterator[Callable[[], SqlSchedulerStore]]:
    opened: list[SqlSchedulerStore] = []

    def make() -> SqlSchedulerStore:
        store = SqlSchedulerStore(url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def leader(open_store: Callable[[], SqlSchedulerStore]) -> tuple[SqlSchedulerStore, Lease]:
    """A store whose lease is held (60 s) and whose tick schedule is registered."""
    store = open_store()
    lease = store.acquire("leader", 60)
    assert lease is not None
    assert store.register(lease, [tick_schedule()])
    return store, lease


def _jobs(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, queue, task, payload FROM workerkit_jobs"))
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def _records(url: str) -> list[tuple[str, int]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT schedule, fire_ms FROM workerkit_scheduler_fires")
            return [tuple(row) for row in conn.execute(query)]
    finally:
        engine.dispose()


class TestSqlSchedulerStoreContract(SchedulerStoreContract):
    """The contract every store shares, on SQLite and on PostgreSQL."""

    @pytest.fixture
    def store(self, open_store: Callable[[], SqlSchedulerStore]) -> SqlSchedulerStore:
        return open_store()

    @pytest.fixture
    def enqueued(self, url: str) -> Callable[[], list[Enqueued]]:
        def read() -> list[Enqueued]:
            found = []
            for job in _jobs(url):
                payload = json.loads(job["payload"])
                found.append(
                    Enqueued(
                        job_id=job["id"],
                        schedule=payload["schedule"],
                        fire_time=payload["fire_time"],
                        task=job["task"],
                        args=tuple(payload["args"]),
                        kwargs=payload["kwargs"],
                        queue=job["queue"],
                    )
                )
            return found

        return read


def test_a_fire_records_itself_and_enqueues_one_job_carrying_its_origin(
    url: str, leader: tuple[SqlSchedulerStore, Lease], open_store: Callable[[], SqlSchedulerStore]
) -> None:
    store, lease = leader
    standby = open_store()
    assert store.fire(tick_schedule(), FIRE_TIME, epoch=lease.epoch, reason="on_time") == (
        FireOutcome.FIRED
    )
    assert standby.fire(tick_schedule(), FIRE_TIME, epoch=None, reason="standby") == (
        FireOutcome.ALREADY_FIRED
    )
    [job] = _jobs(url)
    assert job["id"] == fire_job_id(TICK, FIRE_TIME)
    assert (job["queue"], job["task"]) == ("q", "tests.tick")
    assert json.loads(job["payload"]) == {
        "args": [1],
        "kwargs": {},
        "schedule": TICK,
        "fire_time": FIRE_TIME,
    }
    last = standby.states([TICK])[TICK].last_fire
    assert last is not None
    assert (last.fire_time, last.job_id, last.reason) == (FIRE_TIME, job["id"], "on_time")


def test_the_sql_worker_gives_the_job_its_schedule_and_fire_time(
    url: str, leader: tuple[SqlSchedulerStore, Lease]
) -> None:
    store, lease = leader
    app = App(url, settings=Settings(database_url=url))
    seen: list[tuple[str | None, float | None, int]] = []

    @app.task(name="tests.tick", queue="q")
    def tick(n: int) -> None:
        seen.append((current_job().schedule, current_job().fire_time, n))

    assert store.fire(tick_schedule(), FIRE_TIME, epoch=lease.epoch, reason="on_time") == (
        FireOutcome.FIRED
    )
    assert run_jobs(app)["succeeded"] == 1
    assert seen == [(TICK, FIRE_TIME, 1)]


def test_an_old_leaders_writes_are_refused_once_another_replica_took_over(
    open_store: Callable[[], SqlSchedulerStore],
) -> None:
    old, new = open_store(), open_store()
    old_lease = old.acquire("old", 0.5)
    assert old_lease is not None
    assert old.register(old_lease, [tick_schedule()])
    assert new.acquire("new", 60) is None  # the old leader's lease is live
    _wait_for(lambda: new.leader() is None, "the old lease to expire on the database clock")
    new_lease = new.acquire("new", 60)
    assert new_lease is not None
    assert new_lease.epoch == old_lease.epoch + 1

    # The old leader (a paused process that woke up) still thinks it leads: every fenced write
    # is refused and nothing is enqueued; the new leader's fire of the same time goes through.
    assert old.fire(tick_schedule(), FIRE_TIME, epoch=old_lease.epoch, reason="on_time") == (
        FireOutcome.NOT_LEADER
    )
    assert old.renew(old_lease, 60) is None
    assert not old.register(old_lease, [])
    assert old.prune(old_lease, FIRE_TIME + 10) == 0
    assert new.fire(tick_schedule(), FIRE_TIME, epoch=new_lease.epoch, reason="on_time") == (
        FireOutcome.FIRED
    )
    assert new.states()[TICK].fingerprint == tick_schedule().fingerprint()  # not unregistered


def test_missing_tables_say_to_run_the_upgrade(sqlite_url: str) -> None:
    store = SqlSchedulerStore(sqlite_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="workerkit db upgrade"):
            store.acquire("a", 10)
    finally:
        store.close()


# --- the fire and its job commit together -------------------------------------------------


def _spawn_fire(url: str, marker: Path, *, block: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.support.sql_sched_proc", url, repr(FIRE_TIME)]
    argv += [str(marker)] + (["--block"] if block else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, cwd=REPO, env=env)


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=WAIT)


def _fire_again_fires_once(url: str, store: SqlSchedulerStore) -> None:
    assert _records(url) == []
    assert _jobs(url) == []
    assert store.fire(tick_schedule(), FIRE_TIME, epoch=None, reason="standby") == (
        FireOutcome.FIRED
    )
    assert [job["id"] for job in _jobs(url)] == [fire_job_id(TICK, FIRE_TIME)]


def test_sqlite_a_fire_killed_between_its_record_and_its_job_leaves_neither(
    sqlite_url: str, tmp_path: Path
) -> None:
    upgrade(sqlite_url)
    store = SqlSchedulerStore(sqlite_url)
    lease = store.acquire("leader", 60)
    assert lease is not None
    assert store.register(lease, [tick_schedule()])
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        # Runs inside the fire's transaction, after the record's INSERT (the statement
        # before): the process blocks there until it is killed.
        conn.exec_driver_sql(
            "CREATE TRIGGER wk_block_jobs BEFORE INSERT ON workerkit_jobs "
            "BEGIN SELECT wk_block(); END"
        )
    marker = tmp_path / "marker"
    process = _spawn_fire(sqlite_url, marker, block=True)
    try:
        _wait_for(lambda: marker.exists() and marker.read_text() == "blocked", "the fire to block")
    finally:
        _kill(process)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER wk_block_jobs")
    engine.dispose()
    try:
        _fire_again_fires_once(sqlite_url, store)
    finally:
        store.close()


def _backend_waiting_on_jobs(admin: psycopg.Connection[Any]) -> int | None:
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE 'INSERT INTO workerkit_jobs%%' AND datname = current_database()"
    ).fetchone()
    return None if row is None else int(row[0])


def test_postgres_a_fire_killed_between_its_record_and_its_job_leaves_neither(
    postgres_url: str, tmp_path: Path
) -> None:
    store = SqlSchedulerStore(postgres_url, settings=PATIENT)
    lease = store.acquire("leader", 60)
    assert lease is not None
    assert store.register(lease, [tick_schedule()])
    conninfo = sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo, autocommit=True) as admin, psycopg.connect(conninfo) as locker:
        # The job's INSERT waits for this lock: the fire process stops between the two.
        locker.execute("LOCK TABLE workerkit_jobs IN EXCLUSIVE MODE")
        process = _spawn_fire(postgres_url, tmp_path / "marker", block=False)
        try:
            backend = _wait_for(lambda: _backend_waiting_on_jobs(admin), "the fire to block")
            # It did insert the record already (uncommitted): it holds that table's lock.
            holds = admin.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND granted "
                "AND relation = 'workerkit_scheduler_fires'::regclass",
                (backend,),
            ).fetchone()
            assert holds is not None
            assert holds[0] >= 1
        finally:
            _kill(process)
        locker.rollback()
        _wait_for(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)
                ).fetchone()
                == (0,)
            ),
            "the killed client's backend to end",
        )
    try:
        _fire_again_fires_once(postgres_url, store)
    finally:
        store.close()


def test_postgres_a_change_of_leader_waits_for_a_fire_in_progress(postgres_url: str) -> None:
    """The epoch race: the old leader's fire checked its epoch and is still writing when its
    lease runs out. The new leader's acquire waits for that transaction, so the fire commits
    under the old epoch before the new one exists, and every later fire by the old leader is
    refused: there is no moment where both can fire."""
    old = SqlSchedulerStore(postgres_url, settings=PATIENT)
    new = SqlSchedulerStore(postgres_url, settings=PATIENT)
    old_lease = old.acquire("old", 1.0)
    assert old_lease is not None
    assert old.register(old_lease, [tick_schedule()])
    conninfo = sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    results: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, call()), daemon=True)
        thread.start()
        return thread

    try:
        with (
            psycopg.connect(conninfo, autocommit=True) as admin,
            psycopg.connect(conninfo) as locker,
        ):
            locker.execute("LOCK TABLE workerkit_jobs IN EXCLUSIVE MODE")
            fire = run(
                "fire",
                lambda: old.fire(
                    tick_schedule(), FIRE_TIME, epoch=old_lease.epoch, reason="on_time"
                ),
            )
            _wait_for(lambda: _backend_waiting_on_jobs(admin), "the old leader's fire to block")
            _wait_for(lambda: new.leader() is None, "the old lease to expire")
            acquire = run("acquire", lambda: new.acquire("new", 60))
            _wait_for(
                lambda: admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'UPDATE workerkit_scheduler_lease%%'"
                ).fetchone(),
                "the new leader's acquire to wait for the fire",
            )
            assert "acquire" not in results
            locker.rollback()
            fire.join(WAIT)
            acquire.join(WAIT)
        assert results["fire"] == FireOutcome.FIRED
        new_lease = results["acquire"]
        assert new_lease is not None
        assert new_lease.epoch == old_lease.epoch + 1
        late = old.fire(tick_schedule(), FIRE_TIME + 1, epoch=old_lease.epoch, reason="on_time")
        assert late == FireOutcome.NOT_LEADER
        assert [job["id"] for job in _jobs(postgres_url)] == [fire_job_id(TICK, FIRE_TIME)]
    finally:
        old.close()
        new.close()


# --- open_scheduler -----------------------------------------------------------------------


def test_open_scheduler_gives_the_apps_store_and_schedules(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sched_app.py").write_text(
        textwrap.dedent(
            """
            from workerkit import App

            app = App()

            @app.periodic("every-2s", every=2, args=[7])
            @app.task(name="tick", queue="q", max_attempts=5)
            def tick(n):
                return n
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    binding = open_scheduler(Settings(app="sched_app:app", database_url=url))
    try:
        [schedule] = binding.schedules
        assert (schedule.name, schedule.task, schedule.queue, schedule.args) == (
            "every-2s",
            "tick",
            "q",
            (7,),
        )
        store = binding.store
        lease = store.acquire("me", 10)
        assert lease is not None
        assert store.register(lease, binding.schedules)
        assert store.fire(schedule, 2.0, epoch=lease.epoch, reason="on_time") == FireOutcome.FIRED
        queue = SqlQueue(url)
        job = queue.get_job(fire_job_id("every-2s", 2.0))
        queue.close()
        assert job is not None
        assert (job["queue"], job["max_attempts"]) == ("q", 5)
    finally:
        binding.store.close()


def test_open_scheduler_refuses_what_is_not_a_workerkit_app(url: str) -> None:
    with pytest.raises(ConfigurationError, match="needs an app"):
        open_scheduler(Settings(database_url=url))
    with pytest.raises(ConfigurationError, match=r"not a workerkit\.App"):
        open_scheduler(Settings(app="json:JSONDecoder", database_url=url))


# --- with core's runner -------------------------------------------------------------------


def test_two_runners_on_the_sql_store_fire_every_time_once_across_a_handover(url: str) -> None:
    """A leader and a standby (each its own store object, as two replicas) fire a 0.25 s
    schedule; the leader stops (releasing its lease) halfway. Every fire time in between has
    exactly one record and one job, whoever fired it."""
    from workerkit.scheduler.runner import NullReporter, Runner, SchedulerTiming
    from workerkit.scheduler.triggers import Every

    schedule = Schedule(name="quick", task="tests.tick", trigger=Every(0.25), args=(1,), queue="q")
    timing = SchedulerTiming(
        lease_duration=3.0,
        renew_deadline=2.0,
        retry_period=0.5,
        standby_delay=0.1,
        misfire_grace=2.0,
        retention=3600.0,
    )
    stores = [SqlSchedulerStore(url), SqlSchedulerStore(url)]
    stops = [threading.Event(), threading.Event()]
    runners = [
        Runner(store, [schedule], holder=holder, timing=timing, reporter=NullReporter())
        for store, holder in zip(stores, ("first", "second"), strict=True)
    ]
    threads = [
        threading.Thread(target=r.run, args=(s,)) for r, s in zip(runners, stops, strict=True)
    ]
    try:
        threads[0].start()
        _wait_for(lambda: runners[0].leading, "the first runner to lead")
        threads[1].start()
        _wait_for(lambda: len(_records(url)) >= 6, "the first leader's fires")
        stops[0].set()
        threads[0].join(WAIT)
        handed_over = len(_records(url))
        _wait_for(lambda: runners[1].leading, "the standby to take over")
        _wait_for(lambda: len(_records(url)) >= handed_over + 6, "the new leader's fires")
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(WAIT)
        for store in stores:
            store.close()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        epochs = conn.execute(sa.text("SELECT DISTINCT epoch FROM workerkit_scheduler_fires"))
        leaders = {epoch for (epoch,) in epochs if epoch is not None}
    engine.dispose()
    assert len(leaders) == 2  # both replicas led, one after the other
    keys = sorted(key for _, key in _records(url))
    assert [b - a for a, b in itertools.pairwise(keys)] == [250] * (len(keys) - 1)
    assert sorted(job["id"] for job in _jobs(url)) == sorted(
        fire_job_id("quick", key / 1000) for key in keys
    )


# --- outages ------------------------------------------------------------------------------


@pytest.fixture
def restartable() -> Iterator[list[PostgresServer]]:
    """A private PostgreSQL, migrated, that keeps its data across a restart; [0] runs now."""
    holder = [start_or_skip(start_postgres)]
    try:
        upgrade(holder[0].url())
        yield holder
    finally:
        holder[0].stop()


def test_a_database_outage_is_store_unavailable_and_nothing_fires_twice_after_it(
    restartable: list[PostgresServer],
) -> None:
    """Down: every call raises StoreUnavailable at once (the store retries nothing; the runner
    tries again each retry period). Back: the fire that failed fires once, the one that
    succeeded before is already fired, and the lease outlived the outage."""
    url = restartable[0].url()
    store = SqlSchedulerStore(url)
    try:
        lease = store.acquire("leader", 60)
        assert lease is not None
        assert store.register(lease, [tick_schedule()])
        assert store.fire(tick_schedule(), FIRE_TIME, epoch=lease.epoch, reason="on_time") == (
            FireOutcome.FIRED
        )
        server = restartable[0]
        server.process.stop()
        for call in (
            lambda: store.fire(tick_schedule(), FIRE_TIME + 1, epoch=lease.epoch, reason="x"),
            lambda: store.renew(lease, 60),
            lambda: store.acquire("leader", 60),
            store.clock,
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="database unavailable"):
                call()
            assert time.monotonic() - started < 10  # not retried, not hung
        restartable[0] = start_postgres(port=server.port, directory=server.directory)
        outcomes = [
            store.fire(tick_schedule(), fire_time, epoch=lease.epoch, reason="on_time")
            for fire_time in (FIRE_TIME, FIRE_TIME + 1)
        ]
        assert outcomes == [FireOutcome.ALREADY_FIRED, FireOutcome.FIRED]
        assert sorted(job["id"] for job in _jobs(url)) == [
            fire_job_id(TICK, FIRE_TIME),
            fire_job_id(TICK, FIRE_TIME + 1),
        ]
    finally:
        store.close()


def test_a_killed_session_costs_at_most_one_failed_call(postgres_url: str) -> None:
    store = SqlSchedulerStore(postgres_url)
    try:
        lease = store.acquire("leader", 60)
        assert lease is not None
        conninfo = sa.make_url(postgres_url).set(drivername="postgresql")
        with psycopg.connect(conninfo.render_as_string(False), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        try:
            renewed = store.renew(lease, 60)
        except StoreUnavailable:
            renewed = store.renew(lease, 60)  # what the runner does a retry period later
        assert renewed is not None
        assert renewed.epoch == lease.epoch
    finally:
        store.close()


def test_a_trigger_request_for_a_time_that_already_fired_is_consumed(
    leader: tuple[SqlSchedulerStore, Lease],
) -> None:
    store, lease = leader
    assert store.fire(tick_schedule(), FIRE_TIME, epoch=lease.epoch, reason="on_time") == (
        FireOutcome.FIRED
    )
    assert store.request_trigger(TICK, FIRE_TIME)
    assert store.fire(tick_schedule(), FIRE_TIME, epoch=lease.epoch, reason="manual") == (
        FireOutcome.ALREADY_FIRED
    )
    assert store.states()[TICK].triggers == ()  # not left pending for ever


# --- bounded waits: a dead or busy session cannot stall the runner -------------------------


def _conninfo(postgres_url: str) -> str:
    return sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(False)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` in a daemon thread; its result or exception lands in the dict."""
    result: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            result["value"] = call()
        except Exception as exc:
            result["error"] = exc
        result["took"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_postgres_the_schedulers_sessions_bound_every_wait(postgres_url: str) -> None:
    store = SqlSchedulerStore(postgres_url)  # default timing: Rp 2 s, Rd 10 s, L 15 s
    try:
        with store.engine.connect() as conn:
            shown = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar()
                for name in (
                    "lock_timeout",
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                    "tcp_keepalives_idle",
                    "tcp_keepalives_count",
                    "tcp_user_timeout",
                )
            }
            client = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert shown == {
            "lock_timeout": "1s",
            "statement_timeout": "5s",
            "idle_in_transaction_session_timeout": "5s",
            "tcp_keepalives_idle": "3",
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": "5000",
        }
        assert (client["keepalives"], client["keepalives_idle"]) == ("1", "3")
    finally:
        store.close()


@pytest.mark.parametrize(
    "lock",
    [
        "SELECT epoch FROM workerkit_scheduler_lease FOR SHARE",
        "SELECT epoch FROM workerkit_scheduler_lease FOR UPDATE",
    ],
    ids=["for-share", "for-update"],
)
def test_postgres_a_session_holding_the_lease_row_cannot_block_acquire(
    postgres_url: str, lock: str
) -> None:
    """A leader's node died inside a fire: its session holds the lease row (FOR SHARE; FOR
    UPDATE as a renew would) and never commits. Once its lease has run out, a standby's
    acquire (an UPDATE of that row) gives up at lock_timeout (1 s) with StoreUnavailable
    instead of waiting until the server reaps the session."""
    store = SqlSchedulerStore(postgres_url)
    lease = store.acquire("dead-leader", 1)
    assert lease is not None
    standby = SqlSchedulerStore(postgres_url)
    with psycopg.connect(_conninfo(postgres_url)) as dead:
        dead.execute(lock)
        _wait_for(lambda: standby.leader() is None, "the dead leader's lease to run out")
        thread, result = _in_thread(lambda: standby.acquire("standby", 15))
        thread.join(WAIT)
        alive = thread.is_alive()
        dead.rollback()  # lets a hung acquire (the bug) finish, so the test can end
        thread.join(WAIT)
    try:
        assert not alive, "acquire() waited on the lease row lock without a bound"
        assert isinstance(result.get("error"), StoreUnavailable), result
        assert "lock timeout" in str(result["error"])
        assert result["took"] < 5  # lock_timeout is 1 s; generous for a loaded machine
        taken = standby.acquire("standby", 15)  # once the lock is gone
        assert taken is not None
        assert taken.epoch == lease.epoch + 1
    finally:
        store.close()
        standby.close()


def test_postgres_a_leader_session_dead_inside_a_fire_is_ended_by_the_server(
    postgres_url: str,
) -> None:
    """The leader's own session stops mid-transaction (its node is gone: no COMMIT, no FIN),
    holding the lease row FOR SHARE. The server ends it after
    idle_in_transaction_session_timeout (Rd / 2: 5 s by default, 1 s here), so a standby
    takes over when the lease runs out, not ~2 h later when the kernel's keepalive would."""
    settings = Settings(scheduler_lease_duration=3, scheduler_renew_deadline=2)
    leader = SqlSchedulerStore(postgres_url, settings=settings)
    standby = SqlSchedulerStore(postgres_url, settings=settings)
    try:
        lease = leader.acquire("leader", 3)
        assert lease is not None
        dead = leader.engine.connect()  # the store's own session, with the store's options
        dead.begin()
        dead.execute(sa.text("SELECT epoch FROM workerkit_scheduler_lease FOR SHARE"))
        pid = dead.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        started = time.monotonic()

        def took_over() -> Any:
            try:
                return standby.acquire("standby", 15)
            except StoreUnavailable:  # the lock is still held: what the runner retries
                return None

        thread, result = _in_thread(lambda: _wait_for(took_over, "the standby to take over"))
        thread.join(WAIT + 5)
        with psycopg.connect(_conninfo(postgres_url), autocommit=True) as admin:
            alive = thread.is_alive()
            if alive:  # the bug: acquire hangs on the lock; free it so the test can end
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                thread.join(WAIT)
            gone = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            assert gone.fetchone() == (0,)
        assert not alive, "the dead session's lock blocked the standby's acquire"
        new = result["value"]
        assert new.epoch == lease.epoch + 1
        # The lease ran out 3 s after it was taken; the session was ended 1 s after it idled.
        assert time.monotonic() - started < 15
        with pytest.raises(sa.exc.DBAPIError):
            dead.execute(sa.text("SELECT 1"))
        dead.invalidate()
    finally:
        leader.close()
        standby.close()


def test_sqlite_a_held_write_lock_is_store_unavailable_within_the_lock_wait(
    sqlite_url: str,
) -> None:
    """A worker (or an enqueue batch) holds SQLite's write lock: the scheduler's call gives up
    after the lock wait (1 s: half a retry period), not the queue's 30 s busy timeout, so a
    renewal is retried before the renew deadline."""
    upgrade(sqlite_url)
    store = SqlSchedulerStore(sqlite_url)
    path = sa.make_url(sqlite_url).database
    assert path is not None
    import sqlite3

    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            store.acquire("leader", 15)
        took = time.monotonic() - started
        assert 0.5 < took < 5, took
        holder.execute("ROLLBACK")
        assert store.acquire("leader", 15) is not None
    finally:
        holder.close()
        store.close()


# --- namespaces: two apps' schedulers on one database -------------------------------------


def test_two_namespaces_on_one_database_lead_register_and_fire_independently(url: str) -> None:
    billing = SqlSchedulerStore(url, settings=Settings(scheduler_namespace="billing"))
    reports = SqlSchedulerStore(url, settings=Settings(scheduler_namespace="reports"))
    mine, theirs = tick_schedule(args=(1,)), tick_schedule(args=(2,))  # same name, two apps
    try:
        first = billing.acquire("billing-0", 60)
        second = reports.acquire("reports-0", 60)
        assert first is not None
        assert second is not None  # its own lease: not a standby of the other app
        assert billing.register(first, [mine])
        assert reports.register(second, [theirs])  # does not unregister billing's
        assert billing.fire(mine, FIRE_TIME, epoch=first.epoch, reason="on_time") == (
            FireOutcome.FIRED
        )
        assert reports.fire(theirs, FIRE_TIME, epoch=second.epoch, reason="on_time") == (
            FireOutcome.FIRED
        )
        for store, schedule in ((billing, mine), (reports, theirs)):
            state = store.states()[TICK]
            assert (state.fingerprint, state.removed) == (schedule.fingerprint(), False)
            assert state.last_fire is not None
            assert store.leader() is not None
        jobs = {job["id"]: json.loads(job["payload"])["args"] for job in _jobs(url)}
        assert len(jobs) == 2
        assert sorted(jobs.values()) == [[1], [2]]
        assert fire_job_id(TICK, FIRE_TIME) not in jobs  # the default namespace's id is free
        assert billing.set_paused(TICK, True)
        assert not reports.states()[TICK].paused
        billing.release(first)
        assert billing.leader() is None
        assert reports.leader() is not None
    finally:
        billing.close()
        reports.close()


def test_open_scheduler_uses_the_scheduler_namespace_setting(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ns_app.py").write_text(
        "from workerkit import App\napp = App()\n"
        "@app.periodic('t', every=60)\n@app.task(name='t')\ndef t():\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    binding = open_scheduler(
        Settings(app="ns_app:app", database_url=url, scheduler_namespace="billing")
    )
    try:
        assert isinstance(binding.store, SqlSchedulerStore)
        assert binding.store.namespace == "billing"
    finally:
        binding.store.close()


# --- the record keeps the fired definition; the startup size check ------------------------


def test_a_fire_record_keeps_the_fingerprint_of_the_definition_that_fired(
    url: str, leader: tuple[SqlSchedulerStore, Lease]
) -> None:
    store, lease = leader
    assert store.fire(tick_schedule(), FIRE_TIME, epoch=lease.epoch, reason="on_time") == (
        FireOutcome.FIRED
    )
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT fingerprint FROM workerkit_scheduler_fires"))
        assert stored.scalars().all() == [tick_schedule().fingerprint()]
    engine.dispose()
    last = store.states([TICK])[TICK].last_fire
    assert last is not None
    assert last.fingerprint == tick_schedule().fingerprint()


def test_open_scheduler_checks_the_payload_size_as_the_fire_encodes_it(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arguments that fit only without the schedule and fire time would pass a check that
    leaves those out and fail at every fire: refused at startup instead."""
    name = "a-schedule-with-a-rather-long-name"
    (tmp_path / "big_app.py").write_text(
        "from workerkit import App\napp = App()\n"
        f"@app.periodic({name!r}, every=60, args=['x' * 900])\n"
        "@app.task(name='t')\ndef t(s):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bare = len(json.dumps({"args": ["x" * 900], "kwargs": {}}, separators=(",", ":")))
    with pytest.raises(ConfigurationError, match=rf"schedule {name!r}.*max_payload_bytes"):
        open_scheduler(Settings(app="big_app:app", database_url=url, max_payload_bytes=bare + 20))
    fits = bare + len(f',"schedule":"{name}","fire_time":-2.2250738585072014e-308')
    binding = open_scheduler(Settings(app="big_app:app", database_url=url, max_payload_bytes=fits))
    try:
        store = binding.store
        lease = store.acquire("me", 10)
        assert lease is not None
        assert store.register(lease, binding.schedules)
        [schedule] = binding.schedules
        outcome = store.fire(schedule, 1_767_225_600.123456, epoch=lease.epoch, reason="x")
        assert outcome == FireOutcome.FIRED
    finally:
        binding.store.close()
