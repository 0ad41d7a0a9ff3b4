"""``workerkit scheduler``'s process model with real processes and signals: the supervisor as
PID 1 (a pid namespace of its own), the scheduler process as its child, probes from the store's
health, metrics from the scheduler's events, SIGTERM -> lease handed over -> exit 0.

The store is the in-memory one (tests/apps/sched_memory.py): what is tested here is the process
around the runner; the stores and replicas are tested with real servers elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import (
    Supervisor,
    children_of,
    spawn_logged,
    stopped_after,
    wait_until,
    worker_env,
)
from tests.support.servers import free_port

pytestmark = pytest.mark.e2e

AS_PID_1 = shutil.which("unshare") is not None and os.geteuid() == 0
SUPERVISOR = [sys.executable, "-m", "tests.apps.sched_supervisor"]


class _Dir:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.journal = tmp / "journal.txt"
        self.extra: dict[str, str] = {}


def _start(tmp: Path, **settings: str) -> tuple[Supervisor, int]:
    """The supervisor (PID 1 of its own pid namespace when we may) and its pid here."""
    port = free_port()
    variables = worker_env(
        _Dir(tmp), app="tests.apps.sched_memory:open_binding", port=port, engine={}, settings={}
    )
    variables.update(settings)
    wrapper = ["unshare", "--pid", "--fork", "--kill-child"] if AS_PID_1 else []
    running = spawn_logged([*wrapper, *SUPERVISOR], tmp, "scheduler", port, variables)
    if not AS_PID_1:
        return running, running.pid
    pids = wait_until(lambda: children_of(running.pid), timeout=10, what="the supervisor's pid")
    return running, pids[0]


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[tuple[Supervisor, int]]:
    running, pid = _start(tmp_path)
    with stopped_after(running):
        yield running, pid


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_ready_from_the_store_fires_on_time_and_sigterm_hands_over_and_exits_0(
    scheduler: tuple[Supervisor, int],
) -> None:
    running, pid = scheduler
    running.wait_ready()
    assert running.get("/startupz")[0] == 200
    assert running.get("/livez")[0] == 200
    if AS_PID_1:
        assert running.wait_event("supervisor_starting")["pid"] == 1
    # the leader's fires reach the log and the supervisor's metrics
    fired = wait_until(
        lambda: [e for e in running.events_named("schedule_fired") if e["outcome"] == "fired"][2:],
        timeout=15,
        what="three fires",
    )
    assert all(e["schedule"] == "tick" and e["delay"] < 0.5 for e in fired)
    assert running.events_named("scheduler_leadership")[-1]["leading"] is True

    def scraped() -> str | None:
        text = running.get("/metrics")[1]
        count = _metric(text, "workerkit_scheduler_fires_total", schedule="tick", outcome="fired")
        return text if count is not None and count >= 3 else None

    text = wait_until(scraped, timeout=10, what="fires in /metrics")
    assert _metric(text, "workerkit_scheduler_leader") == 1.0
    assert _metric(text, "workerkit_scheduler_leader_changes_total") == 1.0
    assert (_metric(text, "workerkit_scheduler_fire_delay_seconds_count") or 0) >= 3
    assert _metric(text, "workerkit_store_up") == 1.0

    running.signal(signal.SIGTERM, pid)
    code, elapsed = running.wait_exit(timeout=15)
    assert code == 0, running.log_text()
    assert elapsed < 5, elapsed  # nothing in flight: no drain window to wait out
    assert running.events_named("scheduler_stopping")[0]["signal"] == "SIGTERM"
    assert running.events_named("scheduler_leadership")[-1]["leading"] is False
    running.wait_event("scheduler_stopped")
    assert running.events_named("supervisor_stopped")[-1]["exit_code"] == 0


def test_a_refused_app_exits_2_before_it_is_ready(tmp_path: Path) -> None:
    running, _ = _start(tmp_path, E2E_SCHED_BAD="1")
    with stopped_after(running):
        code, _ = running.wait_exit(timeout=15)
    assert code == 4, running.log_text()  # STARTUP_FAILED: the scheduler exited before ready
    error = running.wait_event("scheduler_config_error")
    assert re.search(r"misfire='sometimes'", error["message"])
    assert running.events_named("worker_start_failed")[0]["returncode"] == 2


def test_readiness_follows_the_store_and_liveness_does_not(tmp_path: Path) -> None:
    outage = tmp_path / "outage"
    running, pid = _start(tmp_path, E2E_SCHED_OUTAGE=str(outage))
    with stopped_after(running):
        running.wait_ready()
        outage.touch()

        def not_ready() -> str | None:
            status, body = running.get("/readyz")
            return body if status == 503 else None

        assert "store unreachable" in wait_until(not_ready, timeout=15, what="/readyz 503")
        assert running.get("/livez")[0] == 200  # an outage must not get the pod restarted
        assert _metric(running.get("/metrics")[1], "workerkit_store_up") == 0.0
        outage.unlink()
        running.wait_ready(timeout=15)
        running.signal(signal.SIGTERM, pid)
        code, _ = running.wait_exit(timeout=15)
    assert code == 0, running.log_text()
