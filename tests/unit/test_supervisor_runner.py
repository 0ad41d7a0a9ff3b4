"""The supervisor's reading of event batches, through its seams: a worker process writes to the
real channel; the engine's release, the lifecycle's jobs in flight and the metrics registry show
what the supervisor made of it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from workerkit import exitcodes
from workerkit.events import (
    FinishedJob,
    JobFinished,
    JobsFinished,
    JobStarted,
    WorkerReady,
    encode,
)
from workerkit.settings import Settings
from workerkit.supervisor import Supervisor

if TYPE_CHECKING:
    import pytest

#: A worker that writes the given chunks on the channel, each in one write, then dies with 3
#: (after a moment: the supervisor reads a dead worker's last events before its exit).
WORKER = """
import json, os, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(os.environ["WORKERKIT_SUPERVISOR_SOCKET"])
for chunk in json.loads(sys.argv[1]):
    sock.sendall(chunk.encode())
    time.sleep(0.02)
time.sleep(0.3)
sys.exit(3)
"""


class ScriptedEngine:
    """An engine whose worker writes ``chunks``; it records what the supervisor releases."""

    name = "celery"

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = [chunk.decode() for chunk in chunks]
        self.released: list[tuple[list[Mapping[str, Any]], bool]] = []

    def worker_command(self, settings: Settings) -> list[str]:
        return [sys.executable, "-c", WORKER, json.dumps(self.chunks)]

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        self.released.append((list(refs), crashed))
        return len(refs)


def run(engine: ScriptedEngine) -> Supervisor:
    sup = Supervisor(Settings(engine="celery", http_port=0), engine, handle_signals=False)  # type: ignore[arg-type]
    code = anyio.run(sup.run)
    assert code == exitcodes.WORKER_CRASHED
    return sup


def delivery(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "delivery_tag": "tag-" + job_id, "queue": "q"}


def started(job_id: str) -> JobStarted:
    return JobStarted(job_id, "t-" + job_id, "q", 1, delivery(job_id))


def jobs(sup: Supervisor, task: str, outcome: str) -> float | None:
    labels = {"engine": "celery", "queue": "q", "task": task, "outcome": outcome}
    return sup.metrics.registry.get_sample_value("workerkit_jobs_total", labels)


def in_progress(sup: Supervisor, task: str) -> float | None:
    labels = {"engine": "celery", "queue": "q", "task": task}
    return sup.metrics.registry.get_sample_value("workerkit_jobs_in_progress", labels)


#: One write: a and b start, a finishes (as Celery's batches say it: in a jobs_finished).
BATCH = b"".join(
    encode(event)
    for event in (
        started("a"),
        started("b"),
        JobsFinished((FinishedJob("a", "t-a", "q", "released", 0.1),)),
    )
)
READY = encode(WorkerReady("celery", ("q",), 1))


def test_a_job_started_and_finished_in_one_batch_is_not_left_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="workerkit.supervisor")
    engine = ScriptedEngine(READY, BATCH + b"not json\n")
    sup = run(engine)
    # Only b was in flight when the worker died: the supervisor released it, and only it.
    assert engine.released == [([delivery("b")], True)]
    assert jobs(sup, "t-a", "released") == 1
    assert jobs(sup, "t-b", "released") == 1  # settled by the supervisor's own release
    assert in_progress(sup, "t-a") == in_progress(sup, "t-b") == 0
    bad = sup.metrics.registry.get_sample_value(
        "workerkit_bad_messages_total", {"engine": "celery"}
    )
    assert bad == 1
    # At debug level, one line per job event, with the event's fields.
    lines = [(r.event, getattr(r, "job_id", None)) for r in caplog.records if hasattr(r, "event")]
    assert ("job_started", "b") in lines
    assert ("job_finished", "a") in lines
    assert ("worker_ready_event", None) in lines


def test_a_job_finished_in_a_later_write_leaves_nothing_in_flight() -> None:
    engine = ScriptedEngine(READY, BATCH, encode(JobFinished("b", "t-b", "q", "succeeded", 0.2)))
    sup = run(engine)
    assert sup.machine.in_flight == {}
    assert engine.released == []
    assert jobs(sup, "t-b", "succeeded") == 1
    assert in_progress(sup, "t-a") == in_progress(sup, "t-b") == 0


def test_the_supervisor_imports_no_engine_library() -> None:
    code = (
        "import sys, workerkit.supervisor\n"
        "heavy = {'celery', 'kombu', 'rq', 'redis', 'sqlalchemy', 'psycopg'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
