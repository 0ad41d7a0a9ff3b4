"""A Celery worker whose main process stops (SIGSTOP) while its pool child runs a task.

Only the main process renews the lease; another worker restores the message once it expires.
The pool child must have stopped the task by then (issue 13, item 5), and the stopped worker
must settle nothing when it wakes. Asserted from the task's own journal lines.
"""

from __future__ import annotations

import os
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support.celery_harness import celery_supervisor, queue_ids, send
from tests.support.harness import Env, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:celery")


def _runs(lines: list[str], label: str) -> list[tuple[float, float, list[str]]]:
    """Each run of ``label`` (one pool child each): its first and last journal time, its lines."""
    by_pid: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or parts[1] != label:
            continue
        pid = next(p for p in parts if p.startswith("pid="))
        by_pid[pid].append((float(next(p for p in parts if p.startswith("t="))[2:]), line))
    runs = [
        (min(t for t, _ in rows), max(t for t, _ in rows), [r for _, r in rows])
        for rows in by_pid.values()
    ]
    return sorted(runs)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("task", ["steps", "ticker"])
def test_a_stopped_workers_task_stops_before_another_worker_runs_it(
    tmp_path: Path, redis_url: str, redis_client: Any, task: str
) -> None:
    # W = 6 s: leases live 3 s, renewed every 1 s; a live worker scans every 1.5 s.
    # "steps" checkpoints and releases itself when asked to stop; "ticker" ignores the stop and
    # swallows every exception, so only the kill ends it.
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    env.extra["WORKERKIT_RECOVERY_WINDOW"] = "6"
    prefork = ("--pool=prefork",)
    with celery_supervisor(env, redis_url, name="first", worker_args=prefork) as first:
        first.wait_ready()
        if task == "steps":
            send(redis_url, "steps", "long", 16, 0.5, task_id="long")  # 8 s of work
        else:
            send(redis_url, "ticker", "long", 8.0, task_id="long")
        wait_until(
            lambda: any(line.startswith("start long") for line in env.lines()),
            timeout=20,
            what="the task to start",
        )
        main_pid = first.worker_pid()  # the worker's main process, not its pool child
        with celery_supervisor(env, redis_url, name="second", worker_args=prefork) as second:
            second.wait_ready()
            if task == "steps":
                wait_until(
                    lambda: redis_client.exists("workerkit:celery:checkpoint:long"),
                    timeout=20,
                    what="the first run's first checkpoint",
                )
            else:
                wait_until(
                    lambda: sum(line.startswith("tick long") for line in env.lines()) >= 5,
                    timeout=20,
                    what="the first run under way",
                )
            os.kill(main_pid, signal.SIGSTOP)
            try:
                wait_until(
                    lambda: sum(line.startswith("start long") for line in env.lines()) == 2,
                    timeout=40,
                    what="the second worker to recover and start the task",
                )
                wait_until(
                    lambda: any(line.startswith("done long") for line in env.lines()),
                    timeout=60,
                    what="the task to complete",
                )
                wait_until(
                    lambda: redis_client.hlen("unacked") == 0,
                    timeout=20,
                    what="the second worker's ack",
                )
                # Never two runs at once: the first run's last sign of life (a journal line of
                # its pool child) came before the second run began.
                runs = _runs(env.lines(), "long")
                assert len(runs) == 2, env.lines()
                (_, first_end, first_lines), (second_start, _, second_lines) = runs
                assert first_end < second_start, (first_lines, second_lines)
            finally:
                os.kill(main_pid, signal.SIGCONT)
            # Awake again, the first worker settles nothing: its requeue is fenced.
            first.wait_event("requeue_skipped", timeout=20)
            send(redis_url, "noop", "after", task_id="after")
            wait_until(
                lambda: any(line.startswith("noop after") for line in env.lines()),
                timeout=20,
                what="a task after the wake-up",
            )
            second.signal(signal.SIGTERM)
            assert second.wait_exit(10)[0] == 0
        first.signal(signal.SIGTERM)
        assert first.wait_exit(10)[0] == 0  # the first worker exits cleanly
    lines = env.lines()
    runs = _runs(lines, "long")
    assert len(runs) == 2, lines  # the first worker, awake, ran it no more
    (_, first_end, first_lines), (second_start, _, second_lines) = runs
    assert first_end < second_start, (first_lines, second_lines)
    assert not any(line.startswith("done") for line in first_lines), first_lines
    assert sum(line.startswith("done long") for line in lines) == 1, lines
    assert first.events_named("lease_expiring"), first.log_text()
    if task == "steps":
        assert "from=0" not in second_lines[0], second_lines  # resumed from its checkpoint
    assert redis_client.hlen("unacked") == 0
    assert queue_ids(redis_client) == []


@pytest.mark.timeout(120)
def test_a_task_that_finishes_while_the_main_process_is_stopped_runs_once(
    tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    # W = 12 s: leases live 6 s, renewed every 2 s; a pool child's watchdog asks its task to
    # stop once less than 1.5 s of the last renewal is left. The task then finishes and returns
    # (a success) while its lease is still this worker's: it is settled, never run again.
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    env.extra["WORKERKIT_RECOVERY_WINDOW"] = "12"
    prefork = ("--pool=prefork",)
    with celery_supervisor(env, redis_url, name="first", worker_args=prefork) as first:
        first.wait_ready()
        send(redis_url, "wrapup", "fin", 60.0, task_id="fin")
        wait_until(
            lambda: any(line.startswith("start fin") for line in env.lines()),
            timeout=20,
            what="the task to start",
        )
        main_pid = first.worker_pid()
        os.kill(main_pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: any(line.startswith("done fin") for line in env.lines()),
                timeout=20,
                what="the task to be asked to stop, and finish",
            )
        finally:
            os.kill(main_pid, signal.SIGCONT)
        wait_until(
            lambda: redis_client.hlen("unacked") == 0 and redis_client.llen("celery") == 0,
            timeout=20,
            what="the finished task's ack",
        )
        send(redis_url, "noop", "after", task_id="after")
        wait_until(
            lambda: any(line.startswith("noop after") for line in env.lines()),
            timeout=20,
            what="a task after the wake-up",
        )
        assert not first.events_named("job_lease_lost"), first.log_text()
        assert not first.events_named("settle_fenced"), first.log_text()
        first.signal(signal.SIGTERM)
        assert first.wait_exit(15)[0] == 0
    lines = env.lines()
    assert sum(line.startswith("start fin") for line in lines) == 1, lines
    assert any(line.startswith("done fin stopped=True") for line in lines), lines
    assert redis_client.hlen("unacked") == 0
    assert queue_ids(redis_client) == []
