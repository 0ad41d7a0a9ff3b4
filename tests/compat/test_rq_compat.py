"""An existing RQ app (tests/compat/rq_project/myrq) under bare ``rq worker`` and under
``workerkit run rq``: every feature gives the same observable result under both.

One table (:data:`FEATURES`): how each feature is enqueued, how its outcome is observed (the
jobs record what they did in Redis themselves) and the outcome bare RQ gives. Each worker, bare
or workerkit's, forking or simple, runs once over all the table's jobs on a private
redis-server; each row is then a test that compares both workers' observations with it. Plus a
SIGTERM in the middle of a long job under workerkit: released, resumed, nothing lost or run
twice. Real processes throughout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from rq import Callback, Queue, Retry
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import DefaultSerializer, JSONSerializer

from tests.support.harness import (
    GRACE,
    REPO,
    WORKERKIT,
    Supervisor,
    process_state,
    spawn_logged,
    start_worker,
    wait_until,
)
from tests.support.rq_harness import RqEnv
from workerkit.supervisor.process import descendants

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

PROJECT = Path(__file__).resolve().parent / "rq_project"
sys.path.insert(0, str(PROJECT))  # the producers import the app's jobs, as its web app does

from myrq.jobs import (  # noqa: E402
    Reports,
    add,
    boom,
    flaky,
    import_rows,
    in_order,
    on_failed,
    on_succeeded,
    slow,
    stamp,
    track_progress,
)

pytestmark = pytest.mark.e2e

REDIS_DB = 12  # the feature runs, one after another, each on a flushed database
SIGTERM_DB = 13
RQ = str(Path(sys.executable).parent / "rq")
QUEUES = ("high", "default")  # in priority order
SETTLED = ("finished", "failed")
RUN_TIMEOUT = 30.0
#: RQ stores a scheduled job's time in whole seconds (``ScheduledJobRegistry.schedule``), so
#: bare RQ may start it up to 1 s before the time asked for: "not early" allows that, no more.
EARLY = 1.0
LATE = 4.0  # RQ's scheduler polls once a second; the worker may be busy with another job
SCHEDULE_IN = 2.0


@dataclass
class Producer:
    """The app's enqueuing side, on the serializer it uses."""

    connection: redis.Redis
    serializer: Any

    def queue(self, name: str = "default") -> Queue:
        return Queue(name, connection=self.connection, serializer=self.serializer)

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.connection, serializer=self.serializer)

    def settled(self, *job_ids: str) -> list[Job] | None:
        jobs = [self.job(job_id) for job_id in job_ids]
        return jobs if all(job.get_status() in SETTLED for job in jobs) else None


Observation = dict[str, Any]


@dataclass(frozen=True)
class Feature:
    name: str
    enqueue: Callable[[Producer], None]
    observe: Callable[[Producer], Observation | None]  # None until its jobs settled
    expected: Observation
    producer: str = "json"  # or "pickle": RQ's default serializer
    after_start: bool = False  # enqueued once the worker ran its first job


# ---- plain function, static method


def plain(p: Producer) -> None:
    p.queue().enqueue(add, 2, 3, job_id="plain")


def static(p: Producer) -> None:
    p.queue().enqueue(Reports.build, 7, job_id="static")


def result_of(job_id: str) -> Callable[[Producer], Observation | None]:
    def observe(p: Producer) -> Observation | None:
        jobs = p.settled(job_id)
        if jobs is None:
            return None
        return {"status": jobs[0].get_status(), "result": jobs[0].return_value()}

    return observe


# ---- job_timeout


def timeout(p: Producer) -> None:
    p.queue().enqueue(slow, 8, job_id="timeout", job_timeout=1)


