"""docs/tutorials/backfill.md, run top to bottom on SQLite: expand (seed), the backfill under
``workerkit run sql`` with a SIGTERM in the middle, the release with its checkpoint, the resume
on the next run, every row updated exactly once, and the contract.

The reader works in a clone's root; the test in a temporary directory with the clone on
PYTHONPATH, which imports the same ``examples.backfill``.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from tests.docs.tutorial import Tutorial
from tests.support.servers import free_port

ROWS = 20_000


def _field(lines: list[str], event: str, name: str) -> int:
    (value,) = [
        int(m[1]) for line in lines if event in line and (m := re.search(rf"\b{name}=(\d+)", line))
    ]
    return value


def test_a_zero_downtime_schema_change(tmp_path: Path) -> None:
    tutorial = Tutorial.prepare(
        "docs/tutorials/backfill.md", tmp_path, WORKERKIT_HTTP_PORT=str(free_port())
    )
    files: list[str] = []
    runs: list[list[str]] = []
    outputs: dict[str, list[str]] = {}
    for kind, step in tutorial.steps():
        if isinstance(step, str):
            files.append(step)
            continue
        assert kind == "command"
        lines = tutorial.run(step)
        outputs[step.line] = lines
        if step.line == "workerkit run sql":
            runs.append(lines)

    assert files == ["workerkit.toml", "progress.py", "contract.py"]
    assert len(runs) == 2
    first, second = runs
    # the SIGTERM went to the pid the supervisor logged (what the reader's `kill` names)
    assert any("signal_received: SIGTERM received" in line for line in first)
    # after the first run: some rows done once, the rest not yet, none twice; the checkpoint is
    # the last committed batch's cursor, the attempt given back
    progress = outputs["python progress.py"]
    counts = re.search(r"rows by times_backfilled: \{0: (\d+), 1: (\d+)\}$", progress[0])
    assert counts is not None, progress
    left, done = int(counts[1]), int(counts[2])
    assert left + done == ROWS, progress
    assert 0 < done < ROWS, progress
    assert done % 500 == 0, progress  # whole batches
    assert progress[1].endswith(f"ready, attempts 0, checkpoint {done}"), progress
    # the second run went on from the checkpoint: only the rows left, on attempt 1
    assert _field(second, "backfill_done:", "rows") == left
    assert _field(second, "backfill_done:", "attempt") == 1
    # contracted: the column is NOT NULL now
    with sqlite3.connect(tmp_path / "backfill.sqlite3") as conn:
        columns = {row[1]: row[3] for row in conn.execute("PRAGMA table_info(accounts)")}
        assert columns["email_normalized"] == 1  # notnull
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (ROWS,)
