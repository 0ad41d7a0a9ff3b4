"""The lease deadline a worker shares with the processes it forks (engines/leasewatch.py)."""

from __future__ import annotations

import logging
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.harness import wait_until
from workerkit.engines import leaseguard, leasewatch
from workerkit.engines.leaseguard import step
from workerkit.engines.leasewatch import LeaseClock, Watchdog, now, since_monotonic
from workerkit.job import JobContext


def test_a_renewal_sent_on_the_monotonic_clock_sets_the_deadline_on_the_shared_clock() -> None:
    clock = LeaseClock(3.0)
    assert clock.left() is None
    assert not clock.expiring()
    clock.extend(since_monotonic(time.monotonic() - 1.0))  # a renewal sent a second ago
    assert 1.9 < (clock.left() or 0) <= 2.0
    assert not clock.expiring()
    clock.extend(now() - 2.5)  # 0.5 s left: under ttl / 4
    assert clock.expiring()
    assert (clock.stop_at, clock.raise_at, clock.kill_at) == (0.75, 0.375, 0.1875)


def test_the_watchdog_wakes_per_byte_of_its_pipe_and_goes_on_ticking_after_end_of_file() -> None:
    # Not extended yet: no deadline. A long lease, so that the kill the stop below arms
    # (SIGALRM, at kill_at) is 20 s away when end() disarms it.
    clock = LeaseClock(160.0)
    read_end, write_end = os.pipe()
    woken = threading.Semaphore(0)
    calls: list[int] = []

    def on_wake() -> None:
        calls.append(1)
        woken.release()

    watchdog = Watchdog(clock, logging.getLogger("test"), wake_fd=read_end, on_wake=on_wake)
    watchdog._tick = 60.0  # a byte must wake it: a tick would come too late for the test
    watchdog.start()
    os.write(write_end, b"s")
    assert woken.acquire(timeout=10)
    os.write(write_end, b"ss")
    assert woken.acquire(timeout=10)
    assert woken.acquire(timeout=10)
    assert len(calls) == 3

    # End of file: the pipe is dropped and the watchdog keeps its own duty.
    watchdog._tick = 0.01
    os.close(write_end)
    context = JobContext(job_id="j", task="t", queue="q", attempt=1)
    watchdog.begin(context)
    clock.extend(now() - 130.0)  # 30 s left: under stop_at (40 s), the next tick stops the job
    deadline = time.monotonic() + 10
    while not context.lease_lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert context.lease_lost
    watchdog.end(context)
    os.close(read_end)
    watchdog._tick = 3600.0  # its thread has no stop (a horse exits): let it sleep, not spin


def test_the_kill_puts_sigalrm_back_to_terminating_over_a_python_handler() -> None:
    """RQ's job timeout has a Python handler on SIGALRM; the watchdog's kill must end the
    process even so (the handler would run only if the stuck main thread got the GIL)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            signal.signal(signal.SIGALRM, lambda signum, frame: os._exit(3))
            leasewatch._alarm_kills()
            os.kill(os.getpid(), signal.SIGALRM)
            time.sleep(10)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGALRM


#: A 16 s lease's: stop_at 4, kill_at 1, tick 0.25.
_LEASE_16 = LeaseClock(16.0)
LIMITS = (_LEASE_16.stop_at, _LEASE_16.kill_at, _LEASE_16.tick)
IDLE = leaseguard.GUARD_IDLE


def look(
    pid: int, left: float | None, running: int, watching: int, killed: int
) -> tuple[bool, bool, float]:
    """The guard's step for a 16 s lease."""
    return step(LIMITS, pid=pid, left=left, running=running, watching=watching, killed=killed)


def test_the_guard_waits_while_the_lease_is_long_and_looks_again_when_it_would_get_short() -> None:
    assert LIMITS == (4.0, 1.0, 0.25)
    me = os.getpid()
    assert look(0, 10.0, 0, 0, 0) == (False, False, IDLE)  # no horse
    assert look(me, None, me, 0, 0) == (False, False, IDLE)  # no lease
    # Its job runs with 4.5 s left: half a second before the lease gets short.
    assert look(me, 4.5, me, 0, 0) == (False, False, 0.5)
    # Far off: at most GUARD_IDLE; just over stop_at: a tick.
    assert look(me, 14.0, me, 0, 0) == (False, False, IDLE)
    assert look(me, 4.01, me, 0, 0) == (False, False, 0.25)