def observe_timeout(p: Producer) -> Observation | None:
    jobs = p.settled("timeout")
    if jobs is None:
        return None
    result = jobs[0].latest_result()
    began = p.connection.get("myrq:slow:began")
    failed_at = result.created_at.timestamp() if result is not None else float("inf")
    return {
        "status": jobs[0].get_status(),
        "timed_out": "JobTimeoutException" in ((result and result.exc_string) or ""),
        "failed_within_3s": began is not None and failed_at - float(began) < 3.0,
        "ran_to_the_end": p.connection.exists("myrq:slow:ended") == 1,
    }


# ---- Retry


def retry(p: Producer) -> None:
    p.queue().enqueue(flaky, "flaky", job_id="retry", retry=Retry(max=2))


def observe_retry(p: Producer) -> Observation | None:
    jobs = p.settled("retry")
    if jobs is None:
        return None
    return {
        "status": jobs[0].get_status(),
        "result": jobs[0].return_value(),
        "tries": int(p.connection.get("myrq:tries:flaky") or 0),
        "retries_left": jobs[0].retries_left,
    }


# ---- depends_on


def dependency(p: Producer) -> None:
    parent = p.queue().enqueue(in_order, "deps", "parent", 0.5, job_id="parent")
    p.queue().enqueue(in_order, "deps", "child", job_id="child", depends_on=parent)


def observe_dependency(p: Producer) -> Observation | None:
    jobs = p.settled("parent", "child")
    if jobs is None:
        return None
    return {
        "statuses": [job.get_status() for job in jobs],
        "order": [name.decode() for name in p.connection.lrange("myrq:order:deps", 0, -1)],
    }


# ---- queue priorities


def priorities(p: Producer) -> None:
    for name in ("default-1", "default-2"):  # enqueued first, on the lower queue
        p.queue("default").enqueue(in_order, "prio", name, job_id=name)
    for name in ("high-1", "high-2"):
        p.queue("high").enqueue(in_order, "prio", name, job_id=name)


def observe_priorities(p: Producer) -> Observation | None:
    if p.settled("default-1", "default-2", "high-1", "high-2") is None:
        return None
    return {"order": [name.decode() for name in p.connection.lrange("myrq:order:prio", 0, -1)]}


# ---- enqueue_in (the scheduler)


def scheduled(p: Producer) -> None:
    p.connection.set("myrq:due:scheduled", time.time() + SCHEDULE_IN)
    p.queue().enqueue_in(dt.timedelta(seconds=SCHEDULE_IN), stamp, "later", job_id="scheduled")


def observe_scheduled(p: Producer) -> Observation | None:
    jobs = p.settled("scheduled")
    if jobs is None:
        return None
    due = float(p.connection.get("myrq:due:scheduled") or 0)
    ran_at = float(p.connection.get("myrq:ran_at:later") or 0)
    return {
        "status": jobs[0].get_status(),
        "not_early": ran_at >= due - EARLY,
        "not_late": ran_at <= due + LATE,
    }


# ---- meta


def meta(p: Producer) -> None:
    p.queue().enqueue(track_progress, 3, job_id="meta", meta={"requested_by": "ana", "done": 0})


def observe_meta(p: Producer) -> Observation | None:
    jobs = p.settled("meta")
    if jobs is None:
        return None
    return {
        "status": jobs[0].get_status(),
        "seen_by_the_job": jobs[0].return_value(),
        "meta": jobs[0].get_meta(),
    }


META_EXPECTED = {
    "status": "finished",
    "seen_by_the_job": {"requested_by": "ana", "done": 0},
    "meta": {"requested_by": "ana", "done": 3, "status_line": "3 of 3 for ana"},
}


# ---- on_success / on_failure


def callbacks(p: Producer) -> None:
    hooks = {"on_success": Callback(on_succeeded), "on_failure": Callback(on_failed)}
    p.queue().enqueue(add, 1, 1, job_id="cb-ok", **hooks)
    p.queue().enqueue(boom, "bad input", job_id="cb-fail", **hooks)


def observe_callbacks(p: Producer) -> Observation | None:
    jobs = p.settled("cb-ok", "cb-fail")
    fired = p.connection.hgetall("myrq:callbacks")
    if jobs is None or len(fired) < 2:
        return None
    return {job.id: [job.get_status(), fired.get(job.id.encode(), b"").decode()] for job in jobs}


