"""The worker as a child process: started, signalled by pid, its tree killed, every exit reaped."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from tests.support.harness import process_state, wait_until
from workerkit.supervisor.process import ChildProcess, descendants, reap_all

# A parent that starts a child of its own and then waits forever.
TREE = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "time.sleep(60)\n"
)


def reap_until_exited(child: ChildProcess, timeout: float = 10.0) -> int:
    def exited() -> bool:
        child.reap()
        return child.returncode is not None

    wait_until(exited, timeout=timeout, what=f"pid {child.pid} to exit")
    assert child.returncode is not None
    return child.returncode


def test_start_signal_and_reap_records_the_return_code() -> None:
    child = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"], {})
    pid = child.start()
    running_before = child.running
    assert child.send_signal(signal.SIGTERM)
    assert reap_until_exited(child) == -signal.SIGTERM
    assert (running_before, child.running) == (True, False)
    assert not child.send_signal(signal.SIGTERM)  # never a recycled pid
    assert process_state(pid) is None


def test_exit_code_of_a_normal_exit() -> None:
    child = ChildProcess([sys.executable, "-c", "raise SystemExit(3)"], {})
    child.start()
    assert reap_until_exited(child) == 3


def test_kill_tree_kills_grandchildren_too() -> None:
    child = ChildProcess([sys.executable, "-c", TREE], {"PATH": "/usr/bin:/bin"})
    pid = child.start()
    (grandchild,) = wait_until(lambda: descendants(pid), timeout=10, what="the grandchild")
    killed = child.kill_tree()
    assert killed == [pid, grandchild]
    assert reap_until_exited(child) == -signal.SIGKILL
    # The grandchild was re-parented (to init, or to a subreaper); it is dead either way.
    wait_until(lambda: process_state(grandchild) in (None, "Z"), timeout=10, what="grandchild dead")


def test_reap_returns_other_exited_children() -> None:
    worker = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"], {})
    worker.start()
    other = ChildProcess([sys.executable, "-c", "pass"], {})
    other_pid = other.start()
    reaped: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while not reaped and time.monotonic() < deadline:
        reaped += worker.reap()
        time.sleep(0.01)
    assert reaped == [(other_pid, 0)]
    assert worker.running
    worker.kill_tree()
    assert reap_until_exited(worker) == -signal.SIGKILL
    assert reap_all() == []


def test_a_missing_program_fails_at_start() -> None:
    with pytest.raises(FileNotFoundError):
        ChildProcess(["/nonexistent/workerkit-worker"], {}).start()
    with pytest.raises(ValueError, match="empty"):
        ChildProcess([], {})
