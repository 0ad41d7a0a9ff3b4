"""The SQL engine on PostgreSQL under faults: three ``workerkit run sql`` pods, a load of
journaled jobs (tests/apps/fault_jobs.py), one fault per test (tests/support/faults.py has the
verdict). The cluster and the pods are shared by the module; each scenario has its own job ids.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from tests.support.faults import (
    Load,
    Pods,
    alive,
    kill_tree,
    restart_postgres_during,
    running_long_jobs,
    wait_for,
)
from tests.support.harness import WORKERKIT, Env, Supervisor, start_worker
from workerkit.app import App, EnqueueOptions
from workerkit.engines.sql import upgrade
from workerkit.settings import Settings

if TYPE_CHECKING:
    from tests.support.servers import PostgresServer

pytestmark = pytest.mark.timeout(120)

#: The lease (V): a worker that stopped renewing loses its jobs 4 s later.
LEASE = 4.0
DATABASE = "faults"


class SqlJobs:
    """The queue table of the module's database, read and written directly."""

    def __init__(self, holder: list[PostgresServer]) -> None:
        self.holder = holder

    @property
    def url(self) -> str:
        return self.holder[0].url(DATABASE)

    def sql(self, statement: str, *params: object) -> list[tuple[object, ...]]:
        with psycopg.connect(self.holder[0].conninfo(DATABASE), autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def enqueue(self, jobs: list[tuple[str, str, tuple[object, ...]]]) -> None:
        app = App(self.url, settings=Settings(database_url=self.url))
        try:
            for task, job_id, args in jobs:
                app.enqueue(task, list(args), {}, EnqueueOptions(job_id=job_id))
        finally:
            app.backend.close()

    def _in_state(self, ids: list[str], states: tuple[str, ...]) -> list[str]:
        rows = self.sql(
            "SELECT id FROM workerkit_jobs WHERE id = ANY(%s) AND state = ANY(%s)",
            ids,
            list(states),
        )
        return [str(row[0]) for row in rows]

    def busy(self, ids: list[str]) -> list[str]:
        return self._in_state(ids, ("ready", "running"))

    def stuck(self, ids: list[str]) -> list[str]:
        return self._in_state(ids, ("running",))

    def failed(self, prefix: str) -> dict[str, str]:
        rows = self.sql(
            "SELECT id, last_error FROM workerkit_jobs WHERE starts_with(id, %s) AND state = %s",
            f"{prefix}-",
            "failed",
        )
        return {str(job_id): str(error or "") for job_id, error in rows}

    def kill_sessions(self) -> int:
        """pg_terminate_backend of every session on the database but this one."""
        rows = self.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            DATABASE,
        )
        return int(str(rows[0][0]))


@dataclass
class Cluster:
    pods: Pods
    jobs: SqlJobs
    journal: Path
    holder: list[PostgresServer]

    def load(self, prefix: str, **kwargs: Any) -> Load:
        return Load(self.jobs, prefix, self.journal, **kwargs)