FEATURES = (
    Feature("plain function", plain, result_of("plain"), {"status": "finished", "result": 5}),
    Feature(
        "job_timeout",
        timeout,
        observe_timeout,
        {"status": "failed", "timed_out": True, "failed_within_3s": True, "ran_to_the_end": False},
    ),
    Feature(
        "Retry(max=2)",
        retry,
        observe_retry,
        {"status": "finished", "result": "flaky ok on try 2", "tries": 2, "retries_left": 1},
    ),
    Feature(
        "depends_on",
        dependency,
        observe_dependency,
        {"statuses": ["finished", "finished"], "order": ["parent", "child"]},
    ),
    Feature(
        "queue priorities",
        priorities,
        observe_priorities,
        {"order": ["high-1", "high-2", "default-1", "default-2"]},
    ),
    Feature(
        "enqueue_in",
        scheduled,
        observe_scheduled,
        {"status": "finished", "not_early": True, "not_late": True},
        after_start=True,
    ),
    Feature("meta", meta, observe_meta, META_EXPECTED),
    Feature(
        "callbacks",
        callbacks,
        observe_callbacks,
        {
            "cb-ok": ["finished", "success 2"],
            "cb-fail": ["failed", "failure ValueError: bad input"],
        },
    ),
    Feature(
        "staticmethod",
        static,
        result_of("static"),
        {"status": "finished", "result": "report 7 built"},
    ),
    # A producer still on RQ's default serializer (pickle): bare RQ reads it as it is; workerkit
    # drains it with --serializer safe-pickle (the migration path).
    Feature(
        "pickle: plain function",
        plain,
        result_of("plain"),
        {"status": "finished", "result": 5},
        producer="pickle",
    ),
    Feature("pickle: meta", meta, observe_meta, META_EXPECTED, producer="pickle"),
    Feature(
        "pickle: staticmethod",
        static,
        result_of("static"),
        {"status": "finished", "result": "report 7 built"},
        producer="pickle",
    ),
)
SERIALIZERS = {"json": JSONSerializer, "pickle": DefaultSerializer}


# --------------------------------------------------------------------------------------------
# running one worker over the table


@dataclass
class Run:
    observed: dict[str, Observation]
    exit_code: int | None
    log: str


def python_path() -> str:
    return os.pathsep.join(filter(None, [str(PROJECT), str(REPO), os.environ.get("PYTHONPATH")]))


def start_bare(env: RqEnv, worker_class: str, producer: str, name: str) -> Supervisor:
    """``rq worker`` as the app ran it before: its own serializer, the scheduler, two queues."""
    argv = [RQ, "worker", "-u", env.redis_url, "--worker-class"]
    argv.append("rq.worker.SimpleWorker" if worker_class == "simple" else "rq.worker.Worker")
    if producer == "json":
        argv += ["--serializer", "rq.serializers.JSONSerializer", "--with-scheduler", *QUEUES]
    else:
        argv += ["--burst", "default"]  # drains what is queued and exits
    variables = {**os.environ, "PYTHONPATH": python_path()}
    return spawn_logged(argv, env.tmp, name, 0, variables)


def start_workerkit(env: RqEnv, worker_class: str, producer: str, name: str) -> Supervisor:
    """The same app after the migration (docs/engines/rq.md): one command changed."""
    argv = [*WORKERKIT, "run", "rq", "--worker-class", worker_class]
    if producer == "json":
        argv += ["--with-scheduler", "--queues", ",".join(QUEUES)]
    else:
        argv += ["--serializer", "safe-pickle", "--queues", "default"]
    env.extra["PYTHONPATH"] = python_path()
    env.extra["PYTHONFAULTHANDLER"] = "1"  # a run that does not settle shows its stacks
    engine = {"redis_url": env.redis_url, "checkpoint_interval": "0.5"}
    return start_worker(argv, env, app="myrq.rq_app:app", name=name, engine=engine, settings={})


