"""Fill the filesystem under a SQLite queue, then free it (run as a module, given DIR).

Run inside a small tmpfs of its own (``tests/integration/test_sql_disk_full.py`` mounts one in a
private mount namespace). Prints one JSON object: the error the full disk gave, the log events,
the WAL's size after it, the health then, and whether an enqueue works once space is back.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from workerkit.app import App, EnqueueOptions
from workerkit.engines.sql import upgrade
from workerkit.errors import StoreUnavailable
from workerkit.settings import Settings

__all__ = ("main",)


class _Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(str(getattr(record, "event", "")))


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass  # ENOSPC: the disk is full now
    finally:
        os.close(fd)


def main(directory: Path) -> None:
    url = f"sqlite:///{directory / 'queue.sqlite3'}"
    handler = _Events()
    logger = logging.getLogger("workerkit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    upgrade(url)
    app = App(url, settings=Settings(database_url=url))
    app.enqueue("t", [], {}, EnqueueOptions(job_id="before"))  # the WAL and its index exist
    filler = directory / "filler"
    _fill(filler)
    error = ""
    for n in range(10_000):
        try:
            app.enqueue("t", ["y" * 2000], {}, EnqueueOptions(job_id=f"fill-{n}"))
        except StoreUnavailable as exc:
            error = str(exc)
            break
    wal = directory / "queue.sqlite3-wal"
    wal_after = wal.stat().st_size if wal.exists() else 0
    health = app.backend.health()
    filler.unlink()  # space is back
    app.enqueue("t", [], {}, EnqueueOptions(job_id="after"))
    after = app.backend.get_job("after")
    result = {
        "error": error,
        "events": handler.events,
        "wal_after": wal_after,
        "health": [health.ok, health.reason],
        "after": after["state"] if after else None,
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
