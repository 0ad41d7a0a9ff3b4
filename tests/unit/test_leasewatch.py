"""The lease deadline a worker shares with the processes it forks (engines/leasewatch.py)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from workerkit.engines import leasewatch
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
