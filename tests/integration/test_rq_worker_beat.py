"""RQ's worker heartbeat and state under workerkit, on a real redis-server: fewer writes, the same
promises.

RQ beats its worker key (two commands each) at the top of its dequeue, after the pop and after
each job, and writes ``idle`` twice between two jobs. workerkit sends a plain beat at most once
a second and a state it wrote within the second not again (engines/rq/upkeep.py). What RQ's
beats promise is kept: after a job the key lives ``worker_ttl`` + 60 s again (a job-time beat
shortens it), and ``last_heartbeat`` and ``state`` say what RQ says.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer
from rq.worker.base import WorkerStatus

from tests.support.rq_in_process import rq_worker_in_this_process
from workerkit.engines.rq import RqApp, SimpleWorker, upkeep
from workerkit.engines.rq.upkeep import WORKER_BEAT_EVERY
from workerkit.settings import Settings

MODULE = __name__
app = RqApp(modules=[MODULE])
ran: list[int] = []
JOBS = 30
END_MARK = "workerkit-test-end-of-writes"


def count(n: int) -> int:
    ran.append(n)
    return n


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with rq_worker_in_this_process(monkeypatch):
        ran.clear()
        yield


def worker_on(url: str) -> SimpleWorker:
    return SimpleWorker(
        ["default"],
        connection=redis.Redis.from_url(url),
        app=app,
        settings=Settings(engine="rq", redis_url=url, app=f"{MODULE}:app"),
    )


class WorkerKeyWrites:
    """The commands on one key, as redis-server's MONITOR reports them (a thread of its own)."""

    def __init__(self, client: redis.Redis[bytes], key: str) -> None:
        self.key = key
        self.commands: list[str] = []
        self.complete = False  # the end mark was seen: every command before it is in
        self._monitor = client.monitor().__enter__()  # MONITOR sent and answered
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for entry in self._monitor.listen():
                parts = str(entry["command"]).split()
                if len(parts) > 1 and parts[1] == self.key:
                    self.commands.append(parts[0].upper())
                if parts == ["ECHO", END_MARK]:  # the test's own end mark
                    self.complete = True
                    return
        except redis.exceptions.ConnectionError:
            return

    def stop(self, client: redis.Redis[bytes]) -> None:
        client.echo(END_MARK)
        self._thread.join(10)
        self._monitor.__exit__(None, None, None)


def test_a_busy_worker_beats_once_per_job_and_writes_idle_once(
    redis_url: str, redis_client: redis.Redis[bytes]
) -> None:
    queue = Queue("default", connection=redis_client, serializer=JSONSerializer)
    for n in range(JOBS):
        queue.enqueue(count, n)
    worker = worker_on(redis_url)
    writes = WorkerKeyWrites(redis_client, worker.key)
    try:
        worker.work(burst=True)
    finally:
        writes.stop(redis_client)

    assert ran == list(range(JOBS))  # every job once, in order
    assert writes.complete
    expires = writes.commands.count("EXPIRE")
    assert expires >= 2 * JOBS  # the capture saw the beats RQ's start and suspension check send
    # Per job: the job-time beat (RQ's start pipeline), the beat in RQ's suspension check, and
    # one plain beat after the job. RQ alone sends five (three plain ones); startup and the
    # last, empty dequeue add a few.
    assert expires <= 3 * JOBS + 6, writes.commands[:40]
    # HSETs per job: RQ's start and job-time fields (state, current job, working time, beat),
    # the suspension check's beat, and `idle` with the plain beat after the job: seven (RQ's
    # own loop: ten, with its two more plain beats and its second `idle`).
    hsets = writes.commands.count("HSET")
    assert hsets <= 8 * JOBS, writes.commands[:40]


def test_after_a_job_time_beat_the_next_plain_beat_restores_the_worker_ttl(
    redis_url: str, redis_client: redis.Redis[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window a loaded machine cannot outlast between two steps of the test.
    monkeypatch.setattr(upkeep, "WORKER_BEAT_EVERY", 600.0)
    worker = worker_on(redis_url)
    worker.register_birth()  # type: ignore[no-untyped-call]
    long_ttl = worker.worker_ttl + 60

    def ttl() -> int:
        return int(redis_client.ttl(worker.key))

    worker.heartbeat()
    assert ttl() > long_ttl - 5

    # A plain beat within the window is skipped: the key still lives worker_ttl + 60 s.
    redis_client.expire(worker.key, long_ttl - 30)  # marks whether the next beat is written
    worker.heartbeat()
    assert ttl() <= long_ttl - 30

    # RQ's job-time beat, through a pipeline, sets a shorter TTL: the next plain beat is sent.
    with redis_client.pipeline() as pipeline:
        worker.heartbeat(90, pipeline=pipeline)
        pipeline.execute()
    assert ttl() <= 90
    worker.heartbeat()
    assert ttl() > long_ttl - 5

    # After a job: idle and the beat in one round trip; RQ's beat and idle right after are
    # skipped, and the key lives worker_ttl + 60 s.
    with redis_client.pipeline() as pipeline:
        worker.heartbeat(90, pipeline=pipeline)
        worker.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        pipeline.execute()
    worker._wk_idle()
    assert ttl() > long_ttl - 5
    assert redis_client.hget(worker.key, "state") == b"idle"
    redis_client.hset(worker.key, "state", "marked")
    worker.set_state(WorkerStatus.IDLE)
    assert redis_client.hget(worker.key, "state") == b"marked"  # not written again

    # A state written through a pipeline since: the next one on its own is written.
    with redis_client.pipeline() as pipeline:
        worker.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        pipeline.execute()
    worker.set_state(WorkerStatus.IDLE)
    assert redis_client.hget(worker.key, "state") == b"idle"


def test_a_plain_beat_a_second_after_the_last_is_sent(
    redis_url: str, redis_client: redis.Redis[bytes]
) -> None:
    worker = worker_on(redis_url)
    worker.register_birth()  # type: ignore[no-untyped-call]
    worker.heartbeat()
    assert worker._wk_beat_at is not None
    redis_client.expire(worker.key, 100)
    worker._wk_beat_at -= WORKER_BEAT_EVERY  # as if sent a second ago
    worker.heartbeat()
    assert int(redis_client.ttl(worker.key)) > worker.worker_ttl
