"""Jobs for the image's PID-1 test (tests/e2e/test_image_entrypoint.py): the e2e SQL app, plus
an orphan that says who adopted it and exits only when the test lets it.

``orphan_waits`` forks a child that forks a grandchild and exits: the grandchild, an orphan,
records ``orphan TAG pid=N ppid=P`` once re-parented (P = 1 when PID 1 adopted it), then waits
for the file ``$E2E_JOURNAL.release-TAG`` before it exits, so the test can find it from outside
first and then see it reaped.
"""

from __future__ import annotations

import os
import time

from tests.apps.journal import record
from tests.apps.sql_jobs import app
from workerkit.job import current_job

__all__ = ("app", "orphan_waits")


@app.task(name="orphan_waits", timeout=60)
def orphan_waits(tag: str) -> None:
    record(f"start {tag} {current_job().attempt}")
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        parent = os.getpid()
        if os.fork() == 0:
            while os.getppid() == parent:  # until the middle child is gone
                time.sleep(0.01)
            record(f"orphan {tag} pid={os.getpid()} ppid={os.getppid()}")
            release = f"{os.environ['E2E_JOURNAL']}.release-{tag}"
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
            record(f"orphan {tag} exiting")
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    record(f"done {tag}")
