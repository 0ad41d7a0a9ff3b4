"""What an rq worker process tells its supervisor about its jobs, on the events channel.

A busy worker writes once per job: each finish waits (at most 100 ms) to share the write of the
next job's start, which goes out at once, so that a worker killed right after a start has told
the supervisor about it (the supervisor releases it at once instead of waiting for its lease).
The channel here is a Unix socket of the test's own, read after the worker is gone (the kernel
keeps what was written), in place of a supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from tests.support.harness import wait_until
from workerkit.events import SOCKET_ENV

if TYPE_CHECKING:
    import redis

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def channel() -> Iterator[tuple[str, socket.socket]]:
    path = os.path.join(tempfile.mkdtemp(prefix="wk-rqev"), "s.sock")  # sun_path: 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        yield path, listener
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


def start_worker(redis_url: str, path: str, journal: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        WORKERKIT_APP="tests.apps.rq_jobs:app",
        WORKERKIT_REDIS_URL=redis_url,
        WORKERKIT_LOG_LEVEL="warning",
        E2E_JOURNAL=str(journal),
        **{SOCKET_ENV: path},
    )
    argv = [sys.executable, "-m", "workerkit.engines.rq", "--worker-class", "simple"]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL)


def read_all(listener: socket.socket) -> list[dict[str, Any]]:
    """Every event line the (exited) worker wrote, in order."""
    listener.settimeout(10)
    conn, _ = listener.accept()
    data = b""
    with conn:
        while chunk := conn.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def finished_ids(events: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for event in events:
        if event["type"] == "job_finished":
            ids.append(event["job_id"])
        elif event["type"] == "jobs_finished":
            ids.extend(job[0] for job in event["jobs"])
    return ids


def test_a_busy_worker_batches_its_finishes_and_sends_every_start_before_its_finish(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    channel: tuple[str, socket.socket],
    tmp_path: Path,
) -> None:
    path, listener = channel
    queue = Queue("default", connection=redis_client, serializer=JSONSerializer)
    ids = [queue.enqueue("tests.apps.rq_jobs.noop").id for _ in range(30)]
    worker = start_worker(redis_url, path, tmp_path / "journal")
    try:
        wait_until(
            lambda: queue.finished_job_registry.count == len(ids), timeout=60, what="30 jobs run"
        )
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    events = read_all(listener)
    types = [event["type"] for event in events]
    started = [event["job_id"] for event in events if event["type"] == "job_started"]
    assert started == ids, types  # every start, one line each, in order
    # The finishes went in batches (the last ones flushed before the process exited).
    assert finished_ids(events) == ids, types
    assert "job_finished" not in types, types
    for job_id in ids:
        start = next(i for i, e in enumerate(events) if e.get("job_id") == job_id)
        finish = next(
            i
            for i, e in enumerate(events)
            if e["type"] == "jobs_finished" and any(job[0] == job_id for job in e["jobs"])
        )
        assert start < finish, types


def test_a_start_right_after_batched_finishes_reaches_the_supervisor_before_a_sigkill(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    channel: tuple[str, socket.socket],
    tmp_path: Path,
) -> None:
    path, listener = channel
    journal = tmp_path / "journal"
    queue = Queue("default", connection=redis_client, serializer=JSONSerializer)
    for _ in range(20):
        queue.enqueue("tests.apps.rq_jobs.noop")
    last = queue.enqueue("tests.apps.rq_jobs.sleepy", "last", 30).id
    worker = start_worker(redis_url, path, journal)
    try:
        wait_until(
            lambda: journal.exists() and "begin last" in journal.read_text(),
            timeout=60,
            what="the last job running",
        )
        worker.kill()  # at once: whatever waited in a batch is lost
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    events = read_all(listener)
    started = [event["job_id"] for event in events if event["type"] == "job_started"]
    assert started[-1] == last, [event["type"] for event in events]
    assert len(finished_ids(events)) <= 20
