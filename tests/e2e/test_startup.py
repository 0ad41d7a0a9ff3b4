"""``workerkit run``'s start: the worker is spawned at once and waits at its start gate.

The worker's interpreter imports its engine beside the supervisor's own imports and app check,
then waits at its gate (engines/startgate.py) until the supervisor's checks passed; a refused
configuration kills it there, before it has loaded the app or touched the queue. Real
``workerkit run sql`` processes on a SQLite file; the app check is held open by an app whose
import waits for a file (tests/apps/held_import.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.support.harness import (
    WORKERKIT,
    Env,
    Supervisor,
    start_worker,
    stop_gracefully,
    stopped_after,
    try_http_get,
    wait_until,
)
from workerkit import exitcodes
from workerkit.proctree import processes_with_env
from workerkit.supervisor.process import descendants

pytestmark = pytest.mark.e2e

GATE_ENV = "WORKERKIT_START_GATE"


def start(env: Env, hold: Path, **settings: str) -> Supervisor:
    hold.touch()
    env.extra["E2E_HOLD_IMPORT"] = str(hold)
    return start_worker(
        [*WORKERKIT, "run", "sql"],
        env,
        app="tests.apps.held_import:app",
        name="supervisor",
        engine={"database_url": env.database_url, "poll_interval": "0.1"},
        settings=settings,
    )


def worker_at_its_gate(pod: Supervisor) -> int | None:
    """The pid of the supervisor's worker blocked reading its start gate, if there is one."""
    for pid in descendants(pod.pid):
        with contextlib.suppress(OSError):
            if b"workerkit.engines.sql" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            gate = next(v for v in environ if v.startswith(f"{GATE_ENV}=".encode()))
            fd = int(gate.split(b"=", 1)[1])
            # /proc/PID/syscall: "0 0xFD ..." is read(2) on descriptor FD, blocked now.
            call = Path(f"/proc/{pid}/syscall").read_text().split()
            if call[:2] == ["0", hex(fd)]:
                return pid
    return None


@pytest.mark.timeout(60)
def test_the_worker_starts_beside_the_app_check_and_waits_at_its_gate(env: Env) -> None:
    hold = env.tmp / "hold"
    with stopped_after(start(env, hold)) as pod:
        # The app check cannot answer (its import waits), yet the worker is there, its engine
        # imported, blocked at its gate: not announced, no probe listening, nothing claimed.
        early = wait_until(lambda: worker_at_its_gate(pod), timeout=30, what="worker at gate")
        assert not pod.events_named("worker_started"), pod.log_text()
        assert try_http_get(pod.port, "/readyz") is None
        hold.unlink()
        pod.wait_ready(30)
        assert pod.worker_pid() == early
        job = env.enqueue("tick", "after-the-gate", job_id="j-gate")
        wait_until(lambda: env.job(job)["state"] == "succeeded", timeout=15, what="job done")
        assert stop_gracefully(pod) == exitcodes.OK


@pytest.mark.timeout(60)
def test_a_refused_budget_kills_the_worker_at_its_gate_before_it_touches_the_queue(
    env: Env,
) -> None:
    job = env.enqueue("tick", "never", job_id="j-refused")
    hold = env.tmp / "hold"
    # F1: a checkpoint interval above half the drain window is an error of the budget.
    with stopped_after(start(env, hold, checkpoint_interval="5", grace_period="3")) as pod:
        early = wait_until(lambda: worker_at_its_gate(pod), timeout=30, what="worker at gate")
        hold.unlink()
        code = pod.proc.wait(30)
        assert code == exitcodes.CONFIG_ERROR, pod.log_text()
        assert "[F1]" in pod.wait_event("timing_budget_invalid")["message"]
        assert not pod.events_named("worker_started")
        assert not Path(f"/proc/{early}").exists()  # killed and reaped
        assert processes_with_env("E2E_HOLD_IMPORT", str(hold)) == []
        assert (env.job(job)["state"], env.job(job)["attempts"]) == ("ready", 0)


@pytest.mark.timeout(60)
def test_a_supervisor_killed_while_its_worker_waits_at_the_gate_takes_the_worker_with_it(
    env: Env,
) -> None:
    """The worker's lifeline is armed after the gate; before it, the gate's end of file is."""
    hold = env.tmp / "hold"
    with stopped_after(start(env, hold)) as pod:
        early = wait_until(lambda: worker_at_its_gate(pod), timeout=30, what="worker at gate")
        pod.proc.kill()
        pod.proc.wait(10)
        wait_until(lambda: gone(early), timeout=10, what=f"the worker {early} to exit")
        hold.unlink()  # the app check (held by the test) ends too
        wait_until(
            lambda: not processes_with_env("E2E_HOLD_IMPORT", str(hold)),
            timeout=20,
            what="the app check to exit",
        )


def gone(pid: int) -> bool:
    """``pid`` exited (a zombie nobody reaped yet counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
