"""The sql worker's job threads, kept for the next job instead of started for each.

Starting a thread cost ~0.2 ms on the 2-core bench machine, a tenth of a no-op job's cycle; a
thread whose job ended waits :data:`IDLE` seconds for the next one. A job that is stuck (taken
back at its timeout, still in a blocking call) keeps its thread, so the threads grow in number
rather than a job waiting for one. Each job runs in a fresh :mod:`contextvars` context, as in a
new thread; ``threading.local`` values a job leaves behind stay with the thread (as in Celery's
thread pool), and a job's own thread name is ``job-<id>`` while it runs.

A thread whose job ended asks ``take_next`` for another before it waits (the sql worker's next
prefetched job): the next job starts without waking another thread, and without waking the
fetcher that would otherwise hand it over (three thread switches per job, under the GIL, were a
large part of a no-op job's cycle at concurrency 1).
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ("IDLE", "IDLE_NAME", "Slots")

#: How long a job thread waits for the next job before it ends (seconds).
IDLE = 10.0

#: The name of a job thread waiting for its next job.
IDLE_NAME = "workerkit-job-idle"

_Job = TypeVar("_Job")


class Slots(Generic[_Job]):
    """Runs ``run(job)`` in a waiting job thread, or in a new one when none waits."""

    def __init__(
        self,
        run: Callable[[_Job], None],
        *,
        take_next: Callable[[], tuple[_Job, str] | None] | None = None,
        idle: float = IDLE,
    ) -> None:
        self._run = run
        self._take_next = take_next  # a job to run now, and its thread name; None: wait
        self._idle_for = idle
        self._lock = threading.Lock()
        self._waiting: list[queue.SimpleQueue[tuple[_Job, str]]] = []  # waiting threads

    def start(self, job: _Job, name: str) -> None:
        """Run ``job`` now, in a thread named ``name`` while it runs."""
        with self._lock:
            if self._waiting:
                # The most recent: the others may end once they waited long enough.
                self._waiting.pop().put((job, name))
                return
        threading.Thread(target=self._loop, args=(job,), name=name, daemon=True).start()

    def _loop(self, job: _Job) -> None:
        thread = threading.current_thread()
        mailbox: queue.SimpleQueue[tuple[_Job, str]] = queue.SimpleQueue()
        while True:
            contextvars.Context().run(self._run, job)
            following = self._take_next() if self._take_next is not None else None
            if following is not None:
                job, thread.name = following
                continue
            with self._lock:
                self._waiting.append(mailbox)
                thread.name = IDLE_NAME  # once it waits: start() may hand it a job
            try:
                job, thread.name = mailbox.get(timeout=self._idle_for)
                continue
            except queue.Empty:
                pass
            with self._lock:
                if mailbox in self._waiting:
                    self._waiting.remove(mailbox)
                    return
            # Taken from the list under the lock, so its job is in the mailbox already.
            job, thread.name = mailbox.get_nowait()
