"""WakePipe: a wake ends a wait, from another thread or a signal handler; its pipe is closed
with it (engines/wakepipe.py)."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest

from workerkit.engines.wakepipe import WakePipe


def test_a_wait_with_no_wake_times_out() -> None:
    started = time.monotonic()
    assert WakePipe().wait(0.05) is False
    assert time.monotonic() - started >= 0.04


def test_a_wake_before_the_wait_ends_it_at_once_and_only_once() -> None:
    pipe = WakePipe()
    pipe.wake()
    pipe.wake()  # two wakes, one pending wait: both are read at once
    assert pipe.wait(3600.0) is True
    assert pipe.wait(0.0) is False


def test_a_wake_from_another_thread_ends_a_long_wait() -> None:
    pipe = WakePipe()
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(pipe.wait(3600.0)), daemon=True)
    waiter.start()
    pipe.wake()
    waiter.join(10.0)
    assert woken == [True]


@pytest.mark.timeout(30)
def test_a_signal_handler_may_wake_it() -> None:
    pipe = WakePipe()
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(pipe.wait(3600.0)), daemon=True)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: pipe.wake())
    try:
        waiter.start()
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs in this (main) thread
        waiter.join(10.0)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert woken == [True]


def test_its_descriptors_are_closed_with_it() -> None:
    pipe = WakePipe()
    fds = (pipe._read, pipe._write)
    os.fstat(fds[0])
    del pipe
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
