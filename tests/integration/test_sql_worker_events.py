"""The supervisor sees a sql worker's events in the order they happened.

A job's events go out in batches (``BatchingSender``, up to 100 ms late); an event sent alone
(stopped fetching, store health, ready, heartbeat) goes out after the batch gathered before it:
a job started before the worker stopped fetching must not reach the supervisor after the stop
(the supervisor would log ``worker_still_fetching`` and act on it).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from pathlib import Path

from workerkit.app import App
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.engines.sql.worker import NativeWorker
from workerkit.events import EventClient
from workerkit.settings import Settings


def test_jobs_started_before_the_worker_stopped_fetching_reach_the_supervisor_first(
    sqlite_url: str,
) -> None:
    upgrade(sqlite_url)
    settings = Settings(database_url=sqlite_url).replace(concurrency=2, poll_interval=0.05)
    queue = SqlQueue(settings=settings)
    app = App(backend=queue, settings=settings)
    both_running = threading.Barrier(2, timeout=10)
    finish = threading.Event()
    worker: NativeWorker | None = None

    @app.task
    def work() -> None:
        both_running.wait()
        assert worker is not None
        # Right after the second start (batched, written up to 100 ms later), the worker
        # stops fetching: its main thread says so within a tick (50 ms).
        worker.stop_fetching()
        finish.wait(10)

    path = os.path.join(tempfile.mkdtemp(prefix="wk-ev"), "s.sock")  # sun_path: 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        client = EventClient(path, role="worker")
        conn, _ = listener.accept()
        worker = NativeWorker(app, settings, events=client)
        work.enqueue()
        work.enqueue()
        exit_code: list[int] = []
        thread = threading.Thread(
            target=lambda: exit_code.append(worker.run(install_signal_handlers=False))
        )
        thread.start()
        data = b""
        while b'"worker_stopping"' not in data:
            chunk = conn.recv(65536)
            assert chunk, "the worker hung up before it said it stopped fetching"
            data += chunk
        finish.set()
        thread.join(10)
        assert exit_code == [0]
        client.close()
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
    finally:
        finish.set()
        listener.close()
        Path(path).unlink(missing_ok=True)
        queue.close()

    types = [json.loads(line)["type"] for line in data.splitlines()]
    stop = types.index("worker_stopping")
    assert types[:stop].count("job_started") == 2, types  # both starts, before the stop
    assert "job_started" not in types[stop:], types
