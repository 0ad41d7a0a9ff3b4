"""The per-task events of one worker process, batched: one write to the supervisor per batch.

Each write wakes the supervisor, which shares the pod's cores with the worker; so under load
the events of many tasks go in one write, at most EVENT_BATCH_DELAY late (docs/engines/celery.md,
"Per-task events"). Control events (worker_ready, heartbeat...) do not come through here.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
from typing import Any, Final

from workerkit import events as events_module

__all__ = ("EVENT_BATCH_DELAY", "Pending", "TaskEvents", "encode_batch")

#: How long a per-task event may wait to share one write with the next ones (the trade-off
#: between the supervisor's CPU per task and the delay is measured in bench/README.md).
EVENT_BATCH_DELAY: Final = 0.1

#: An event not yet written: (event type, wall time, fields).
Pending = tuple[str, float, dict[str, Any]]


class TaskEvents:
    """The per-task events (job_started, job_finished, checkpoint_saved) of one process.

    An event goes out at once only when nothing went out in the last EVENT_BATCH_DELAY (an
    idle worker reports at once); under load a flusher thread writes what gathered, in one
    write, at most that much later (see :func:`encode_batch` for what a batch becomes). The
    delay is harmless: the supervisor uses these events for metrics and to know which
    deliveries to release if the worker dies, and a delivery it does not know of yet is
    released by the worker itself or by crash recovery. The main process flushes this buffer
    before its own last events and before it exits.
    """

    def __init__(self, client: events_module.EventClient | None = None) -> None:
        self.pid = os.getpid()
        self.client = client if client is not None else events_module.client("celery-executor")
        # Encoded when written: a job_started whose job_finished comes in the same batch is
        # never encoded at all.
        self._queue: collections.deque[Pending] = collections.deque()
        self._wake = threading.Event()
        self._last_write = 0.0
        self._flusher: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self.client.connected

    def send(self, event_type: events_module.EventType, **fields: Any) -> None:
        if not self.client.connected:
            return
        # deque.append and popleft are atomic: executor threads (the threads pool) and the
        # flusher share the queue without a lock.
        self._queue.append((event_type, time.time(), fields))
        if time.monotonic() - self._last_write >= EVENT_BATCH_DELAY:
            self.flush()
        elif not self._wake.is_set():
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_later, name="workerkit-events", daemon=True
                )
                self._flusher.start()
            self._wake.set()

    def flush(self) -> None:
        """Write every event that gathered, in one write."""
        # The client's send lock: its other events are never written in the middle of ours,
        # and of two flushes, the one that took the older events writes them first.
        with self.client.writer() as write:
            if write is None:
                self._queue.clear()
                return
            batch = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self._queue.popleft())
            if not batch:
                return
            self._last_write = time.monotonic()
            write(encode_batch(self.pid, batch))

    def _flush_later(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(EVENT_BATCH_DELAY)
            self._wake.clear()
            self.flush()


def encode_batch(pid: int, batch: list[Pending]) -> bytes:
    """The batch's lines: consecutive job_finished as one jobs_finished event.

    A job_started whose job_finished (succeeded) follows in the same batch is left out: the
    supervisor would add the delivery to those in flight and remove it at once. Only
    *consecutive* job_finished are merged, so a job finished, requeued and started again within
    one batch still reads in that order.
    """
    done = {
        fields.get("job_id")
        for kind, _, fields in batch
        if kind == "job_finished" and fields.get("outcome") == "succeeded"
    }
    lines: list[bytes] = []
    finished: list[list[Any]] = []
    for kind, ts, fields in batch:
        if kind == "job_finished":
            finished.append(
                [
                    fields.get("job_id"),
                    fields.get("task"),
                    fields.get("queue"),
                    fields.get("outcome"),
                    fields.get("duration"),
                ]
            )
            continue
        if kind == "job_started" and fields.get("job_id") in done:
            continue
        if finished:
            lines.append(_encode_finished(pid, finished))
            finished = []
        lines.append(_encode_line({"type": kind, "pid": pid, "ts": ts, **fields}))
    if finished:
        lines.append(_encode_finished(pid, finished))
    return b"".join(lines)


#: events.encode's format (one JSON object a line), with one encoder for every event.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=str)


def _encode_line(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode() + b"\n"


def _encode_finished(pid: int, jobs: list[list[Any]]) -> bytes:
    return _encode_line({"type": "jobs_finished", "pid": pid, "ts": time.time(), "jobs": jobs})