def dump_stacks(worker: Supervisor) -> None:
    """A run that did not settle: SIGABRT the worker's processes (workerkit's run with
    PYTHONFAULTHANDLER=1), so that the log shows where each one was stuck."""
    children = descendants(worker.pid)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
    wait_until(
        lambda: all(process_state(pid) in (None, "Z") for pid in children),
        timeout=10,
        what=f"the aborted children {children} of {worker.pid} to exit",
    )


# Bare ``rq worker``'s own teardown can wait up to RQ's pubsub sleep_time (60 s): redis-py's
# PubSubWorkerThread.stop() joins the thread without a bound, and once unsubscribed the thread
# waits out its sleep_time for a subscription (workerkit's rq worker bounds that join, e7182e9).
# It is a race: most bare runs exit at once, and some hang there. Its operators press Ctrl+C a
# second time (RQ's cold shutdown); the bare run here does the same once its log shows it there.
BARE_TEARDOWN_WAIT = "unsubscribing from channel"


def stop(worker: Supervisor, *, bare: bool = False) -> int:
    """SIGTERM the worker (unless it exited already); its exit code once it and its children
    (work horse, RQ's scheduler process) are gone."""
    children = descendants(worker.pid)
    if worker.proc.poll() is None:
        worker.signal(signal.SIGTERM)
    if bare:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(5)
        last_line = worker.log_text().rstrip().rpartition("\n")[2]
        if worker.proc.poll() is None and BARE_TEARDOWN_WAIT in last_line:
            worker.signal(signal.SIGTERM)  # RQ's cold shutdown: interrupts the join
    code, _ = worker.wait_exit(15)
    wait_until(
        lambda: all(process_state(pid) in (None, "Z") for pid in children),
        timeout=10,
        what=f"the children {children} of {worker.pid} to exit",
    )
    return code


def run_features(
    server: RedisServer, tmp: Path, kind: str, worker_class: str, producer: str
) -> Run:
    """Enqueue the table's jobs, run one worker over them, observe each feature."""
    url = server.url(REDIS_DB)
    connection = redis.Redis.from_url(url)
    try:
        connection.flushdb()
        p = Producer(connection, SERIALIZERS[producer])
        rows = [f for f in FEATURES if f.producer == producer]
        for feature in rows:
            if not feature.after_start:
                feature.enqueue(p)
        env = RqEnv(tmp=tmp, redis_url=url, journal=tmp / "journal.txt")
        start = start_bare if kind == "bare" else start_workerkit
        worker = start(env, worker_class, producer, f"{kind}-{worker_class}-{producer}")
        code = None
        try:
            if wait_for(lambda: p.settled("plain")):  # the worker is up and running jobs
                for feature in rows:
                    if feature.after_start:
                        feature.enqueue(p)
                if not wait_for(lambda: all(f.observe(p) is not None for f in rows)):
                    dump_stacks(worker)
            code = stop(worker, bare=kind == "bare")
        finally:
            worker.stop()
        observed = {f.name: f.observe(p) or {"not settled": True} for f in rows}
        return Run(observed, code, worker.log_text())
    finally:
        connection.flushdb()
        connection.close()


def wait_for(condition: Callable[[], object]) -> bool:
    """Poll ``condition`` until it holds (True) or RUN_TIMEOUT passes (False)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Runs:
    """Each worker's run over the table, made the first time a test asks for it."""

    server: RedisServer
    tmp: Path
    done: dict[tuple[str, str, str], Run] = field(default_factory=dict)

    def get(self, kind: str, worker_class: str, producer: str) -> Run:
        key = (kind, worker_class, producer)
        if key not in self.done:
            tmp = self.tmp / "-".join(key)
            tmp.mkdir()
            self.done[key] = run_features(self.server, tmp, *key)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(redis_server, tmp_path_factory.mktemp("rq-compat"))


