"""Tasks for the dashboard's browser tests (tests/browser): each records what happened to it.

``held TAG`` runs until the test opens its gate (the file ``gate-TAG`` beside the journal),
so a test decides when a job leaves "running"; ``flaky TAG`` fails (one attempt, straight to
the failed list) until its gate is open; ``tick TAG`` only records that it ran. The schedule
``daily`` fires ``tick daily`` once a day: only a trigger from the dashboard runs it in a
test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.apps.journal import record
from workerkit.app import App
from workerkit.job import current_job

__all__ = ("app", "flaky", "held", "tick")

app = App()


def _gate(tag: str) -> Path:
    return Path(os.environ["E2E_JOURNAL"]).with_name(f"gate-{tag}")


@app.task(name="held", timeout=300, max_attempts=1)
def held(tag: str) -> dict[str, str]:
    record(f"start {tag} {current_job().attempt}")
    while not _gate(tag).exists():
        time.sleep(0.05)
    record(f"done {tag}")
    return {"tag": tag}


@app.task(name="flaky", timeout=30, max_attempts=1)
def flaky(tag: str) -> None:
    record(f"start {tag} {current_job().attempt}")
    if not _gate(tag).exists():
        raise RuntimeError(f"{tag}: the gate is closed")
    record(f"done {tag}")


@app.periodic("daily", every=86400, args=("daily",))
@app.task(name="tick", timeout=30)
def tick(tag: str) -> None:
    record(f"ran {tag} {current_job().attempt}")
