"""``workerkit run sql`` under real signals: what happens to every job, as the job recorded it.

Timing (tests/support/harness.py): G = 6 s, M = 2 s, D = 4 s. After SIGTERM: request_stop at 4 s,
the engine's release at 5 s, SIGKILL at 5.6 s, exit by 6 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.support.harness import (
    DRAIN,
    GRACE,
    Env,
    children_of,
    process_state,
    stop_gracefully,
    supervisor,
    try_http_get,
    wait_until,
)
from tests.support.run_socket import socket_of
from workerkit import exitcodes


def assert_released(env: Env, job_id: str) -> dict[str, object]:
    """Back in its queue, ready for another worker at once, its attempt not consumed."""
    job = env.job(job_id)
    assert job["state"] == "ready", job
    assert job["attempts"] == 0, job
    assert job["lease_token"] is None, job
    return job


def test_idle_worker_exits_zero_at_once_and_readiness_fails_right_after_sigterm(
    env: Env,
) -> None:
    with supervisor(env) as running:
        running.wait_ready()
        assert running.get("/startupz") == (200, "ok\n")
        assert running.get("/livez") == (200, "ok\n")
        running.signal(signal.SIGTERM)
        # The idle worker is gone in a few tens of milliseconds, and the probes with it: ask
        # at once (a refused connection would mean the supervisor had already exited).
        answer = try_http_get(running.port, "/readyz")
        code, elapsed = running.wait_exit()
    assert answer in ((503, "draining since SIGTERM\n"), (503, "stopped\n")), answer
    assert code == exitcodes.OK
    assert elapsed < 1.5, f"an idle worker took {elapsed:.2f}s to stop"
    (stopped,) = running.events_named("supervisor_stopped")
    assert stopped["outcome"] == "clean"


def test_job_in_hand_finishes_and_nothing_else_starts_after_sigterm(env: Env) -> None:
    env.enqueue("sleep", "a", 2.0, job_id="a")
    with supervisor(env) as running:
        env.wait_line("start a 1")
        # Queued after the first one started, so the first claim cannot have taken them.
        env.enqueue("sleep", "b", 0.1, job_id="b")
        env.enqueue("sleep", "c", 0.1, job_id="c")
        running.signal(signal.SIGTERM)
        assert running.get("/readyz")[0] == 503
        code, elapsed = running.wait_exit()
    assert code == exitcodes.OK
    assert env.lines() == ["start a 1", "done a"]
    assert elapsed < DRAIN
    assert env.job("a")["state"] == "succeeded"
    for job_id in ("b", "c"):
        job = env.job(job_id)
        assert (job["state"], job["attempts"]) == ("ready", 0)


def test_cooperative_job_longer_than_drain_checkpoints_is_released_and_resumes(
    env: Env,
) -> None:
    steps = 60  # 6 s of work: longer than D = 4 s
    env.enqueue("cooperative", "x", steps, job_id="x")
    with supervisor(env) as running:
        env.wait_line("start x 1 from 0")
        running.signal(signal.SIGTERM)
        code, elapsed = running.wait_exit()
    assert code == exitcodes.OK
    assert DRAIN - 0.5 < elapsed < GRACE, elapsed
    first, stop = env.lines()
    assert first == "start x 1 from 0"
    assert stop.startswith("stop x at ")
    stopped_at = int(stop.rsplit(" ", 1)[1])
    assert 0 < stopped_at < steps
    job = assert_released(env, "x")
    assert job["checkpoint"] == stopped_at
    assert running.events_named("supervisor_stopped")[0]["outcome"] == "released"

    # Another worker takes it next, from its checkpoint, as attempt 1 again.
    with supervisor(env, name="second") as second:
        env.wait_line("done x")
        assert stop_gracefully(second) == exitcodes.OK
    assert env.lines() == [first, stop, f"start x 1 from {stopped_at}", "done x"]
    assert env.job("x")["state"] == "succeeded"


def test_stubborn_job_longer_than_drain_is_interrupted_and_released(env: Env) -> None:
    env.enqueue("stubborn", "s", 30.0, job_id="s")
    with supervisor(env) as running:
        env.wait_line("start s 1")
        running.signal(signal.SIGTERM)
        code, elapsed = running.wait_exit()
    assert code == exitcodes.OK
    assert DRAIN < elapsed < GRACE, elapsed
    # The worker interrupts the job's thread and exits at once; whether the thread got to
    # record its interruption before the process ended is a race, not part of the contract.
    lines = env.lines()
    assert lines[0] == "start s 1"
    assert lines[1:] in ([], ["interrupted s JobInterrupted"])
    assert_released(env, "s")
    sent = [e["command"] for e in running.events_named("command_sent")]
    assert sent == ["request_stop", "release"]

    with supervisor(env, name="second") as second:
        env.wait_line("start s 1", timeout=15)
        wait_until(lambda: env.lines().count("start s 1") == 2, timeout=15, what="a re-run")
        assert stop_gracefully(second) == exitcodes.OK


def test_second_sigterm_and_sigint_during_the_drain_change_nothing(env: Env) -> None:
    steps = 60
    env.enqueue("cooperative", "x", steps, job_id="x")
    with supervisor(env) as running:
        env.wait_line("start x 1 from 0")
        running.signal(signal.SIGTERM)
        running.wait_event("drain_started")
        running.signal(signal.SIGTERM)
        running.signal(signal.SIGINT)
        code, elapsed = running.wait_exit()
    assert code == exitcodes.OK
    assert DRAIN - 0.5 < elapsed < GRACE, elapsed
    lines = env.lines()
    assert lines[0] == "start x 1 from 0"
    assert lines[1].startswith("stop x at ")
    assert len(lines) == 2
    assert_released(env, "x")
    assert len(running.events_named("signal_ignored")) == 2
    assert len(running.events_named("worker_signalled")) == 1  # the worker got one SIGTERM


def test_worker_sigkilled_mid_job_is_restarted_and_the_job_runs_again_once(env: Env) -> None:
    env.enqueue("killed_once", "k", job_id="k")  # an out-of-memory kill of its worker, once
    with supervisor(env) as running:
        first = running.worker_pid()
        env.wait_line("done k", timeout=30)
        crashed = running.wait_event("worker_crashed")
        assert crashed["returncode"] == -signal.SIGKILL
        assert crashed["restart_in"] == 0.5
        restarted = running.events_named("worker_started")
        assert len(restarted) == 2
        assert restarted[1]["pid"] != first
        assert running.events_named("in_flight_released")[0]["released"] == 1
        # Not ready while the new worker starts: the machine went back to starting.
        states = [e["state"] for e in running.events_named("state_changed")]
        assert states[:3] == ["ready", "starting", "ready"], states
        # The job's "done" line comes before its ack, which goes out with the worker's next
        # claim (a moment later, longer under load): wait for it.
        job = wait_until(
            lambda: (row := env.job("k"))["state"] == "succeeded" and row,
            timeout=15,
            what="the re-run's ack",
        )
        assert job["attempts"] == 2, job  # the crash kept its attempt
        assert running.get("/readyz")[0] == 200
        code = stop_gracefully(running)
    assert code == exitcodes.OK
    assert env.lines() == ["start k 1", "start k 2", "done k"]


def test_a_job_prefetched_by_a_sigkilled_worker_is_released_unstarted_attempt_given_back(
    env: Env,
) -> None:
    env.enqueue("sleep", "a", 1.5, job_id="a")
    with supervisor(env) as running:
        env.wait_line("start a 1")
        env.enqueue("sleep", "b", 0.1, job_id="b")  # claimed beside a, held for the next slot
        # Killed once the supervisor has heard of it. The worker tells it just after the claim
        # commits; a kill in between leaves b to its lease's expiry, as any job claimed by a
        # worker that died before it could say so (the database's state alone raced this).
        wait_until(
            lambda: [
                e
                for e in running.events_named("job_prefetched")
                if e.get("logger") == "workerkit.supervisor.runner" and e.get("job_id") == "b"
            ],
            timeout=10,
            what="the supervisor hearing of b's prefetch",
        )
        assert env.job("b")["state"] == "running"
        os.kill(running.worker_pid(), signal.SIGKILL)
        crashed = running.wait_event("worker_crashed")
        assert crashed["returncode"] == -signal.SIGKILL
        assert running.wait_event("in_flight_released")["released"] == 2
        env.wait_line("done b", timeout=30)
        for job_id, attempts in (("a", 2), ("b", 1)):  # a's crash kept its attempt, b's not
            job = wait_until(
                lambda job_id=job_id: (row := env.job(job_id))["state"] == "succeeded" and row,
                timeout=15,
                what=f"{job_id}'s ack",
            )
            assert job["attempts"] == attempts, job
        code = stop_gracefully(running)
    assert code == exitcodes.OK
    assert env.lines() == ["start a 1", "start a 2", "done a", "start b 1", "done b"]


@pytest.mark.timeout(120)
def test_a_worker_that_keeps_crashing_ends_the_pod_at_the_crash_loop_limit(env: Env) -> None:
    for n in range(5):  # each kills every worker that runs it (3 attempts each)
        env.enqueue("kills_its_worker", f"c{n}", job_id=f"c{n}")
    with supervisor(env, concurrency="1") as running:
        code, _ = running.wait_exit(60)
        assert code == exitcodes.WORKER_CRASHED, running.log_text()
        limit = running.wait_event("worker_crash_loop")
        assert "crash-loop limit" in limit["message"], limit
        assert limit["crashes"] == 5
        assert len(running.events_named("worker_started")) == 5
    assert len(env.lines()) == 5, env.lines()  # one job started by each of the 5 workers
    jobs = [env.job(f"c{n}") for n in range(5)]
    assert sum(job["attempts"] for job in jobs) == 5  # each crash kept its attempt
    assert all(job["lease_token"] is None for job in jobs), jobs  # nothing left leased


def test_wedged_worker_is_killed_at_the_hard_deadline_and_its_job_released(env: Env) -> None:
    env.enqueue("sleep", "w", 30.0, job_id="w")
    with supervisor(env) as running:
        env.wait_line("start w 1")
        worker = running.worker_pid()
        os.kill(worker, signal.SIGSTOP)  # wedged: deaf to SIGTERM and to commands
        running.signal(signal.SIGTERM)
        code, elapsed = running.wait_exit()
    assert code == exitcodes.OK
    assert elapsed < GRACE, elapsed
    assert env.lines() == ["start w 1"]
    assert_released(env, "w")
    assert process_state(worker) is None  # killed and reaped
    stopped = running.events_named("supervisor_stopped")[0]
    assert stopped["outcome"] == "forced"
    assert running.events_named("worker_killed")


def test_worker_that_stops_heartbeating_fails_livez(env: Env) -> None:
    with supervisor(env, liveness_timeout="3") as running:
        running.wait_ready()
        worker = running.worker_pid()
        assert running.get("/livez") == (200, "ok\n")
        os.kill(worker, signal.SIGSTOP)
        try:
            _status, body = wait_until(
                lambda: (answer := running.get("/livez"))[0] == 503 and answer,
                timeout=15,
                what="/livez to fail",
            )
            assert body.startswith("worker heartbeat is ")
            assert "liveness_timeout 3s" in body
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: running.get("/livez")[0] == 200, timeout=15, what="/livez to recover")
        assert stop_gracefully(running) == exitcodes.OK


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare(1) and root to create a PID namespace",
)
def test_as_pid1_of_a_new_pid_namespace_drains_and_leaves_no_zombie(env: Env) -> None:
    wrapper = ["unshare", "--pid", "--fork", "--mount-proc"]
    env.enqueue("orphan", "o", job_id="o")
    with supervisor(env, wrapper=wrapper) as running:
        running.wait_ready()
        (pid1,) = wait_until(lambda: children_of(running.pid), timeout=10, what="PID 1")
        assert running.wait_event("supervisor_starting")["pid"] == 1
        env.wait_line("done o")
        env.wait_line("orphan o exiting")

        def no_zombie() -> bool:
            return all(process_state(pid) != "Z" for pid in children_of(pid1))

        wait_until(no_zombie, timeout=5, what="PID 1 to reap the orphan")
        env.enqueue("sleep", "a", 2.0, job_id="a")
        env.wait_line("start a 1")
        running.signal(signal.SIGTERM, pid=pid1)
        code, elapsed = running.wait_exit()
    assert code == exitcodes.OK  # unshare exits with its child's code
    assert elapsed < DRAIN
    assert env.lines()[-2:] == ["start a 1", "done a"]
    assert env.job("a")["state"] == "succeeded"
    assert env.job("o")["state"] == "succeeded"


def test_sigterm_while_the_worker_is_still_starting_stops_it_without_a_drain_window(
    env: Env,
) -> None:
    # The worker is stuck in its startup and deaf to SIGTERM (tests/apps/stuck_start.py): no
    # job can be in hand, so nothing waits for D; it is killed at 0.8 M, and the exit code
    # says it never got ready.
    with supervisor(env, app="tests.apps.stuck_start:app") as running:
        wait_until(
            lambda: any(line.startswith("stuck ") for line in env.lines()),
            timeout=15,
            what="the worker to be stuck starting",
        )
        running.signal(signal.SIGTERM)
        code, elapsed = running.wait_exit()
    assert code == exitcodes.STARTUP_FAILED
    assert elapsed < DRAIN, elapsed  # killed at 0.8 M = 1.6 s, not at D + 0.8 M = 5.6 s
    (drain,) = running.events_named("drain_started")
    assert drain["before_ready"] is True
    assert drain["request_stop_in"] == 0
    assert running.events_named("worker_killed")
    worker = int(env.lines()[0].split()[1])
    assert process_state(worker) is None  # killed and reaped
    (stopped,) = running.events_named("supervisor_stopped")
    assert (stopped["outcome"], stopped["ready"]) == ("forced", False)


def _socket_dir_of(pid: int) -> Path:
    return socket_of(pid).parent


def test_runtime_directories_left_by_a_sigkilled_pod_are_removed_at_the_next_start(
    env: Env,
) -> None:
    # The whole tree SIGKILLed at once (an OOM kill of the container's cgroup, kill -9 -1): the
    # supervisor cannot remove its runtime directory, nor can its worker. The next start does,
    # and leaves alone a live supervisor's and one that is not ours.
    base = Path(tempfile.mkdtemp(prefix="wk-", dir="/tmp"))
    env.extra["TMPDIR"] = str(base)
    try:
        with supervisor(env, name="first") as first:
            first.wait_ready()
            worker = first.worker_pid()
            stale = _socket_dir_of(worker)
            assert stale.parent == base
            for pid in (first.pid, worker):  # stopped first, so neither sees the other die
                os.kill(pid, signal.SIGSTOP)
            for pid in (first.pid, worker):
                os.kill(pid, signal.SIGKILL)
            first.wait_exit()
            wait_until(lambda: process_state(worker) in (None, "Z"), timeout=10, what="worker")
        assert stale.is_dir()
        foreign = base / "workerkit-foreign"  # no owner file: not ours, whatever its name
        foreign.mkdir()
        with supervisor(env, name="second") as second:
            second.wait_ready()
            live = _socket_dir_of(second.worker_pid())
            (removed,) = second.events_named("stale_runtime_dirs_removed")
            assert removed["paths"] == [str(stale)]
            assert not stale.exists()
            with supervisor(env, name="third") as third:
                third.wait_ready()
                assert not third.events_named("stale_runtime_dirs_removed"), third.log_text()
                assert live.is_dir()
                assert foreign.is_dir()
                assert stop_gracefully(third) == 0
            assert stop_gracefully(second) == 0
        assert sorted(p.name for p in base.iterdir()) == ["workerkit-foreign"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
