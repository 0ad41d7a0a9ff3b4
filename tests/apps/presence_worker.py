"""A worker process for the presence e2e tests: a real process on the supervisor's channel.

``python -m tests.apps.presence_worker`` (run by tests/apps/presence_supervisor.py) installs
the presence publisher on a file store (``$E2E_PRESENCE_DIR``, tests/support/presence_memory.py),
reports two jobs done and one in hand, then ready. On SIGTERM it keeps the job until the
supervisor's ``release`` command, reports it released, closes the publisher (which removes its
record) and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tests.support.presence_memory import FilePresenceStore
from workerkit import events
from workerkit.engines.presence_publisher import install_presence
from workerkit.logs import configure_logging
from workerkit.settings import load_settings

__all__ = ("main",)

QUEUE = "default"


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    client = events.client("worker")
    directory = Path(os.environ["E2E_PRESENCE_DIR"])
    publisher = install_presence(client, lambda: FilePresenceStore(directory))
    released = threading.Event()

    def on_command(command: str, message: dict[str, Any]) -> None:
        if command == "release":
            released.set()

    client.on_command(on_command)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # wait for the release
    for job_id in ("a", "b"):
        client.send(events.JobStarted(job_id, "t", QUEUE, 1, {"job_id": job_id}))
        client.send(events.JobFinished(job_id, "t", QUEUE, "succeeded", 0.01))
    client.send(events.JobStarted("held", "t", QUEUE, 1, {"job_id": "held", "queue": QUEUE}))
    client.send(events.WorkerReady("sql", (QUEUE, "low"), 2))
    while not released.wait(0.5):
        client.send(events.Heartbeat(running=1))
    client.send(events.JobFinished("held", "t", QUEUE, "released", 1.0))
    publisher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