@pytest.fixture(scope="module")
def cluster(
    fault_postgres: list[PostgresServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    jobs = SqlJobs(fault_postgres)
    with psycopg.connect(fault_postgres[0].conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    upgrade(jobs.url)
    tmp = tmp_path_factory.mktemp("sql-faults")
    env = Env(tmp=tmp, database_url=jobs.url, journal=tmp / "journal.txt")

    def start(name: str) -> Supervisor:
        return start_worker(
            [*WORKERKIT, "run", "sql"],
            env,
            app="tests.apps.fault_jobs:sql_app",
            name=name,
            engine={"database_url": jobs.url, "poll_interval": "0.1"},
            settings={"visibility_timeout": str(LEASE), "concurrency": "3", "replicas": "3"},
        )

    pods = Pods(start)
    try:
        yield Cluster(pods, jobs, env.journal, fault_postgres)
    finally:
        pods.stop_all()


@pytest.fixture
def sql(cluster: Cluster) -> Cluster:
    cluster.pods.ensure()
    return cluster


def restart_under_load(sql: Cluster, prefix: str, down_for: float) -> None:
    load = sql.load(prefix, gates=3)
    load.enqueue()
    load.wait_under_way(long_running=True)
    sql.holder[0] = restart_postgres_during(sql.holder[0], load, down_for=down_for)
    load.wait_settled()
    load.check()


def test_postgres_restart_shorter_than_the_lease(sql: Cluster) -> None:
    restart_under_load(sql, "pgshort", down_for=LEASE / 2)


def test_postgres_restart_longer_than_the_lease(sql: Cluster) -> None:
    restart_under_load(sql, "pglong", down_for=LEASE + 1)


def test_sessions_terminated_again_and_again(sql: Cluster) -> None:
    load = sql.load("pgkill")
    load.enqueue()
    load.wait_under_way(ended=10)
    killed = 0
    for _ in range(10):
        killed += sql.jobs.kill_sessions()
        time.sleep(0.3)
    assert killed >= 10
    load.wait_settled()
    load.check()


def test_worker_stopped_past_its_lease_is_fenced_when_it_wakes(sql: Cluster) -> None:
    load = sql.load("pgstop", long_steps=40)  # 10 s jobs: still running when the lease is gone
    first = load.enqueue(longs_last=True)
    load.wait_under_way(ended=len(first) - load.longs)
    pod, victim, held = running_long_jobs(load, sql.pods)
    os.kill(victim, signal.SIGSTOP)
    try:
        load.longs = 0
        load.enqueue(batch="b")  # the other pods carry on meanwhile
        wait_for(
            lambda: all(len(load.runs()[job_id]) > 1 for job_id in held),
            timeout=4 * LEASE,
            what="the stopped worker's jobs taken over by the other pods",
        )
    finally:
        os.kill(victim, signal.SIGCONT)
    load.wait_settled()
    load.check()
    assert pod.proc.poll() is None, pod.log_text()

    def fenced() -> set[str]:
        # Whichever of the woken worker's writes meets the fence first: its lease renewal
        # (`lease_lost`), or the job's own checkpoint or settle (finished as `lease_lost`).
        renewals = {e["job_id"] for e in pod.events_named("lease_lost")}
        finishes = pod.events_named("job_finished")
        return renewals | {e["job_id"] for e in finishes if e.get("outcome") == "lease_lost"}

    # The others may finish the jobs before the woken worker's next write meets the fence (a
    # loaded machine schedules it late): wait for it, do not read the log once.
    wait_for(lambda: set(held) <= fenced(), timeout=2 * LEASE, what="the woken worker fenced")
    assert pod.proc.poll() is None, pod.log_text()


def test_killed_pod_jobs_rerun_by_the_other_pods_once(sql: Cluster) -> None:
    load = sql.load("pgpod")
    load.enqueue()
    load.wait_under_way()
    killed = Pods.tree(sql.pods.pods[0])
    kill_tree(killed)  # the node is gone: supervisor and worker at once
    killed_at = time.time()
    load.wait_settled()
    load.check(killed=killed, killed_at=killed_at)


def test_supervisor_sigkilled_its_worker_follows_and_jobs_run_once(sql: Cluster) -> None:
    load = sql.load("pgsup")
    load.enqueue()
    load.wait_under_way()
    pod = sql.pods.pods[0]
    worker = Pods.worker_pid(pod)
    killed = Pods.tree(pod)
    sql.pods.orphans.extend(killed[1:])
    os.kill(pod.pid, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: not alive(worker), timeout=3, what="the worker to die with its supervisor")
    load.wait_settled()
    load.check(killed=killed, killed_at=killed_at)


def test_poison_rows_fail_with_their_reason_and_the_rest_runs(sql: Cluster) -> None:
    load = sql.load("pgpoison")
    poison = {
        "pgpoison-p-unknown": ("no.such.task", '{"args": [], "kwargs": {}}', "UnknownTask"),
        "pgpoison-p-notjson": ("short", "\x01not json{", "PayloadError"),
        "pgpoison-p-shape": ("short", "[1, 2]", "PayloadError"),
        "pgpoison-p-args": ("short", '{"args": 7, "kwargs": {}}', "PayloadError"),
    }
    for job_id, (task, payload, _) in poison.items():
        sql.jobs.sql(
            "INSERT INTO workerkit_jobs (id, queue, task, payload, state, attempts, max_attempts,"
            " run_at, enqueued_at, created_at, updated_at) VALUES (%s, 'default', %s, %s,"
            " 'ready', 0, 3, 0, 0, 0, 0)",
            job_id,
            task,
            payload,
        )
    load.enqueue()
    load.ids.extend(poison)
    load.wait_settled(failed=poison)
    load.check(failed=poison)
    failed = sql.jobs.failed("pgpoison")
    assert set(failed) == set(poison), failed
    for job_id, (_, _, reason) in poison.items():
        assert reason in failed[job_id], (job_id, failed[job_id])
    assert all(pod.proc.poll() is None for pod in sql.pods)
