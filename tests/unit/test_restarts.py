"""Restarting a crashed worker inside the pod: the backoff, the crash-loop limit, the machine."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

import pytest

from workerkit import exitcodes
from workerkit.supervisor.lifecycle import (
    Action,
    Exit,
    JobStarted,
    Lifecycle,
    Log,
    ReleaseCompleted,
    ReleaseInFlight,
    SignalReceived,
    StartChild,
    State,
    Tick,
    WorkerExited,
    WorkerReady,
)
from workerkit.supervisor.restarts import CRASH_LOOP_LIMIT, CRASH_LOOP_WINDOW, CrashLoop

D, M = 10.0, 4.0
KILLED = -int(signal.SIGKILL)


def ref(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "token": f"tok-{job_id}", "queue": "default"}


def events(actions: Sequence[Action]) -> list[str]:
    return [action.event for action in actions if isinstance(action, Log)]


def exits(actions: Sequence[Action]) -> list[Exit]:
    return [action for action in actions if isinstance(action, Exit)]


def ready(now: float = 0.0) -> Lifecycle:
    machine = Lifecycle(D, M, restart_crashed=True)
    machine.handle(WorkerReady(now))
    return machine


def test_the_backoff_doubles_and_the_limit_ends_it() -> None:
    loop = CrashLoop()
    delays = [loop.crashed(float(n)) for n in range(CRASH_LOOP_LIMIT)]
    assert delays == [0.5, 1.0, 2.0, 4.0, None]


def test_crashes_older_than_the_window_do_not_count() -> None:
    loop = CrashLoop()
    for n in range(CRASH_LOOP_LIMIT - 1):
        assert loop.crashed(float(n)) is not None
    assert loop.crashed(CRASH_LOOP_WINDOW + 10) == 0.5


def test_a_crash_releases_the_jobs_then_restarts_the_worker_after_the_backoff() -> None:
    machine = ready()
    machine.handle(JobStarted("a", ref("a")))
    actions = machine.handle(WorkerExited(KILLED, 1.0))
    assert events(actions) == ["worker_crashed", "release_in_flight"]
    assert ReleaseInFlight((ref("a"),), crashed=True) in actions
    assert machine.state is State.STARTING  # not ready while there is no worker
    assert not exits(actions)
    actions = machine.handle(ReleaseCompleted(1, 1.1))
    assert events(actions) == ["in_flight_released"]
    assert not exits(actions)
    assert machine.keeps_time  # the runner ticks finely until the restart
    assert machine.handle(Tick(1.4)) == []  # the backoff: 0.5 s
    actions = machine.handle(Tick(1.5))
    assert StartChild() in actions
    assert events(actions) == ["worker_restarting"]
    machine.handle(WorkerReady(2.0))
    assert machine.state is State.READY
    assert not machine.keeps_time


def test_the_restart_waits_for_the_release() -> None:
    machine = ready()
    machine.handle(JobStarted("a", ref("a")))
    machine.handle(WorkerExited(KILLED, 1.0))
    assert machine.handle(Tick(4.9)) == []  # the release is still running (M = 4 s)
    assert StartChild() in machine.handle(ReleaseCompleted(1, 4.95))


def test_a_release_that_hangs_delays_the_restart_by_the_release_margin_at_most() -> None:
    # A store that stopped answering mid-request: no worker at all until a liveness restart.
    machine = ready()
    machine.handle(JobStarted("a", ref("a")))
    machine.handle(WorkerExited(KILLED, 1.0))
    assert machine.handle(Tick(1.0 + M - 0.1)) == []
    actions = machine.handle(Tick(1.0 + M))
    assert events(actions) == ["release_failed", "worker_restarting"]
    assert StartChild() in actions
    assert machine.in_flight == {}  # they come back through their leases
    assert machine.handle(ReleaseCompleted(1, 9.0)) == []  # late: nothing more to do


def test_a_signal_during_the_backoff_stops_without_a_new_worker() -> None:
    machine = ready()
    machine.handle(WorkerExited(KILLED, 1.0))
    actions = machine.handle(SignalReceived(int(signal.SIGTERM), 1.2))
    assert exits(actions) == [Exit(exitcodes.OK, "clean", 0.0)]
    assert StartChild() not in actions


def test_the_crash_loop_limit_exits_worker_crashed_naming_the_limit() -> None:
    machine = ready()
    now = 0.0
    for _ in range(CRASH_LOOP_LIMIT - 1):
        now += 1.0
        machine.handle(WorkerExited(KILLED, now))
        now += 10.0
        assert StartChild() in machine.handle(Tick(now))
        machine.handle(WorkerReady(now))
    actions = machine.handle(WorkerExited(KILLED, now + 1))
    assert events(actions)[0] == "worker_crash_loop"
    limit = next(a for a in actions if isinstance(a, Log))
    assert "crash-loop limit" in limit.message
    assert exits(actions)[0].code == exitcodes.WORKER_CRASHED


def test_a_restarted_worker_that_dies_before_it_is_ready_is_not_restarted() -> None:
    machine = ready()
    machine.handle(WorkerExited(KILLED, 1.0))
    machine.handle(Tick(2.0))
    actions = machine.handle(WorkerExited(1, 3.0))
    assert StartChild() not in actions
    assert exits(actions)[0].code == exitcodes.WORKER_CRASHED


@pytest.mark.parametrize("restart", [False, True])
def test_a_crash_before_the_first_ready_is_a_startup_failure_either_way(restart: bool) -> None:
    machine = Lifecycle(D, M, restart_crashed=restart)
    actions = machine.handle(WorkerExited(1, 1.0))
    assert exits(actions)[0].code == exitcodes.STARTUP_FAILED


def test_without_restarts_a_crash_exits_as_before() -> None:
    machine = Lifecycle(D, M)
    machine.handle(WorkerReady(0.0))
    actions = machine.handle(WorkerExited(KILLED, 1.0))
    assert exits(actions)[0].code == exitcodes.WORKER_CRASHED
