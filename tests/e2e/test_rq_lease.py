"""A forking RQ worker whose main process stops (SIGSTOP) while its work horse runs a job.

Only the main process renews the lease; another worker recovers the job once it expires. The
horse's lease watchdog must have ended the job by then (issue 13: the same guarantee as the
Celery pool child's, engines/leasewatch.py), the stopped worker must settle nothing when it
wakes, and the job completes exactly once, elsewhere. Asserted from the job's own journal.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.support.harness import gone, wait_until
from tests.support.rq_harness import RqEnv, rq_supervisor
from workerkit.engines.rq.leases import lease_key

#: V = 4 s: the lease lives 3 s, renewed every 1.3 s; a live worker scans every 1 s.
LEASE = {"visibility_timeout": "4"}

JOBS = {
    # Checkpoints every step; on a stop request saves and releases itself.
    "cooperative": ("cooperative", "long", 40, 0.2),
    # Checkpoints every step, ignores stop requests: only an interrupt ends it.
    "stubborn": ("stubborn", "long", 80),
    # Ignores stop requests and swallows every exception: only the kernel's kill ends it.
    "deaf": ("deaf", "long", 8.0),
    # The same, with its signals blocked: its watchdog never starts (nothing can wake it), so
    # only the lease guard beside the worker ends it (SIGKILL).
    "numb": ("numb", "long", 8.0),
}


def runs(lines: list[str]) -> list[tuple[float, float]]:
    """Each run of ``long`` (one work horse each): its first and last journal time, in order.

    The lines with a pid and a time: ``begin``, ``end``, ``tick``.
    """
    by_pid: dict[str, list[float]] = defaultdict(list)
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[0] in ("begin", "end", "tick") and parts[1] == "long":
            by_pid[parts[2]].append(float(parts[3]))
    return sorted((min(times), max(times)) for times in by_pid.values())


def under_way(env: RqEnv, kind: str) -> bool:
    """The first run has saved a checkpoint (or, the deaf and numb jobs, ticked five times)."""
    if kind in ("deaf", "numb"):
        return sum(line.startswith("tick long") for line in env.lines()) >= 5
    return bool(env.state("long").get("checkpoint"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(JOBS))
def test_a_stopped_workers_horse_ends_its_job_before_the_lease_expires(
    tmp_path: Path, redis_url: str, kind: str
) -> None:
    env = RqEnv(tmp=tmp_path, redis_url=redis_url, journal=tmp_path / "journal.txt")
    task, *args = JOBS[kind]
    with rq_supervisor(env, name="first", **LEASE) as first:
        first.wait_ready()
        env.enqueue(task, *args, job_id="long")
        begin = env.wait_prefix("begin long", timeout=20)
        horse = int(begin.split()[2])
        main_pid = first.worker_pid()
        with rq_supervisor(env, name="second", **LEASE) as second:
            second.wait_ready()
            wait_until(lambda: under_way(env, kind), timeout=20, what="the first run under way")
            os.kill(main_pid, signal.SIGSTOP)
            # Nobody renews the lease from here on: when it expires, by Redis's clock.
            with env.connection() as client:
                expires_at = time.time() + client.pttl(lease_key("long")) / 1000
            try:
                env.wait_prefix("begin long", timeout=30, nth=2)
                # The stopped worker's horse is gone: it ended the job before the lease expired
                # (below, from the journal: before the second run began).
                wait_until(lambda: gone(horse), timeout=5, what="the first horse gone")
                env.wait_prefix("done long", timeout=40)
            finally:
                os.kill(main_pid, signal.SIGCONT)
            # Awake again, the first worker settles nothing: the lease is another's.
            finished = first.wait_event("job_finished", timeout=20)
            assert finished["outcome"] == "lease_lost", first.log_text()
            # Why its horse ended, a stop and not a crash: its watchdog, or (numb) the guard. The
            # deaf job's SIGALRM comes a thirty-second of the lease before the guard's kill: a
            # horse slow to die (a loaded machine) may meet the guard's kill too.
            expired = first.events_named("lease_expired_in_horse")
            allowed = {"numb": ("lease_guard",), "deaf": ("watchdog", "lease_guard")}
            assert len(expired) == 1, first.log_text()
            assert expired[0]["by"] in allowed.get(kind, ("watchdog",)), first.log_text()
            assert not first.events_named("work_horse_died"), first.log_text()
            env.enqueue("tick", "after", job_id="after")
            env.wait_prefix("ran after", timeout=20)
            second.signal(signal.SIGTERM)
            assert second.wait_exit(10)[0] == 0, second.log_text()
        first.signal(signal.SIGTERM)
        assert first.wait_exit(10)[0] == 0, first.log_text()
    lines = env.lines()
    found = runs(lines)
    assert len(found) == 2, lines  # the first worker, awake, ran it no more
    (_, first_end), (second_begin, _) = found
    assert first_end < expires_at, (first_end, expires_at, lines)  # ended while leased
    assert first_end < second_begin, lines  # never two runs at once
    assert sum(line.startswith("done long") for line in lines) == 1, lines
    assert env.job("long").get_status() == "finished"
    assert env.started() == []
    if kind != "numb":  # the horse's watchdog said so; the numb job's never ran
        assert first.events_named("lease_expiring"), first.log_text()
    if kind == "cooperative":
        assert any(line.startswith("stop long at") for line in lines), lines  # asked to stop
    if kind not in ("deaf", "numb"):
        assert "from 0" not in env.wait_prefix("start long", nth=2), lines  # resumed
