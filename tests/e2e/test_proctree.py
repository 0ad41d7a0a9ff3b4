"""Process trees by pid, with real processes: finding them by environment, stopping them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
