"""The "Resume" job of the end-to-end tests: 10,000 items through ``workerkit.checkpointed``.

Each item takes at least 1 ms (a sleep) and is recorded in the journal (``$E2E_JOURNAL``) as
``item N`` once done; each attempt records ``start ATTEMPT from CURSOR`` first and ``done`` at
the end, so a test counts what was processed, how often, and where each attempt resumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import workerkit
from tests.apps.journal import record
from workerkit import current_job

app = workerkit.App()

ITEM_SECONDS = 0.001  # the least an item takes: F / ITEM_SECONDS bounds a crash's redo


def numbers(total: int) -> Callable[[int, int], list[int]]:
    def fetch(after: int, limit: int) -> list[int]:
        return list(range(after, min(after + limit, total)))

    return fetch


@app.task(name="walk", timeout=120, checkpointed=True, max_attempts=20)
def walk(total: int) -> None:
    job = current_job()
    record(f"start {job.attempt} from {job.checkpoint or 0}")
    for i in workerkit.checkpointed(numbers(total), cursor_of=lambda i: i + 1, start=0):
        time.sleep(ITEM_SECONDS)
        record(f"item {i}")
    record("done")
