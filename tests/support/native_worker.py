"""The SQL engine's worker loop run in a thread on the in-memory queue, for unit tests.

:class:`RecordingEvents` stands in for the supervisor's channel; :class:`Harness` runs a
:class:`~workerkit.engines.sql.worker.NativeWorker` and keeps what the jobs recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from workerkit.app import App
from workerkit.engines.sql.worker import NativeWorker
from workerkit.events import BadMessage, CommandMessage, Event, JobFinished, decode, encode
from workerkit.settings import Settings
from workerkit.testing import InMemoryQueue

__all__ = ("Harness", "RecordingEvents", "wait_until")

E = TypeVar("E")


class RecordingEvents:
    """Stands in for the supervisor's channel: records events, lets a test send commands.

    Each event is recorded as the supervisor decodes it from the line the client would write
    (a malformed one is recorded as the :class:`BadMessage` the supervisor would log).
    """

    def __init__(self) -> None:
        self.sent: list[Event | CommandMessage | BadMessage] = []
        self.handlers: list[Callable[[Any, dict[str, Any]], None]] = []
        self.lock = threading.Lock()

    def send(self, event: Event) -> None:
        decoded = decode(encode(event))
        with self.lock:
            self.sent.append(decoded)

    def on_command(self, handler: Callable[[Any, dict[str, Any]], None]) -> None:
        self.handlers.append(handler)

    def command(self, name: str) -> None:
        for handler in self.handlers:
            handler(name, {"cmd": name})

    def of_type(self, event_type: type[E]) -> list[E]:
        with self.lock:
            return [e for e in self.sent if isinstance(e, event_type)]

    def bad(self) -> list[BadMessage]:
        return self.of_type(BadMessage)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class Harness:
    def __init__(self, queue: Any = None, **settings: Any) -> None:
        """``queue``: the backend (an in-memory queue when None; a ``SqlQueue`` folds acks)."""
        defaults: dict[str, Any] = {"poll_interval": 0.05, "checkpoint_interval": 0.01}
        self.settings = Settings().replace(**{**defaults, **settings})
        self.queue = InMemoryQueue() if queue is None else queue
        self.app = App(backend=self.queue, settings=self.settings)
        self.events = RecordingEvents()
        self.log: list[str] = []  # what the jobs themselves recorded
        self.worker: NativeWorker | None = None
        self.thread: threading.Thread | None = None
        self.exit_code: int | None = None

    def start(self, stop_children: Callable[[], object] | None = None) -> NativeWorker:
        worker = NativeWorker(
            self.app,
            self.settings,
            events=self.events,  # type: ignore[arg-type]
            stop_children=stop_children,
        )
        self.worker = worker

        def run() -> None:
            self.exit_code = worker.run(install_signal_handlers=False)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return worker

    def join(self, timeout: float = 10.0) -> int:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not exit"
        assert self.exit_code is not None
        return self.exit_code

    def state(self, job_id: str) -> str:
        job = self.queue.get_job(job_id)
        assert job is not None
        return str(job["state"])

    def outcomes(self) -> list[str]:
        return [e.outcome for e in self.events.of_type(JobFinished)]
