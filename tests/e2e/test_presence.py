"""A worker's presence, from the supervisor to the store, with real processes and signals.

Timing (tests/support/harness.py): D = 4 s, M = 2 s: after SIGTERM, request_stop at 4 s,
release at 5 s, kill at 5.6 s. The first tests run the supervisor of ``workerkit run`` with a
test worker (tests/apps/presence_worker.py) that publishes to files; the last one runs
``workerkit run sql`` with the SQL engine's own store, once it exists.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    DRAIN,
    MARGIN,
    Env,
    Supervisor,
    start_worker,
    stopped_after,
    supervisor,
    wait_until,
)
from tests.support.presence_memory import FilePresenceStore
from workerkit import exitcodes
from workerkit.engines.presence import PRESENCE_INTERVAL, Presence
from workerkit.settings import Settings
from workerkit.timing.deadlines import KILL_FRACTION

POD = "worker-5d8f7-x2k9q"


def history(directory: Path) -> list[dict[str, Any]]:
    try:
        text = (directory / "history.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def published(directory: Path, state: str) -> list[dict[str, Any]]:
    return [r for r in history(directory) if r.get("state") == state]


@pytest.fixture
def presence_dir(env: Env) -> Path:
    directory = env.tmp / "presence"
    env.extra.update({"E2E_PRESENCE_DIR": str(directory), "HOSTNAME": POD})
    return directory


@pytest.fixture
def running(env: Env, presence_dir: Path) -> Iterator[Supervisor]:
    argv = [sys.executable, "-m", "tests.apps.presence_supervisor"]
    with stopped_after(
        start_worker(argv, env, app="", name="supervisor", engine={}, settings={})
    ) as sup:
        yield sup


def test_a_ready_worker_is_published_and_refreshed_every_interval(
    running: Supervisor, presence_dir: Path
) -> None:
    pid = running.worker_pid()
    records = wait_until(lambda: published(presence_dir, "ready"), timeout=20, what="ready")
    first = records[0]
    assert first["worker_id"].startswith(f"{POD}:{pid}:")
    assert (first["hostname"], first["pid"], first["engine"]) == (POD, pid, "sql")
    assert (first["queues"], first["concurrency"]) == (["default", "low"], 2)
    assert first["jobs"] == ["held"]
    assert first["counts"] == {"default": {"succeeded": 2}}
    assert (first["drain_deadline"], first["hard_deadline"]) == (None, None)
    assert first["ttl"] == 3 * PRESENCE_INTERVAL
    # Refreshed every PRESENCE_INTERVAL, stamped by the store's clock.
    records = wait_until(
        lambda: r if len(r := published(presence_dir, "ready")) >= 2 else None,
        timeout=3 * PRESENCE_INTERVAL,
        what="a second ready record",
    )
    gap = records[1]["heartbeat_at"] - records[0]["heartbeat_at"]
    assert PRESENCE_INTERVAL - 1 < gap < PRESENCE_INTERVAL + 2, gap
    assert {r["worker_id"] for r in records} == {first["worker_id"]}


def test_sigterm_shows_draining_with_its_deadlines_then_the_record_is_removed_at_exit(
    running: Supervisor, presence_dir: Path
) -> None:
    ready = wait_until(lambda: published(presence_dir, "ready"), timeout=20, what="ready")[0]
    signalled = time.time()
    running.signal(signal.SIGTERM)
    draining = wait_until(
        lambda: published(presence_dir, "draining"), timeout=5, what="a draining record"
    )[0]
    assert draining["worker_id"] == ready["worker_id"]
    assert draining["jobs"] == ["held"]
    assert draining["drain_deadline"] == pytest.approx(signalled + DRAIN, abs=0.5)
    hard = signalled + DRAIN + KILL_FRACTION * MARGIN
    assert draining["hard_deadline"] == pytest.approx(hard, abs=0.5)
    # At D the running jobs are asked to stop: the supervisor is releasing.
    releasing = wait_until(
        lambda: published(presence_dir, "releasing"), timeout=10, what="a releasing record"
    )[0]
    assert releasing["drain_deadline"] == draining["drain_deadline"]
    code, _ = running.wait_exit()
    assert code == exitcodes.OK
    assert history(presence_dir)[-1] == {"removed": ready["worker_id"]}
    assert FilePresenceStore(presence_dir).list_all() == []
    sent = [e["command"] for e in running.events_named("command_sent")]
    assert sent == ["request_stop", "release"]  # presence records are not logged per send


def test_a_killed_worker_leaves_its_record_to_expire(
    running: Supervisor, presence_dir: Path
) -> None:
    pid = running.worker_pid()
    wait_until(lambda: published(presence_dir, "ready"), timeout=20, what="ready")
    running.signal(signal.SIGKILL, pid)
    code, _ = running.wait_exit()
    assert code == exitcodes.WORKER_CRASHED
    (left,) = FilePresenceStore(presence_dir).list_all()
    assert (left.pid, left.state, left.ttl) == (pid, "ready", 3 * PRESENCE_INTERVAL)
    assert left.lost(left.heartbeat_at + left.ttl + 1)
    assert not any("removed" in r for r in history(presence_dir))


# --- the SQL engine's own store ---------------------------------------------------------------


def sql_presence_store(settings: Settings) -> Any:
    try:
        from workerkit.engines.sql.dashboard import presence_store
    except ImportError as exc:
        pytest.skip(f"the SQL engine's presence store is not merged yet ({exc}); DASH.md")
    return presence_store(settings)


def test_workerkit_run_sql_publishes_its_presence_to_the_database(env: Env) -> None:
    store = sql_presence_store(Settings(database_url=env.database_url))
    env.enqueue("cooperative", "x", 60, job_id="x")  # 6 s of work: longer than D
    with supervisor(env) as running:
        pid = running.worker_pid()

        def mine(state: str) -> Presence | None:
            return next((p for p in store.list_all() if p.pid == pid and p.state == state), None)

        env.wait_line("start x 1 from 0")
        ready = wait_until(lambda: mine("ready"), timeout=3 * PRESENCE_INTERVAL, what="ready")
        assert ready.engine == "sql"
        assert ready.worker_id.split(":")[1] == str(pid)
        signalled = time.time()
        running.signal(signal.SIGTERM)
        draining = wait_until(lambda: mine("draining"), timeout=5, what="draining")
        assert draining.jobs == ("x",)
        assert draining.drain_deadline == pytest.approx(signalled + DRAIN, abs=0.5)
        code, _ = running.wait_exit()
    assert code == exitcodes.OK
    assert [p for p in store.list_all() if p.pid == pid] == []
