"""``workerkit run``'s start: the worker is spawned at once and waits at its start gate.

The worker's interpreter imports its engine beside the supervisor's own imports and app check,
then waits at its gate (engines/startgate.py) until the supervisor's checks passed; a refused
configuration kills it there, before it has loaded the app or touched the queue. Real
``workerkit run sql`` processes on a SQLite file; the app check is held open by an app whose
import waits for a file (tests/apps/held_import.py).
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import pytest

from tests.support.harness import (
    WORKERKIT,
    Env,
    Supervisor,
    gone,
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


def early_worker(pod: Supervisor) -> int | None:
    """The pid of the supervisor's sql worker process, if it has been spawned: forked from the
    CLI (named wk-sql-worker) or exec'd (``python -m workerkit.engines.sql``)."""
    for pid in descendants(pod.pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "wk-sql-worker":
                return pid
            if b"workerkit.engines.sql" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fork", [True, False], ids=["forked", "execd"])
def test_the_worker_is_spawned_at_once_and_answers_the_app_check_itself(
    env: Env, fork: bool
) -> None:
    """Forked from the CLI where it is single-threaded (supervisor/forked.py), or exec'd with
    WORKERKIT_FORK_WORKER=0: the same start either way."""
    hold = env.tmp / "hold"
    if not fork:
        env.extra["WORKERKIT_FORK_WORKER"] = "0"
    with stopped_after(start(env, hold)) as pod:
        # The app check cannot answer (the app's import waits), yet the worker is there: the
        # supervisor's only child (no forked check), not announced, no probe listening.
        early = wait_until(lambda: early_worker(pod), timeout=30, what="the worker spawned")
        assert descendants(pod.pid) == [early]
        cmdline = Path(f"/proc/{early}/cmdline").read_bytes()
        if fork:  # a copy of the CLI process: its command line, its own name
            assert cmdline == Path(f"/proc/{pod.pid}/cmdline").read_bytes()
            assert Path(f"/proc/{early}/comm").read_text().strip() == "wk-sql-worker"
        else:
            assert b"-m\0workerkit.engines.sql" in cmdline
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
        early = wait_until(lambda: early_worker(pod), timeout=30, what="the worker spawned")
        hold.unlink()
        code = pod.proc.wait(30)
        assert code == exitcodes.CONFIG_ERROR, pod.log_text()
        assert "[F1]" in pod.wait_event("timing_budget_invalid")["message"]
        assert not pod.events_named("worker_started")
        assert not Path(f"/proc/{early}").exists()  # killed and reaped
        assert processes_with_env("E2E_HOLD_IMPORT", str(hold)) == []
        assert (env.job(job)["state"], env.job(job)["attempts"]) == ("ready", 0)


@pytest.mark.timeout(60)
def test_a_supervisor_killed_before_the_gate_opened_takes_the_worker_with_it(env: Env) -> None:
    """Even in the middle of the app's import (held here): until the gate opens the worker has
    PR_SET_PDEATHSIG set, and nothing has been claimed yet."""
    hold = env.tmp / "hold"
    with stopped_after(start(env, hold)) as pod:
        early = wait_until(lambda: early_worker(pod), timeout=30, what="the worker spawned")
        pod.proc.kill()
        pod.proc.wait(10)
        wait_until(lambda: gone(early), timeout=10, what=f"the worker {early} to exit")
        assert "Traceback" not in pod.log_text()


@pytest.mark.timeout(60)
def test_a_sigterm_while_the_app_is_imported_stops_the_pod_at_once_before_any_job(
    env: Env,
) -> None:
    """A pod deleted while it starts: the SIGTERM arrives before the supervisor's loop listens
    (the CLI waits for the app check). It is not lost (ignored as PID 1, the pod would consume
    jobs until the kubelet's SIGKILL) and not left waiting for an import that may never end:
    the worker is killed at its gate, nothing was claimed, and the exit says it never got
    ready. The import here never returns while the test runs."""
    job = env.enqueue("tick", "never", job_id="j-sigterm")
    hold = env.tmp / "hold"
    with stopped_after(start(env, hold)) as pod:
        early = wait_until(lambda: early_worker(pod), timeout=30, what="the worker spawned")
        pod.signal(signal.SIGTERM)
        code, _ = pod.wait_exit(30)
        assert code == exitcodes.STARTUP_FAILED, pod.log_text()
        stopped = pod.wait_event("supervisor_stopped")
        assert (stopped["reason"], stopped["ready"]) == ("SIGTERM", False), stopped
        assert stopped["while"] == "loading the app", stopped
        assert not pod.events_named("worker_started")
        wait_until(lambda: gone(early), timeout=10, what=f"the worker {early} to exit")
        assert processes_with_env("E2E_HOLD_IMPORT", str(hold)) == []
        assert (env.job(job)["state"], env.job(job)["attempts"]) == ("ready", 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fork", [True, False], ids=["forked", "execd"])
def test_an_app_import_that_hangs_fails_the_start_after_startup_timeout_with_its_stack(
    env: Env, fork: bool
) -> None:
    """An app that connects at import time to a service that is down: after startup_timeout
    the worker's stacks are logged (faulthandler), it is killed at its gate, and the exit
    names the setting and the fix, instead of a pod stuck until its startupProbe gives up."""
    job = env.enqueue("tick", "never", job_id="j-hung")
    hold = env.tmp / "hold"
    if not fork:
        env.extra["WORKERKIT_FORK_WORKER"] = "0"
    with stopped_after(start(env, hold, startup_timeout="2")) as pod:
        early = wait_until(lambda: early_worker(pod), timeout=30, what="the worker spawned")
        code, _ = pod.wait_exit(30)
        log = pod.log_text()
        assert code == exitcodes.STARTUP_FAILED, log
        assert "the app did not load within startup_timeout (2 s)" in log, log
        assert "WORKERKIT_STARTUP_TIMEOUT" in log, log
        # The stack of the import, where it waits: the operator's first question.
        assert "(most recent call first)" in log, log
        assert "held_import.py" in log, log
        assert not pod.events_named("worker_started")
        wait_until(lambda: gone(early), timeout=10, what=f"the worker {early} to exit")
        assert (env.job(job)["state"], env.job(job)["attempts"]) == ("ready", 0)
