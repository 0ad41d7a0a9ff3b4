"""The claim's cost does not grow with the table: its plan never scans ``workerkit_jobs``.

A table of 20,000 finished jobs and 2,000 waiting ones (due tomorrow), analyzed, and a few due
jobs: the plan of the very statement a claim sends (captured from a real ``SqlQueue.claim``, and
from ``SqlQueue.ack_and_claim``, which acks finished jobs in the same statement)
reaches rows only through indexes. Before, PostgreSQL matched the picked ids with a hash join
over a sequential scan of the whole table (bench/queue_growth.py: claims 10x slower).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.engines.sql.claim import Ack
from workerkit.engines.sql.schema import jobs
from workerkit.settings import Settings


def _grow(queue: SqlQueue, finished: int, waiting: int) -> None:
    now = time.time()
    base = {"queue": "default", "task": "bulk", "payload": "{}", "max_attempts": 1}
    rows = [
        {**base, "id": f"done-{i}", "state": "succeeded", "attempts": 1, "run_at": now - 600,
         "enqueued_at": now - 600, "created_at": now - 600, "updated_at": now - 60,
         "finished_at": now - 60}
        for i in range(finished)
    ] + [
        {**base, "id": f"wait-{i}", "state": "ready", "attempts": 0, "run_at": now + 86400 + i,
         "enqueued_at": now, "created_at": now, "updated_at": now, "finished_at": None}
        for i in range(waiting)
    ]  # fmt: skip
    with queue.engine.begin() as conn:
        conn.execute(sa.insert(jobs), rows)
    with queue.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE" if queue.dialect == "sqlite" else "VACUUM ANALYZE")


def _plan(queue: SqlQueue, *, folded: bool = False) -> str:
    """The plan of the claim's statement (``folded``: of one that acks a job as it claims)."""
    sent: list[tuple[str, Any]] = []
    held = queue.claim(["default"], "w", 1) if folded else []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("UPDATE", "WITH")):
            sent.append((statement, parameters))

    sa.event.listen(queue.engine, "before_cursor_execute", record)
    try:
        if folded:
            acks = [Ack(d.job_id, d.token, "null") for d in held]
            assert queue.ack_and_claim(acks, ["default"], "w", 1)[0] == [True]
            [delivery] = queue.claim(["default"], "w", 1)
            sent = sent[:-1]  # the folded statement's (on SQLite the claim after the acks)
        else:
            [delivery] = queue.claim(["default"], "w", 1)
    finally:
        sa.event.remove(queue.engine, "before_cursor_execute", record)
    queue.ack(delivery, None)
    statement, parameters = sent[-1]
    explain = "EXPLAIN " if queue.dialect == "postgresql" else "EXPLAIN QUERY PLAN "
    raw = queue.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(explain + statement, parameters)
        lines = [" ".join(str(c) for c in row) for row in cursor.fetchall()]
        raw.rollback()
    finally:
        raw.close()
    return "\n".join(lines)


@pytest.mark.parametrize("folded", [False, True], ids=["claim", "ack_and_claim"])
def test_the_claim_reaches_rows_only_through_indexes(database_url: str, folded: bool) -> None:
    upgrade(database_url)
    queue = SqlQueue(database_url, settings=Settings())
    try:
        _grow(queue, finished=20_000, waiting=2_000)
        queue.enqueue_many([NewJob(f"due-{i}", "t", "default", "[]", 1) for i in range(4)])
        plan = _plan(queue, folded=folded)
    finally:
        queue.close()
    assert "Seq Scan on workerkit_jobs" not in plan, plan  # PostgreSQL
    assert "SCAN workerkit_jobs" not in plan, plan  # SQLite ("SCAN expired" is the CTE)
    if queue.dialect == "postgresql":
        assert "pk_workerkit_jobs" in plan, plan
        assert "ix_workerkit_jobs_ready" in plan, plan


def test_a_folded_ack_finds_its_row_by_primary_key_among_many_running_jobs(
    postgres_url: str,
) -> None:
    """The plan PostgreSQL keeps for the prepared folded statement (its generic plan, what the
    held connection's prepared statement runs after a few executions): the ack's UPDATE reaches
    its row through the primary key. Before, it walked every running job (the lease index) and
    joined them with the acks: with 1,000 jobs running elsewhere, 0.9 ms of server CPU per
    statement instead of 0.5 (bench: /proc of the backend)."""
    import re

    import psycopg
    from psycopg import sql

    from workerkit.engines.sql.statements import ACK_AND_CLAIM

    queue = SqlQueue(postgres_url, settings=Settings())
    try:
        queue.enqueue_many([NewJob(f"run-{i}", "t", "default", "[]", 1) for i in range(1000)])
        queue.enqueue_many([NewJob(f"due-{i}", "t", "default", "[]", 1) for i in range(20)])
        running = queue.claim(["default"], "elsewhere", 1000)
        assert len(running) == 1000
        with queue.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE workerkit_jobs")
        compiled = ACK_AND_CLAIM.compile(dialect=queue.engine.dialect)
        conninfo = queue.engine.url.set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("SET plan_cache_mode = force_generic_plan")
            params: dict[str, Any] = {}
            for _ in range(3):
                [mine] = queue.claim(["default"], "w", 1)
                params = {
                    "p_queues": ["default"],
                    "p_worker": "w",
                    "p_ttl": 30.0,
                    "p_limit": 1,
                    "p_ack_ids": [mine.job_id],
                    "p_ack_tokens": [mine.token],
                    "p_ack_results": ["null"],
                }
                state = compiled.construct_expanded_state(params)
                conn.execute(state.statement, state.parameters, prepare=True).fetchall()
            [[name]] = conn.execute(
                "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%acked AS%'"
            ).fetchall()
            order = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", state.statement)))
            values = sql.SQL(", ").join(sql.Literal(state.parameters[key]) for key in order)
            explain = sql.SQL("EXPLAIN EXECUTE {}({})").format(sql.Identifier(name), values)
            plan = "\n".join(row[0] for row in conn.execute(explain).fetchall())
    finally:
        queue.close()
    acked = plan.split("CTE acked", 1)[1]
    assert "pk_workerkit_jobs" in acked, plan
    assert "ix_workerkit_jobs_lease" not in acked, plan
