"""Process trees by pid, with real processes: finding them by environment, stopping them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.harness import process_state, wait_until
from workerkit.proctree import alive, processes_with_env, stop_processes

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
)


def test_processes_are_found_by_a_variable_of_their_environment() -> None:
    marker = f"proctree-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, "WK_TEST_MARK": marker})
    try:
        found = wait_until(
            lambda: processes_with_env("WK_TEST_MARK", marker), timeout=5, what="the marked sleep"
        )
        assert found == [proc.pid]
        assert processes_with_env("WK_TEST_MARK", marker + "x") == []
    finally:
        proc.kill()
        proc.wait()


def _ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_stop_processes_terms_then_kills_at_the_grace() -> None:
    polite = subprocess.Popen(["sleep", "60"])
    deaf = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM])
    # Wait for the deaf one's handler: its SigIgn mask in /proc shows SIGTERM ignored.
    wait_until(lambda: _ignores_sigterm(deaf.pid), timeout=10, what="the handler")
    try:
        started = time.monotonic()
        killed = stop_processes([polite.pid, deaf.pid], grace=0.5, reap=lambda: None)
        elapsed = time.monotonic() - started
        assert killed == [deaf.pid]
        assert polite.wait(5) == -signal.SIGTERM
        assert deaf.wait(5) == -signal.SIGKILL
        assert 0.5 <= elapsed < 3.0, elapsed
        assert not alive(polite.pid)
        assert process_state(deaf.pid) is None
    finally:
        for proc in (polite, deaf):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _spawn_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A new ``sleep`` that gets ``pid`` again (Linux's ``ns_last_pid``, as root); None when that
    cannot be done here, or another process took the pid first."""
    try:
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    except OSError:
        return None
    stranger = subprocess.Popen(["sleep", "60"])
    if stranger.pid == pid:
        return stranger
    stranger.kill()
    stranger.wait()
    return None


def _stop_while_a_pid_is_reused() -> bool:
    """One try of the test below; False when the pid could not be reused this time."""
    polite = subprocess.Popen(["sleep", "60"])
    deaf = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM])
    strangers: list[subprocess.Popen[bytes] | None] = []

    def reap() -> None:  # the parallel reaper, and the new process that gets the pid
        if not strangers and polite.poll() is not None:
            strangers.append(_spawn_with_pid(polite.pid))

    try:
        wait_until(lambda: _ignores_sigterm(deaf.pid), timeout=10, what="the handler")
        killed = stop_processes([polite.pid, deaf.pid], grace=0.5, reap=reap)
        stranger = strangers[0] if strangers else None
        if stranger is None:
            return False
        try:
            assert polite.returncode == -signal.SIGTERM
            assert killed == [deaf.pid]
            assert stranger.poll() is None, "the stranger with the reused pid was killed"
        finally:
            stranger.kill()
            stranger.wait()
        return True
    finally:
        for proc in (polite, deaf):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_pid_reaped_and_reused_during_the_grace_is_not_killed() -> None:
    # A stop's target exits at the SIGTERM and is reaped meanwhile (as the supervisor, PID 1,
    # reaps everything); its pid is taken by an unrelated new process before the SIGKILL round.
    # The stop must not kill that stranger: it holds its targets by pidfd, not by number.
    if not Path("/proc/sys/kernel/ns_last_pid").exists() or os.geteuid() != 0:
        pytest.skip("needs root and ns_last_pid to reuse a pid on purpose")
    for _ in range(5):  # another process on the machine may take the pid first: try again
        if _stop_while_a_pid_is_reused():
            return
    pytest.skip("could not get the pid reused (other processes took it)")


def test_without_pidfds_processes_are_stopped_by_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "pidfd_open", raising=False)  # a kernel before 5.3, another system
    polite = subprocess.Popen(["sleep", "60"])
    deaf = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM])
    try:
        wait_until(lambda: _ignores_sigterm(deaf.pid), timeout=10, what="the handler")
        assert stop_processes([polite.pid, deaf.pid], grace=0.3, reap=lambda: None) == [deaf.pid]
        assert polite.wait(5) == -signal.SIGTERM
        assert deaf.wait(5) == -signal.SIGKILL
    finally:
        for proc in (polite, deaf):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


HAS_CHILDREN = """
import os, signal, subprocess, sys
from workerkit.engines.lifeline import stop_children
from workerkit.proctree import has_children
assert not has_children(), "a fresh interpreter has no child"
child = subprocess.Popen(["sleep", "60"])
assert has_children(), "a running child"
child.send_signal(signal.SIGKILL)
os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped yet
assert has_children(), "a child not reaped yet is still a child"
child.wait()
assert not has_children(), "reaped"
assert stop_children(0.2) == [], "nothing to stop"
tree = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
while len(open(f"/proc/{tree.pid}/task/{tree.pid}/children").read().split()) < 1:
    pass
grandchild = int(open(f"/proc/{tree.pid}/task/{tree.pid}/children").read().split()[0])
stop_children(0.2)  # reaps what it stopped
assert tree.poll() is not None, "the child runs on"
try:
    os.kill(grandchild, 0)
    state = open(f"/proc/{grandchild}/stat").read().split(")")[1].split()[0]
    assert state == "Z", f"the grandchild runs on: {state}"
except ProcessLookupError:
    pass
print("ok")
"""


def test_has_children_sees_running_and_unreaped_children_and_stop_children_still_stops_a_tree() -> (
    None
):
    out = subprocess.run(
        [sys.executable, "-c", HAS_CHILDREN],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "ok", out.stderr


LIBC_ONCE = """
import ctypes.util, os, signal
from workerkit.proctree import load_libc, prctl
libc = load_libc()
assert libc and load_libc() is libc
pid = os.fork()
if pid == 0:
    def refuse(name):
        raise AssertionError("find_library in the child")
    ctypes.util.find_library = refuse  # a work horse: libc is known already
    os._exit(0 if prctl(1, signal.SIGKILL) else 3)  # PR_SET_PDEATHSIG
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_libc_is_looked_up_once_so_a_forked_work_horse_does_not_run_ldconfig() -> None:
    out = subprocess.run(
        [sys.executable, "-c", LIBC_ONCE],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "0", out.stderr