@pytest.mark.timeout(120)  # the first row of a worker class starts both of its workers
@pytest.mark.parametrize("feature", FEATURES, ids=[f.name for f in FEATURES])
@pytest.mark.parametrize("worker_class", ["forking", "simple"])
def test_feature_gives_the_same_result_bare_and_under_workerkit(
    runs: Runs, worker_class: str, feature: Feature
) -> None:
    bare = runs.get("bare", worker_class, feature.producer)
    ours = runs.get("workerkit", worker_class, feature.producer)
    assert bare.observed.get(feature.name) == feature.expected, bare.log
    assert ours.observed.get(feature.name) == feature.expected, ours.log
    assert ours.exit_code == 0, ours.log


# --------------------------------------------------------------------------------------------
# SIGTERM with a long job in hand


@pytest.fixture
def sigterm_env(redis_server: RedisServer, tmp_path: Path) -> Iterator[RqEnv]:
    url = redis_server.url(SIGTERM_DB)
    connection = redis.Redis.from_url(url)
    try:
        connection.flushdb()
        yield RqEnv(tmp=tmp_path, redis_url=url, journal=tmp_path / "journal.txt")
        connection.flushdb()
    finally:
        connection.close()


def strings(connection: redis.Redis, key: str) -> list[str]:
    return [item.decode() for item in connection.lrange(key, 0, -1)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("worker_class", ["forking", "simple"])
def test_sigterm_mid_job_releases_it_and_the_next_pod_resumes_it_nothing_lost_or_twice(
    sigterm_env: RqEnv, worker_class: str
) -> None:
    env = sigterm_env
    connection = env.connection()
    p = Producer(connection, JSONSerializer)
    rows = 80  # 0.1 s each: the SIGTERM's drain (D = 4 s) ends half-way
    p.queue().enqueue(import_rows, "big", rows, job_id="big")
    for n in range(3):
        p.queue().enqueue(in_order, "after", f"after-{n}", job_id=f"after-{n}")

    pod_a = start_workerkit(env, worker_class, "json", "pod-a")
    try:
        pod_a.wait_ready()
        wait_until(
            lambda: connection.llen("myrq:rows:big") >= 5, timeout=20, what="the job under way"
        )
        pod_a.signal(signal.SIGTERM)
        code, elapsed = pod_a.wait_exit(GRACE + 5)
    finally:
        pod_a.stop()
    assert code == 0, pod_a.log_text()
    assert elapsed < GRACE, elapsed
    first = strings(connection, "myrq:runs:big")
    assert len(first) == 2, first
    assert first[0] == "attempt 1 from 0", first
    released_at = int(first[1].removeprefix("released at "))
    assert 5 <= released_at < rows, first
    assert strings(connection, "myrq:rows:big") == [str(n) for n in range(released_at)]
    # Released to the front of its queue; the jobs behind it never started.
    assert p.queue().get_job_ids() == ["big", "after-0", "after-1", "after-2"]
    assert p.job("big").get_status() == "queued"
    assert StartedJobRegistry("default", connection=connection).get_job_ids() == []
    assert connection.exists("myrq:order:after") == 0

    pod_b = start_workerkit(env, worker_class, "json", "pod-b")
    try:
        wait_until(
            lambda: p.settled("big", "after-0", "after-1", "after-2"),
            timeout=30,
            what="the released job and the ones behind it",
        )
        stop(pod_b)
    finally:
        pod_b.stop()
    assert strings(connection, "myrq:runs:big") == [
        *first,
        f"attempt 1 from {released_at}",  # the release gave its attempt back
        "done",
    ]
    assert strings(connection, "myrq:rows:big") == [str(n) for n in range(rows)]  # each once
    assert strings(connection, "myrq:order:after") == ["after-0", "after-1", "after-2"]
    assert p.job("big").get_status() == "finished"
    assert p.job("big").return_value() == rows
    assert StartedJobRegistry("default", connection=connection).get_job_ids() == []
