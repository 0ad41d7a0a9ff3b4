"""Presence stores for tests: in memory (unit tests), and in files (a worker process's e2e).

Both stamp ``heartbeat_at`` with their own clock on publish, as the engines' stores do with the
store's clock. :class:`MemoryPresenceStore` can be made to fail (an outage) or to block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from workerkit.engines.presence import Presence

__all__ = ("FilePresenceStore", "MemoryPresenceStore")


class MemoryPresenceStore:
    """A :class:`~workerkit.engines.presence.PresenceStore` in a dict; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.records: dict[str, Presence] = {}
        self.published: list[Presence] = []  # every record written, in order
        self.removed: list[str] = []
        self.error: Exception | None = None  # raised by every call while set
        self.gate = threading.Event()  # publish waits for it (set: no wait)
        self.gate.set()
        self.lock = threading.Lock()

    def publish(self, presence: Presence) -> None:
        self.gate.wait()
        if self.error is not None:
            raise self.error
        stamped = dataclasses.replace(presence, heartbeat_at=self.clock())
        with self.lock:
            self.records[presence.worker_id] = stamped
            self.published.append(stamped)

    def remove(self, worker_id: str) -> None:
        if self.error is not None:
            raise self.error
        with self.lock:
            self.records.pop(worker_id, None)
            self.removed.append(worker_id)

    def list_all(self) -> list[Presence]:
        with self.lock:
            return list(self.records.values())


class FilePresenceStore:
    """Presences as ``DIR/<worker_id>.json`` (replaced atomically), each write also appended to
    ``DIR/history.jsonl`` (a removal as ``{"removed": worker_id}``): what a test in another
    process reads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, worker_id: str) -> Path:
        return self.directory / f"{worker_id.replace('/', '_')}.json"

    def _history(self, line: str) -> None:
        fd = os.open(self.directory / "history.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def publish(self, presence: Presence) -> None:
        text = dataclasses.replace(presence, heartbeat_at=time.time()).to_json()
        path = self._path(presence.worker_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        self._history(text)

    def remove(self, worker_id: str) -> None:
        self._path(worker_id).unlink(missing_ok=True)
        self._history(json.dumps({"removed": worker_id}))

    def list_all(self) -> list[Presence]:
        return [Presence.from_json(p.read_text()) for p in sorted(self.directory.glob("*.json"))]
