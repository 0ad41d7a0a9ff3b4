"""The supervisor's lifecycle state machine, input by input, instant by instant."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workerkit import exitcodes
from workerkit.events import Release, RequestStop
from workerkit.settings import Settings
from workerkit.supervisor.lifecycle import (
    Action,
    BroadcastCommand,
    Exit,
    Input,
    JobFinished,
    JobStarted,
    KillChild,
    Lifecycle,
    Log,
    ReleaseCompleted,
    ReleaseInFlight,
    SignalChild,
    SignalReceived,
    State,
    Tick,
    WorkerExited,
    WorkerReady,
    WorkerStopping,
)
from workerkit.timing.deadlines import Deadlines

D = 10.0  # drain window
M = 4.0  # release margin
T0 = 1000.0  # the instant of the first SIGTERM
STOP_AT = T0 + D  # 1010.0
RELEASE_AT = T0 + D + M / 2  # 1012.0
KILL_AT = T0 + D + 0.8 * M  # 1013.2
EXIT_AT = T0 + D + M  # 1014.0

SIGTERM = int(signal.SIGTERM)
SIGINT = int(signal.SIGINT)
SIGHUP = int(signal.SIGHUP)
SIGQUIT = int(signal.SIGQUIT)


def ref(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "token": f"tok-{job_id}", "queue": "default"}


def ready_machine() -> Lifecycle:
    machine = Lifecycle(D, M)
    machine.handle(WorkerReady(now=T0 - 5))
    return machine


def draining_machine(*jobs: str, signum: int = SIGTERM) -> Lifecycle:
    machine = ready_machine()
    for job in jobs:
        machine.handle(JobStarted(job, ref(job)))
    machine.handle(SignalReceived(signum, T0))
    return machine


def effects(actions: Sequence[Action]) -> list[Action]:
    """The actions other than log lines."""
    return [action for action in actions if not isinstance(action, Log)]


def events(actions: Sequence[Action]) -> list[str]:
    """The ``event`` names of the log lines."""
    return [action.event for action in actions if isinstance(action, Log)]


def the_exit(actions: Sequence[Action]) -> Exit:
    exits = [action for action in actions if isinstance(action, Exit)]
    assert len(exits) == 1, actions
    return exits[0]


# --- starting and ready ---------------------------------------------------------------------


def test_starts_in_starting_and_not_ready() -> None:
    machine = Lifecycle(D, M)
    assert machine.state is State.STARTING
    assert not machine.ready
    assert not machine.shutting_down


def test_worker_ready_makes_it_ready_once() -> None:
    machine = Lifecycle(D, M)
    actions = machine.handle(WorkerReady(now=1.0))
    assert machine.state is State.READY
    assert machine.ready
    assert events(actions) == ["worker_ready"]
    assert effects(actions) == []
    assert machine.handle(WorkerReady(now=2.0)) == []


def test_ticks_while_ready_do_nothing() -> None:
    machine = ready_machine()
    for now in (T0, T0 + 1000, T0 + 1e6):
        assert machine.handle(Tick(now)) == []
    assert machine.state is State.READY


def test_only_a_drain_needs_the_fine_ticks() -> None:
    """The runner ticks every second while nothing is timed, every 0.1 s from the first signal
    (its deadlines) on."""
    machine = ready_machine()
    assert not machine.keeps_time
    machine.handle(SignalReceived(SIGTERM, T0))
    assert machine.keeps_time


def test_from_settings_takes_drain_window_and_release_margin() -> None:
    machine = Lifecycle.from_settings(Settings(grace_period=30, prestop_delay=3, release_margin=5))
    assert machine.drain_window == 22
    assert machine.release_margin == 5


# --- the first signal -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "name"), [(SIGTERM, "SIGTERM"), (SIGINT, "SIGINT"), (SIGHUP, "SIGHUP")]
)
def test_first_signal_drains_and_sends_sigterm_to_the_worker_once(signum: int, name: str) -> None:
    machine = ready_machine()
    actions = machine.handle(SignalReceived(signum, T0))
    assert machine.state is State.DRAINING
    assert not machine.ready
    assert machine.shutdown_reason == name
    assert events(actions) == ["signal_received", "drain_started"]
    # SIGINT is forwarded as SIGTERM: the native worker ignores SIGINT on purpose.
    assert effects(actions) == [SignalChild(SIGTERM)]


def test_sigquit_asks_the_jobs_to_stop_and_releases_them_at_once() -> None:
    machine = ready_machine()
    machine.handle(JobStarted("a", ref("a")))
    actions = machine.handle(SignalReceived(SIGQUIT, T0))
    assert machine.shutdown_reason == "SIGQUIT"
    assert effects(actions) == [
        SignalChild(SIGTERM),
        BroadcastCommand(RequestStop()),
        BroadcastCommand(Release()),
    ]
    received = next(a for a in actions if isinstance(a, Log) and a.event == "signal_received")
    assert received.fields == {"signal": "SIGQUIT", "immediate": True}
    # No drain window before the kill and the exit either: they come 0.8 M and M after now.
    assert effects(machine.handle(Tick(T0 + 0.8 * M))) == [KillChild()]
    assert machine.deadlines is not None
    assert machine.deadlines.exit_at == T0 + M


def test_sigquit_during_a_drain_skips_the_rest_of_the_window_once() -> None:
    machine = draining_machine("a")
    actions = machine.handle(SignalReceived(SIGQUIT, T0 + 1))
    assert effects(actions) == [BroadcastCommand(RequestStop()), BroadcastCommand(Release())]
    assert effects(machine.handle(SignalReceived(SIGQUIT, T0 + 2))) == []
    assert machine.deadlines is not None
    assert machine.deadlines.kill_at == KILL_AT  # the kill and exit deadlines stay


def test_drain_started_log_shows_the_deadlines() -> None:
    machine = ready_machine()
    actions = machine.handle(SignalReceived(SIGTERM, T0))
    drain = next(a for a in actions if isinstance(a, Log) and a.event == "drain_started")
    assert drain.fields["request_stop_in"] == D
    assert drain.fields["release_in"] == D + M / 2
    assert drain.fields["kill_in"] == pytest.approx(D + 0.8 * M)
    assert drain.fields["exit_in"] == D + M


def test_deadlines_are_measured_from_the_first_signal() -> None:
    machine = draining_machine()
    assert machine.deadlines == Deadlines(
        started_at=T0,
        request_stop_at=STOP_AT,
        release_at=RELEASE_AT,
        kill_at=pytest.approx(KILL_AT),  # type: ignore[arg-type]
        exit_at=EXIT_AT,
    )


def test_deadlines_clamp_negative_windows_to_zero() -> None:
    deadlines = Deadlines.after(5.0, -3.0, -1.0)
    assert deadlines.request_stop_at == deadlines.exit_at == 5.0


# --- the deadlines, instant by instant ------------------------------------------------------

# (instant of the tick, the non-log actions that tick produces, the state after it); the ticks
# are applied in order to one machine with a job in hand that never finishes.
TIMELINE = [
    (T0 + 0.1, [], State.DRAINING),
    (STOP_AT - 0.001, [], State.DRAINING),
    (STOP_AT, [BroadcastCommand(RequestStop())], State.RELEASING),
    (STOP_AT + 0.5, [], State.RELEASING),
    (RELEASE_AT - 0.001, [], State.RELEASING),
    (RELEASE_AT, [BroadcastCommand(Release())], State.RELEASING),
    (KILL_AT - 0.001, [], State.RELEASING),
    (KILL_AT, [KillChild()], State.RELEASING),
    (EXIT_AT - 0.001, [], State.RELEASING),
]


def test_each_deadline_fires_once_at_its_instant() -> None:
    machine = draining_machine("j1")
    for now, expected, state in TIMELINE:
        assert effects(machine.handle(Tick(now))) == expected, now
        assert machine.state is state, now


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (STOP_AT, [BroadcastCommand(RequestStop())]),
        (RELEASE_AT, [BroadcastCommand(RequestStop()), BroadcastCommand(Release())]),
        (
            KILL_AT,
            [BroadcastCommand(RequestStop()), BroadcastCommand(Release()), KillChild()],
        ),
    ],
)
def test_a_late_tick_fires_every_passed_deadline_in_order(
    now: float, expected: list[Action]
) -> None:
    machine = draining_machine("j1")
    assert effects(machine.handle(Tick(now))) == expected


def test_a_tick_past_the_exit_deadline_kills_once_and_exits() -> None:
    machine = draining_machine("j1")
    actions = machine.handle(Tick(EXIT_AT + 1))
    assert effects(actions)[:3] == [
        BroadcastCommand(RequestStop()),
        BroadcastCommand(Release()),
        KillChild(),
    ]
    assert effects(actions).count(KillChild()) == 1
    exit_ = the_exit(actions)
    assert exit_.code == exitcodes.RELEASE_FAILED  # j1 could not be released in time
    assert exit_.outcome == "forced"
    assert machine.state is State.STOPPED


def test_exit_deadline_with_the_worker_still_alive_after_the_kill() -> None:
    machine = draining_machine()
    machine.handle(Tick(KILL_AT))
    actions = machine.handle(Tick(EXIT_AT))
    assert effects(actions) == [KillChild(), Exit(exitcodes.OK, "forced", EXIT_AT - T0)]
    assert "exit_deadline" in events(actions)


# --- how a drain ends -----------------------------------------------------------------------


def test_idle_worker_exits_zero_clean_right_after_the_signal() -> None:
    machine = draining_machine()
    actions = machine.handle(WorkerExited(0, T0 + 0.05))
    assert machine.state is State.STOPPED
    assert effects(actions) == [Exit(exitcodes.OK, "clean", pytest.approx(0.05))]  # type: ignore[arg-type]
    assert events(actions) == ["worker_exited", "supervisor_stopped"]
    assert machine.exit_code == exitcodes.OK
    assert machine.outcome == "clean"


def test_job_in_hand_finishes_within_the_drain_window_clean() -> None:
    machine = draining_machine("j1")
    machine.handle(Tick(T0 + 1))
    assert machine.handle(JobFinished("j1", "succeeded")) == []
    assert machine.in_flight == {}
    actions = machine.handle(WorkerExited(0, T0 + 2))
    assert the_exit(actions) == Exit(exitcodes.OK, "clean", 2.0)


def test_cooperative_job_released_after_request_stop() -> None:
    machine = draining_machine("j1")
    assert effects(machine.handle(Tick(STOP_AT))) == [BroadcastCommand(RequestStop())]
    machine.handle(JobFinished("j1", "released"))
    actions = machine.handle(WorkerExited(0, STOP_AT + 0.3))
    assert the_exit(actions) == Exit(exitcodes.OK, "released", pytest.approx(D + 0.3))  # type: ignore[arg-type]


def test_stubborn_job_released_by_the_engine_after_the_release_command() -> None:
    machine = draining_machine("j1")
    machine.handle(Tick(STOP_AT))
    assert effects(machine.handle(Tick(RELEASE_AT))) == [BroadcastCommand(Release())]
    machine.handle(JobFinished("j1", "released"))
    actions = machine.handle(WorkerExited(0, RELEASE_AT + 0.2))
    assert the_exit(actions).outcome == "released"
    assert the_exit(actions).code == exitcodes.OK


def test_killed_worker_then_supervisor_releases_its_deliveries() -> None:
    machine = draining_machine("j1", "j2")
    machine.handle(JobFinished("j2", "succeeded"))
    machine.handle(Tick(KILL_AT))
    actions = machine.handle(WorkerExited(-signal.SIGKILL, KILL_AT + 0.01))
    assert effects(actions) == [ReleaseInFlight((ref("j1"),))]
    assert events(actions) == ["worker_exited", "release_in_flight"]
    assert machine.state is State.RELEASING
    actions = machine.handle(ReleaseCompleted(1, KILL_AT + 0.1))
    assert effects(actions) == [Exit(exitcodes.OK, "forced", pytest.approx(D + 0.8 * M + 0.1))]  # type: ignore[arg-type]
    assert events(actions) == ["in_flight_released", "supervisor_stopped"]
    assert machine.in_flight == {}


def test_killed_worker_and_release_fails_exits_release_failed() -> None:
    machine = draining_machine("j1")
    machine.handle(Tick(KILL_AT))
    machine.handle(WorkerExited(-signal.SIGKILL, KILL_AT))
    actions = machine.handle(ReleaseCompleted(0, KILL_AT + 0.1, error="store unreachable"))
    assert "release_failed" in events(actions)
    assert the_exit(actions) == Exit(
        exitcodes.RELEASE_FAILED,
        "forced",
        pytest.approx(D + 0.8 * M + 0.1),  # type: ignore[arg-type]
    )


def test_release_that_outlives_the_exit_deadline_does_not_hold_the_exit() -> None:
    machine = draining_machine("j1")
    machine.handle(Tick(KILL_AT))
    machine.handle(WorkerExited(-signal.SIGKILL, KILL_AT))
    actions = machine.handle(Tick(EXIT_AT))
    assert effects(actions) == [Exit(exitcodes.RELEASE_FAILED, "forced", D + M)]
    assert machine.handle(ReleaseCompleted(1, EXIT_AT + 1)) == []


def test_no_commands_go_out_after_the_worker_exited() -> None:
    machine = draining_machine("j1")
    machine.handle(WorkerExited(0, T0 + 1))  # exited with j1 unsettled: release pending
    assert effects(machine.handle(Tick(KILL_AT))) == []


def test_worker_exit_zero_with_unsettled_jobs_releases_them() -> None:
    machine = draining_machine("j1")
    actions = machine.handle(WorkerExited(0, T0 + 1))
    assert effects(actions) == [ReleaseInFlight((ref("j1"),))]
    actions = machine.handle(ReleaseCompleted(1, T0 + 1.1))
    assert the_exit(actions) == Exit(exitcodes.OK, "released", pytest.approx(1.1))  # type: ignore[arg-type]


def test_worker_dying_of_our_sigterm_is_an_expected_exit() -> None:
    machine = draining_machine()
    actions = machine.handle(WorkerExited(-signal.SIGTERM, T0 + 0.1))
    assert the_exit(actions).code == exitcodes.OK


def test_worker_crashing_during_the_drain_is_reported_and_released() -> None:
    machine = draining_machine("j1")
    actions = machine.handle(WorkerExited(1, T0 + 3))
    assert events(actions) == ["worker_crashed", "release_in_flight"]
    assert effects(actions) == [ReleaseInFlight((ref("j1"),), crashed=True)]
    actions = machine.handle(ReleaseCompleted(1, T0 + 3.1))
    assert the_exit(actions) == Exit(exitcodes.WORKER_CRASHED, "crashed", pytest.approx(3.1))  # type: ignore[arg-type]


def test_a_prefetched_delivery_is_released_after_a_crash_and_dropped_when_put_back() -> None:
    # The sql worker's held jobs (job_prefetched, translated by the runner into a JobStarted
    # whose ref is marked): released with the running ones after a kill (the engine gives a
    # marked ref its attempt back); one the worker put back (prefetch_returned) is not.
    machine = ready_machine()
    held = {**ref("j2"), "prefetched": True}
    assert machine.handle(JobStarted("j1", ref("j1"))) == []
    assert machine.handle(JobStarted("j2", held)) == []
    assert machine.handle(JobStarted("j3", {**ref("j3"), "prefetched": True})) == []
    assert machine.handle(JobFinished("j3", "prefetch_returned")) == []
    assert machine.started == {"j1": ref("j1")}  # what presence shows as running
    actions = machine.handle(WorkerExited(-signal.SIGKILL, T0))
    assert effects(actions) == [ReleaseInFlight((ref("j1"), held), crashed=True)]


def test_a_prefetched_delivery_started_is_in_flight_as_started() -> None:
    machine = draining_machine()
    machine.handle(JobStarted("j1", {**ref("j1"), "prefetched": True}))
    assert machine.started == {}
    machine.handle(JobStarted("j1", ref("j1")))  # the worker started it
    assert machine.started == {"j1": ref("j1")}
    actions = machine.handle(WorkerExited(1, T0 + 3))
    assert effects(actions) == [ReleaseInFlight((ref("j1"),), crashed=True)]


# --- a second signal ------------------------------------------------------------------------


@pytest.mark.parametrize("second", [SIGTERM, SIGINT])
@pytest.mark.parametrize("at", [T0 + 0.5, STOP_AT + 0.1, RELEASE_AT + 0.1, KILL_AT + 0.1])
def test_second_signal_changes_nothing(second: int, at: float) -> None:
    reference = draining_machine("j1")
    machine = draining_machine("j1")
    signalled = False
    for now in [*(now for now, _, _ in TIMELINE), EXIT_AT]:
        if now >= at and not signalled:
            signalled = True
            actions = machine.handle(SignalReceived(second, at))
            assert events(actions) == ["signal_ignored"]
            assert effects(actions) == []
        assert effects(machine.handle(Tick(now))) == effects(reference.handle(Tick(now)))
        assert machine.state is reference.state
    assert signalled
    assert machine.deadlines == reference.deadlines
    assert machine.exit_code == reference.exit_code


def test_second_signal_is_logged_as_a_warning() -> None:
    machine = draining_machine()
    (log,) = machine.handle(SignalReceived(SIGTERM, T0 + 1))
    assert isinstance(log, Log)
    assert log.level > 20
    assert log.fields["signal"] == "SIGTERM"


def test_second_signal_never_skips_the_release() -> None:
    machine = draining_machine("j1")
    machine.handle(Tick(STOP_AT))
    machine.handle(SignalReceived(SIGTERM, STOP_AT + 0.1))
    assert effects(machine.handle(Tick(RELEASE_AT))) == [BroadcastCommand(Release())]


# --- crashes --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, -signal.SIGKILL, -signal.SIGSEGV])
def test_worker_exit_without_being_asked_is_a_crash(code: int) -> None:
    machine = ready_machine()
    actions = machine.handle(WorkerExited(code, T0))
    assert events(actions) == ["worker_crashed", "supervisor_stopped"]
    assert the_exit(actions) == Exit(exitcodes.WORKER_CRASHED, "crashed", None)
    assert machine.state is State.STOPPED


def test_crash_releases_known_deliveries_then_exits_nonzero() -> None:
    machine = ready_machine()
    machine.handle(JobStarted("j1", ref("j1")))
    machine.handle(JobStarted("j2", ref("j2")))
    machine.handle(JobFinished("j1", "succeeded"))
    actions = machine.handle(WorkerExited(-signal.SIGKILL, T0))
    assert effects(actions) == [ReleaseInFlight((ref("j2"),), crashed=True)]
    assert machine.state is State.RELEASING
    assert not machine.ready
    actions = machine.handle(ReleaseCompleted(1, T0 + 0.2))
    assert the_exit(actions) == Exit(exitcodes.WORKER_CRASHED, "crashed", None)


def test_crash_release_is_bounded_by_the_release_margin() -> None:
    machine = ready_machine()
    machine.handle(JobStarted("j1", ref("j1")))
    machine.handle(WorkerExited(-signal.SIGKILL, T0))
    assert effects(machine.handle(Tick(T0 + M - 0.01))) == []
    actions = machine.handle(Tick(T0 + M))
    assert the_exit(actions).code == exitcodes.WORKER_CRASHED


def test_signal_during_a_crash_release_is_ignored() -> None:
    machine = ready_machine()
    machine.handle(JobStarted("j1", ref("j1")))
    machine.handle(WorkerExited(-signal.SIGKILL, T0))
    actions = machine.handle(SignalReceived(SIGTERM, T0 + 0.1))
    assert events(actions) == ["signal_ignored"]
    assert effects(actions) == []


def test_worker_exit_before_ready_is_a_startup_failure() -> None:
    machine = Lifecycle(D, M)
    actions = machine.handle(WorkerExited(1, 5.0))
    assert events(actions) == ["worker_start_failed", "supervisor_stopped"]
    assert the_exit(actions).code == exitcodes.STARTUP_FAILED
    assert the_exit(actions).outcome == "crashed"


def test_worker_that_gave_up_waiting_for_its_store_exits_store_unavailable() -> None:
    machine = Lifecycle(D, M)
    actions = machine.handle(WorkerExited(exitcodes.STORE_UNAVAILABLE, 5.0))
    assert events(actions) == ["worker_start_failed", "supervisor_stopped"]
    assert the_exit(actions).code == exitcodes.STORE_UNAVAILABLE


def test_store_unavailable_after_ready_is_a_crash() -> None:
    machine = ready_machine()
    actions = machine.handle(WorkerExited(exitcodes.STORE_UNAVAILABLE, T0))
    assert the_exit(actions).code == exitcodes.WORKER_CRASHED


# --- signals while starting, the worker stopping by itself -----------------------------------


def test_signal_while_starting_stops_at_once_and_ignores_a_late_ready() -> None:
    machine = Lifecycle(D, M)
    actions = machine.handle(SignalReceived(SIGTERM, T0))
    # No drain window: nothing can be in hand before the worker is ready.
    assert effects(actions) == [SignalChild(SIGTERM), BroadcastCommand(RequestStop())]
    assert machine.deadlines == Deadlines.after(T0, 0.0, M)
    drain = next(a for a in actions if isinstance(a, Log) and a.event == "drain_started")
    assert drain.fields["before_ready"] is True
    assert drain.fields["request_stop_in"] == 0
    assert machine.handle(WorkerReady(T0 + 0.1)) == []
    assert machine.state is State.RELEASING
    actions = machine.handle(WorkerExited(0, T0 + 0.2))
    # The exit code says the worker never got ready (a startup probe's restart, a pod deleted
    # while its broker was unreachable), not "stopped cleanly".
    assert the_exit(actions).code == exitcodes.STARTUP_FAILED
    assert the_exit(actions).outcome == "clean"
    stopped = next(a for a in actions if isinstance(a, Log) and a.event == "supervisor_stopped")
    assert stopped.fields["ready"] is False
    assert "before the worker was ready" in stopped.message


def test_worker_deaf_to_the_signal_while_starting_is_killed_at_0_8_m_not_d_plus_0_8_m() -> None:
    machine = Lifecycle(D, M)
    machine.handle(SignalReceived(SIGTERM, T0))
    assert effects(machine.handle(Tick(T0 + M / 2))) == [BroadcastCommand(Release())]
    assert effects(machine.handle(Tick(T0 + 0.8 * M))) == [KillChild()]
    actions = machine.handle(WorkerExited(-signal.SIGKILL, T0 + 0.8 * M + 0.1))
    assert events(actions) == ["worker_exited", "supervisor_stopped"]
    assert the_exit(actions).code == exitcodes.STARTUP_FAILED
    assert the_exit(actions).outcome == "forced"


def test_worker_failing_after_the_signal_while_starting_is_a_startup_failure() -> None:
    machine = Lifecycle(D, M)
    machine.handle(SignalReceived(SIGTERM, T0))
    actions = machine.handle(WorkerExited(1, T0 + 0.5))
    assert events(actions) == ["worker_start_failed", "supervisor_stopped"]
    assert the_exit(actions).code == exitcodes.STARTUP_FAILED


def test_worker_stopping_on_its_own_while_starting_stops_at_once() -> None:
    machine = Lifecycle(D, M)
    machine.handle(WorkerStopping(T0))
    assert machine.deadlines == Deadlines.after(T0, 0.0, M)
    assert the_exit(machine.handle(WorkerExited(0, T0 + 0.1))).code == exitcodes.STARTUP_FAILED


def test_a_job_started_before_ready_keeps_the_drain_window_and_exit_zero() -> None:
    # A worker that runs a job consumes, whatever its ready event says: drain it as usual.
    machine = Lifecycle(D, M)
    machine.handle(JobStarted("j1", ref("j1")))
    actions = machine.handle(SignalReceived(SIGTERM, T0))
    assert effects(actions) == [SignalChild(SIGTERM)]
    assert machine.deadlines == Deadlines.after(T0, D, M)
    machine.handle(JobFinished("j1", "succeeded"))
    assert the_exit(machine.handle(WorkerExited(0, T0 + 1))).code == exitcodes.OK


def test_signal_after_ready_keeps_the_drain_window_and_exit_zero() -> None:
    machine = draining_machine()
    assert machine.deadlines == Deadlines.after(T0, D, M)
    assert effects(machine.handle(Tick(T0 + 0.8 * M))) == []
    actions = machine.handle(WorkerExited(0, T0 + 1))
    assert the_exit(actions).code == exitcodes.OK


def test_worker_stopping_on_its_own_drains_without_signalling_it_again() -> None:
    machine = ready_machine()
    actions = machine.handle(WorkerStopping(T0))
    assert machine.state is State.DRAINING
    assert machine.shutdown_reason == "worker stopping"
    assert effects(actions) == []
    assert events(actions) == ["worker_stopping", "drain_started"]
    assert effects(machine.handle(Tick(STOP_AT))) == [BroadcastCommand(RequestStop())]
    assert the_exit(machine.handle(WorkerExited(0, STOP_AT + 1))).code == exitcodes.OK


def test_worker_stopping_after_our_signal_is_only_logged() -> None:
    machine = draining_machine()
    actions = machine.handle(WorkerStopping(T0 + 0.01))
    assert events(actions) == ["worker_stopping"]
    assert effects(actions) == []
    assert machine.deadlines is not None
    assert machine.deadlines.started_at == T0


def test_sigterm_after_a_spurious_worker_stopping_is_forwarded_and_restarts_the_drain() -> None:
    # Issue 13, item 11: the worker said it stopped fetching, yet went on starting jobs; the
    # real SIGTERM was ignored and the stop waited for the drain deadline of the false one.
    machine = ready_machine()
    machine.handle(WorkerStopping(T0))
    actions = machine.handle(JobStarted("after", ref("after")))
    assert events(actions) == ["worker_still_fetching"]
    assert effects(machine.handle(JobStarted("again", ref("again")))) == []  # warned once
    actions = machine.handle(SignalReceived(SIGTERM, T0 + 4))
    assert "signal_ignored" not in events(actions)
    assert events(actions) == ["signal_received", "drain_started"]
    assert effects(actions) == [SignalChild(SIGTERM)]
    assert machine.shutdown_reason == "SIGTERM"
    assert machine.deadlines == Deadlines.after(T0 + 4, D, M)  # the kubelet's clock: from now
    # Our signal reached the worker now: a next one changes nothing, as always.
    assert events(machine.handle(SignalReceived(SIGTERM, T0 + 5))) == ["signal_ignored"]


def test_sigterm_after_the_worker_began_stopping_is_forwarded_once() -> None:
    machine = ready_machine()
    machine.handle(WorkerStopping(T0))
    actions = machine.handle(SignalReceived(SIGTERM, T0 + 1))
    assert effects(actions) == [SignalChild(SIGTERM)]
    assert machine.deadlines == Deadlines.after(T0 + 1, D, M)
    machine.handle(WorkerStopping(T0 + 1.01))  # the worker's answer: only logged
    assert effects(machine.handle(SignalReceived(SIGTERM, T0 + 2))) == []


def test_sigterm_after_the_drain_deadline_of_the_workers_own_stop_keeps_its_deadlines() -> None:
    machine = ready_machine()
    machine.handle(WorkerStopping(T0))
    machine.handle(Tick(STOP_AT))  # request_stop broadcast: the drain window is over
    actions = machine.handle(SignalReceived(SIGTERM, STOP_AT + 0.5))
    assert effects(actions) == [SignalChild(SIGTERM)]
    assert machine.deadlines == Deadlines.after(T0, D, M)


# --- in-flight bookkeeping ------------------------------------------------------------------


def test_in_flight_follows_job_events() -> None:
    machine = ready_machine()
    machine.handle(JobStarted("a", ref("a")))
    machine.handle(JobStarted("b", ref("b")))
    machine.handle(JobFinished("a", "succeeded"))
    machine.handle(JobFinished("zzz", "succeeded"))  # unknown: ignored
    assert list(machine.in_flight) == ["b"]


def test_a_job_released_before_the_signal_does_not_make_the_shutdown_released() -> None:
    machine = ready_machine()
    machine.handle(JobStarted("a", ref("a")))
    machine.handle(JobFinished("a", "released"))
    machine.handle(SignalReceived(SIGTERM, T0))
    assert the_exit(machine.handle(WorkerExited(0, T0 + 0.1))).outcome == "clean"


def test_nothing_happens_after_stopped() -> None:
    machine = draining_machine()
    machine.handle(WorkerExited(0, T0 + 0.1))
    inputs: list[Input] = [
        SignalReceived(SIGTERM, T0 + 1),
        Tick(EXIT_AT + 10),
        WorkerReady(T0 + 2),
        WorkerExited(0, T0 + 3),
        ReleaseCompleted(0, T0 + 4),
        JobStarted("x", ref("x")),
    ]
    for event in inputs:
        assert machine.handle(event) == []


def test_second_worker_exit_and_unexpected_release_completion_are_ignored() -> None:
    machine = draining_machine("j1")
    machine.handle(WorkerExited(0, T0 + 1))
    assert machine.handle(WorkerExited(1, T0 + 1.1)) == []
    machine2 = draining_machine()
    assert machine2.handle(ReleaseCompleted(3, T0 + 1)) == []


def test_supervisor_stopped_log_carries_outcome_and_code() -> None:
    machine = draining_machine()
    actions = machine.handle(WorkerExited(0, T0 + 0.25))
    stopped = next(a for a in actions if isinstance(a, Log) and a.event == "supervisor_stopped")
    assert stopped.fields["outcome"] == "clean"
    assert stopped.fields["exit_code"] == exitcodes.OK
    assert stopped.fields["drain_duration"] == 0.25


# --- invariants over any sequence of inputs --------------------------------------------------

_input = st.one_of(
    st.builds(lambda: ("ready",)),
    st.builds(lambda: ("stopping",)),
    st.sampled_from([("signal", SIGTERM), ("signal", SIGINT)]),
    st.builds(lambda dt: ("tick", dt), st.floats(0, 20)),
    st.builds(lambda j: ("start", j), st.sampled_from("abc")),
    st.builds(
        lambda j, o: ("finish", j, o),
        st.sampled_from("abc"),
        st.sampled_from(["succeeded", "released", "failed"]),
    ),
    st.builds(lambda c: ("exit", c), st.sampled_from([0, 1, -9, -15])),
    st.builds(lambda ok: ("released", ok), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_input, max_size=30))
def test_invariants_hold_for_any_sequence(steps: list[tuple[Any, ...]]) -> None:
    machine = Lifecycle(D, M)
    now = 0.0
    all_actions: list[Action] = []
    exited = False
    for step in steps:
        kind = step[0]
        event: Input
        if kind == "ready":
            event = WorkerReady(now)
        elif kind == "stopping":
            event = WorkerStopping(now)
        elif kind == "signal":
            event = SignalReceived(step[1], now)
        elif kind == "tick":
            now += step[1]
            event = Tick(now)
        elif kind == "start":
            event = JobStarted(step[1], ref(step[1]))
        elif kind == "finish":
            event = JobFinished(step[1], step[2])
        elif kind == "exit":
            event = WorkerExited(step[1], now)
        else:
            event = ReleaseCompleted(1, now, None if step[1] else "down")
        actions = machine.handle(event)
        if exited:
            assert actions == [], "nothing after the exit"
        all_actions += actions
        exited = exited or any(isinstance(a, Exit) for a in actions)
        # The exit deadline is never overstayed once it is known and a tick passes it.
        if isinstance(event, Tick) and machine.deadlines and now >= machine.deadlines.exit_at:
            assert machine.state is State.STOPPED
        if machine.state is State.STOPPED:
            assert exited
    # The worker is sent SIGTERM at most once; commands go out at most once each.
    assert sum(isinstance(a, SignalChild) for a in all_actions) <= 1
    assert all_actions.count(BroadcastCommand(RequestStop())) <= 1
    assert all_actions.count(BroadcastCommand(Release())) <= 1
    assert sum(isinstance(a, Exit) for a in all_actions) <= 1
    assert sum(isinstance(a, ReleaseInFlight) for a in all_actions) <= 1
    # A release by the supervisor only ever follows the worker's exit.
    kinds = [type(a) for a in all_actions]
    if ReleaseInFlight in kinds:
        assert machine.child_returncode is not None
    # The exit code is one of the documented ones, and OK only when nothing was lost.
    for action in all_actions:
        if isinstance(action, Exit):
            assert action.code in {code for _, code, _ in exitcodes.DESCRIPTIONS}
            if action.code == exitcodes.OK:
                assert machine.in_flight == {}