def test_the_guard_wakes_a_short_leased_horse_until_its_watchdog_runs_then_kills_it_once() -> None:
    me = os.getpid()
    assert look(me, 3.9, me, 0, 0) == (True, False, 0.25)
    assert look(me, 3.6, me, 0, 0) == (True, False, 0.25)  # until its watchdog runs
    assert look(me, 3.0, me, me, 0) == (False, False, 0.25)  # it runs
    # Under kill_at / 2 with its job still running: its own kill did not happen. Killed once.
    assert look(me, 0.4, me, me, 0) == (False, True, 0.25)
    assert look(me, 0.3, me, me, me) == (False, False, 0.25)


def test_the_guard_leaves_a_horse_alone_before_its_job_begins_and_after_it_ends() -> None:
    # Not begun, or ended (its settle, retried while Redis is away, goes on): nothing for a
    # watchdog to stop, but looked at again within a tick.
    me = os.getpid()
    assert look(me, 0.2, 0, 0, 0) == (False, False, 0.25)


def test_the_guard_tells_a_live_child_from_a_zombie_and_from_another_s_process() -> None:
    # A horse its watchdog's SIGALRM ended stays a zombie while its worker is stopped: the
    # guard neither kills it nor says it did.
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        wait_until(
            lambda: leaseguard.child_state(child, os.getpid()) == "Z", timeout=10, what="a zombie"
        )
        assert leaseguard.child_state(child, os.getppid()) is None  # not the parent's child
    finally:
        os.waitpid(child, 0)
    assert leaseguard.child_state(child, os.getpid()) is None  # reaped
    assert leaseguard.child_state(os.getpid(), os.getppid()) in ("R", "S")


def test_the_guard_loads_none_of_the_heavier_standard_modules() -> None:
    # One per forking worker, for the pod's whole life: signal's enum (and functools, types...)
    # was ~0.9 MiB of its ~6 (bench/README.md, twelfth round).
    script = Path(leaseguard.__file__)
    code = (
        f"import sys; sys.path.insert(0, {str(script.parent)!r}); import {script.stem}; "
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert script.stem in loaded
    assert not {"enum", "functools", "contextlib", "typing", "signal"} & set(loaded)


def test_the_lease_page_is_what_the_guard_reads() -> None:
    clock = LeaseClock(16.0)
    assert clock.fd is not None  # a memfd: the guard maps it
    page = mmap.mmap(clock.fd, mmap.PAGESIZE)
    clock.extend(now())
    clock.watch(123)
    clock.mark_watching()
    clock.mark_running(True)
    deadline, watched, watching, running, killed = struct.unpack_from(leaseguard.LAYOUT, page, 0)
    assert deadline / 1000 - time.clock_gettime(leaseguard.CLOCK) == pytest.approx(16.0, abs=0.5)
    assert (watched, watching, running, killed) == (123, os.getpid(), os.getpid(), 0)
    clock.mark_running(False)
    assert clock.running == 0
    # The guard writes the pid it kills; the worker asks after reaping it, before the next.
    struct.pack_into("q", page, leaseguard.KILLED, 123)
    assert clock.killed_by_guard(123)
    assert not clock.killed_by_guard(0)
    assert not clock.killed_by_guard(124)
    clock.watch(0)  # no horse now: what the guard wrote stays
    assert clock.killed_by_guard(123)
    clock.watch(123)  # a new horse (with a reused pid): not killed
    assert not clock.killed_by_guard(123)


def test_a_guard_started_for_a_process_ends_with_it() -> None:
    # The guard runs as its own program: started by a child of ours (its "worker"), it ends
    # when that child does.
    clock = LeaseClock(16.0)
    read_end, write_end = os.pipe()
    worker = os.fork()
    if worker == 0:
        try:
            guard = leasewatch.LeaseGuard(clock, logging.getLogger("test"))
            guard.start()
            os.write(write_end, str(guard.pid).encode())
            time.sleep(0.5)
        finally:
            os._exit(0)
    os.close(write_end)
    guard_pid = int(os.read(read_end, 32))
    os.close(read_end)
    os.waitpid(worker, 0)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{guard_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{guard_pid}").exists()


def test_a_watchdog_starts_once_and_marks_the_job_running_between_begin_and_end() -> None:
    clock = LeaseClock(160.0)
    watchdog = Watchdog(clock, logging.getLogger("test"))
    watchdog._idle_tick = 3600.0  # no job: let its thread sleep
    assert not watchdog.started
    watchdog.start()
    watchdog.start()  # a second wake-up: nothing more
    assert watchdog.started
    deadline = time.monotonic() + 10
    while clock.watching != os.getpid() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert clock.watching == os.getpid()
    context = JobContext(job_id="j", task="t", queue="q", attempt=1)
    watchdog.begin(context)
    assert clock.running == os.getpid()
    watchdog.end(context)
    assert clock.running == 0
