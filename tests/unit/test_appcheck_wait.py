"""The wait for the app check is bounded and ends on a stop signal (engines/appcheck.py).

A real forked check loading an app whose import never ends (a module written here, looping at
import), as the check of ``workerkit run celery`` runs; the worker's own check (rq, sql) is in
tests/e2e/test_startup.py, with the stacks it logs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from workerkit.engines.appcheck import AppCheckStopped, AppCheckTimedOut, start_app_check
from workerkit.settings import Settings, load_settings


@pytest.fixture
def hanging_app(tmp_path: Path) -> Iterator[Settings]:
    """Settings whose app's import never returns (a fresh module: never imported here)."""
    module = f"wk_hangs_at_import_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text("import time\nwhile True:\n    time.sleep(0.01)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield load_settings(
            {"app": f"{module}:app", "database_url": f"sqlite:///{tmp_path / 'q.db'}"},
            env={},
            cwd=tmp_path,
        )
    finally:
        sys.path.remove(str(tmp_path))


def reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.timeout(30)
def test_an_app_that_never_loads_is_killed_after_the_timeout(hanging_app: Settings) -> None:
    check = start_app_check("sql", [], hanging_app)
    pid = check._pid
    assert pid is not None
    started = time.monotonic()
    with pytest.raises(AppCheckTimedOut, match=r"within startup_timeout \(0.5 s\).*Fix:"):
        check.result(0.5)
    assert time.monotonic() - started >= 0.5
    assert reaped(pid)


@pytest.mark.timeout(30)
def test_a_held_stop_signal_ends_the_wait_at_once(hanging_app: Settings) -> None:
    check = start_app_check("sql", [], hanging_app)
    pid = check._pid
    assert pid is not None
    looks = []

    def stop() -> int | None:  # the second look sees the SIGTERM
        looks.append(time.monotonic())
        return signal.SIGTERM if len(looks) > 1 else None

    with pytest.raises(AppCheckStopped, match=r"SIGTERM after .* while the app was loading"):
        check.result(60.0, stop)
    assert len(looks) == 2
    assert reaped(pid)
