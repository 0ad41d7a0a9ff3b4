"""The celery engine on Redis under faults: three ``workerkit run celery`` pods (prefork, two
pool children each), a load of journaled tasks (tests/apps/fault_celery.py), one fault per test
(tests/support/faults.py has the verdict). The redis-server (append-only) is shared by the
module; each scenario has a database of its own, and pods started on it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from tests.apps.fault_celery import app
from tests.support.faults import (
    Databases,
    Load,
    Pods,
    alive,
    kill_tree,
    problems,
    restart_redis_during,
    running_long_jobs,
    wait_for,
)
from tests.support.harness import WORKERKIT, Env, Supervisor, start_worker
from tests.support.servers import start_redis

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
]

#: The recovery window (W): a message whose worker died is back in its queue within W; the
#: lease of a held message lives W / 2.
WINDOW = 4.0
QUEUE = "celery"


class CeleryJobs:
    """The Celery queue and kombu's ``unacked`` hash in the scenario's Redis database."""

    def __init__(self, holder: list[RedisServer]) -> None:
        self.holder = holder
        self.databases = Databases(holder)

    @property
    def url(self) -> str:
        return self.databases.url()

    def client(self) -> redis.Redis[bytes]:
        return redis.Redis.from_url(self.url)

    def enqueue(self, jobs: list[tuple[str, str, tuple[object, ...]]], queue: str = QUEUE) -> None:
        # A connection of the scenario's database (the app's producer pool keeps the first).
        with app.connection_for_write(self.url) as connection:
            producer = app.amqp.Producer(connection)
            for task, job_id, args in jobs:
                app.send_task(task, args=list(args), task_id=job_id, queue=queue, producer=producer)

    def held(self) -> set[str]:
        """The task ids in the queue, popped (a worker's in-flight list), or unacknowledged."""
        with self.client() as client:
            queued = client.lrange(QUEUE, 0, -1)
            for key in client.scan_iter("workerkit:celery:inflight:*", count=1000):
                queued += client.lrange(key, 0, -1)
            unacked = client.hvals("unacked")
        ids = set()
        for raw in queued:
            ids.add(str(json.loads(raw)["headers"]["id"]))
        for raw in unacked:
            ids.add(str(json.loads(raw)[0]["headers"]["id"]))
        return ids

    def busy(self, ids: list[str]) -> list[str]:
        held = self.held()
        return [job_id for job_id in ids if job_id in held]

    def stuck(self, ids: list[str]) -> list[str]:
        return self.busy(ids)

    def locate(self, ids: list[str]) -> dict[str, list[str]]:
        """Diagnostic: every Redis key (and its type) whose value mentions each of ``ids``."""
        found: dict[str, list[str]] = {job_id: [] for job_id in ids}
        with self.client() as client:
            for key in client.scan_iter(count=1000):
                kind = client.type(key).decode()
                if kind == "list":
                    values = client.lrange(key, 0, -1)
                elif kind == "hash":
                    values = [k + b"=" + v for k, v in client.hgetall(key).items()]
                elif kind == "zset":
                    values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
                elif kind == "set":
                    values = list(client.smembers(key))
                elif kind == "string":
                    values = [key + b"=" + (client.get(key) or b"")]
                else:
                    values = []
                for job_id in ids:
                    if any(job_id.encode() in v for v in values):
                        found[job_id].append(f"{key!r}:{kind}")
        return found

    def kill_clients(self) -> int:
        with self.client() as client:
            killed = 0
            for kind in ("normal", "pubsub"):
                killed += int(client.execute_command("CLIENT KILL TYPE", kind, "SKIPME", "yes"))
            return killed


@dataclass
class Cluster:
    pods: Pods
    jobs: CeleryJobs
    journal: Path
    holder: list[RedisServer]

    def load(self, prefix: str, **kwargs: Any) -> Load:
        return Load(self.jobs, prefix, self.journal, **kwargs)


@pytest.fixture(scope="module")
def cluster(
    fault_redis: list[RedisServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    jobs = CeleryJobs(fault_redis)
    jobs.databases.next()
    tmp = tmp_path_factory.mktemp("celery-faults")
    env = Env(tmp=tmp, database_url="", journal=tmp / "journal.txt")

    def start(name: str) -> Supervisor:
        return start_worker(
            [*WORKERKIT, "run", "celery", "--", "--pool=prefork"],
            env,
            app="tests.apps.fault_celery:app",
            name=name,
            engine={
                "E2E_REDIS_URL": jobs.url,
                "redis_url": jobs.url,
                "queues": QUEUE,
                "log_level": "info",
            },
            settings={"concurrency": "2", "recovery_window": str(WINDOW)},
            new_session=True,
        )

    pods = Pods(start)
    try:
        yield Cluster(pods, jobs, env.journal, fault_redis)
    finally:
        pods.stop_all()


@pytest.fixture
def celery(cluster: Cluster) -> Cluster:
    cluster.pods.fresh(cluster.jobs.databases)
    return cluster


def no_crash(celery: Cluster) -> None:
    for pod in celery.pods:
        assert pod.proc.poll() is None, pod.log_text()
        assert not pod.events_named("worker_crashed"), pod.log_text()


def restart_under_load(celery: Cluster, prefix: str, down_for: float) -> None:
    load = celery.load(prefix, gates=2)
    load.enqueue()
    load.wait_under_way(long_running=True)
    celery.holder[0] = restart_redis_during(celery.holder[0], load, down_for=down_for)
    # A pop Redis answers as it exits (the reply unsent, the pop in its append-only file) is
    # in its worker's in-flight list, and back in its queue at the worker's reconnection.
    # Whether a pop was cut this time is recorded, not required (it depends on timing).
    try:
        load.wait_settled()
        load.check()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\npop_returned per pod: {pops_returned(celery)}") from exc
    logging.getLogger(__name__).info("pop_returned per pod: %s", pops_returned(celery))
    no_crash(celery)


def pops_returned(celery: Cluster) -> list[int]:
    """Per pod, how many messages a cut pop left in flight and its reconnection gave back."""
    return [
        sum(e.get("messages", 0) for e in pod.events_named("pop_returned")) for pod in celery.pods
    ]


def test_redis_restart_shorter_than_the_lease(celery: Cluster) -> None:
    restart_under_load(celery, "cshort", down_for=WINDOW / 4)


def test_redis_restart_longer_than_the_lease(celery: Cluster) -> None:
    restart_under_load(celery, "clong", down_for=WINDOW + 1)


def test_connections_killed_again_and_again(celery: Cluster) -> None:
    load = celery.load("ckill")
    load.enqueue()
    load.wait_under_way(ended=10)
    killed = 0
    for _ in range(10):
        killed += celery.jobs.kill_clients()
        time.sleep(0.3)
    assert killed >= 10
    load.wait_settled()
    load.check()
    no_crash(celery)


def test_worker_stopped_past_its_lease_never_runs_a_task_twice_at_once(celery: Cluster) -> None:
    # 10 s tasks, still running when the lease is gone: checkpointed ones, and ones that keep
    # no checkpoint (each journals its ticks as long as its pool child runs it).
    load = celery.load("cstop", long_steps=40, longs=3, ticks=3)
    first = load.enqueue(longs_last=True)
    load.wait_under_way(ended=len(first) - 6)
    pod, victim, held = running_long_jobs(load, celery.pods, "-tick")
    os.kill(victim, signal.SIGSTOP)  # the worker's main process; its pool children run on
    try:
        load.longs = load.ticks = 0
        load.enqueue(batch="b")
        wait_for(
            lambda: all(len(load.runs()[job_id]) > 1 for job_id in held),
            timeout=4 * WINDOW,
            what="the stopped worker's tasks taken over by the other pods",
        )
    finally:
        os.kill(victim, signal.SIGCONT)
    load.wait_settled()
    load.check()
    assert pod.proc.poll() is None, pod.log_text()


def test_killed_pod_tasks_rerun_by_the_other_pods_once(celery: Cluster) -> None:
    load = celery.load("cpod")
    load.enqueue()
    load.wait_under_way()
    killed = Pods.tree(celery.pods.pods[0])
    kill_tree(killed)  # the node is gone: supervisor, worker, pool children at once
    killed_at = time.time()
    load.wait_settled()
    load.check(killed=killed, killed_at=killed_at)


def test_supervisor_sigkilled_its_worker_follows_and_tasks_run_once(celery: Cluster) -> None:
    load = celery.load("csup")
    load.enqueue()
    load.wait_under_way()
    pod = celery.pods.pods[0]
    worker = Pods.worker_pid(pod)
    killed = Pods.tree(pod)
    celery.pods.orphans.extend(killed[1:])
    os.kill(pod.pid, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: not alive(worker), timeout=3, what="the worker to die with its supervisor")
    load.wait_settled()
    load.check(killed=killed, killed_at=killed_at)


def test_poison_messages_are_dropped_with_their_reason_and_the_workers_go_on(
    celery: Cluster,
) -> None:
    load = celery.load("cpoison")
    unknown = json.dumps(
        {
            "body": "W1tdLCB7fSwge31d",  # base64 of [[], {}, {}]
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "no.such.task", "id": "cpoison-p-unknown"},
            "properties": {
                "correlation_id": "cpoison-p-unknown",
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "delivery_mode": 2,
                "delivery_tag": "cpoison-p-unknown-tag",
                "body_encoding": "base64",
                "priority": 0,
            },
        }
    )
    with celery.jobs.client() as client:
        client.lpush(QUEUE, b"\xff\xfe not json", unknown)
    load.enqueue()
    load.wait_settled()
    load.check()
    no_crash(celery)
    with celery.jobs.client() as client:
        assert client.lrange(QUEUE, 0, -1) == []
        assert client.hlen("unacked") == 0
    messages = " ".join(str(e.get("message")) for pod in celery.pods for e in pod.log_events())
    assert "no.such.task" in messages


def test_redis_data_loss_redelivers_what_the_workers_held_at_least_once(celery: Cluster) -> None:
    # The documented exception (docs/operations/failure-modes.md): what Redis forgot is gone,
    # but a message a worker held unacknowledged is not lost with it; it may run again. No
    # checkpointed task here: one whose checkpoint write meets the restart is lost, a fault of
    # its own (test_redis_restart_shorter_than_the_lease).
    load = celery.load("closs", gates=2, shorts=12, longs=0)
    load.enqueue()
    wait_for(
        lambda: not celery.jobs.client().llen(QUEUE),
        timeout=30,
        what="every message delivered to a worker",
    )
    load.wait_under_way(ended=0)
    celery.holder[0] = restart_redis_during(celery.holder[0], load, down_for=1.0, lose_data=True)
    load.wait_settled()
    load.check(once="at least")
    no_crash(celery)


def test_orphaned_worker_release_is_not_taken_back_by_its_own_consumer(
    cluster: Cluster, tmp_path: Path
) -> None:
    # One pod of its own on a queue of its own, running one long task with a free pool slot:
    # its consumer has a BRPOP waiting. Its supervisor is SIGKILLed, the worker releases the
    # task (RPUSH): that waiting BRPOP must not take the message back into a process about to
    # exit (it would be in no queue, no unacked entry: lost).
    queue = "crelease"
    jobs = cluster.jobs
    env = Env(tmp=tmp_path, database_url="", journal=cluster.journal)
    pod = start_worker(
        [*WORKERKIT, "run", "celery", "--", "--pool=prefork"],
        env,
        app="tests.apps.fault_celery:app",
        name="release-pod",
        engine={
            "E2E_REDIS_URL": jobs.url,
            "redis_url": jobs.url,
            "queues": queue,
            "log_level": "info",
        },
        settings={"concurrency": "2", "recovery_window": str(WINDOW)},
        new_session=True,
    )
    killed: list[int] = []
    try:
        pod.wait_ready(timeout=40)
        load = cluster.load("crel", shorts=0, longs=1, long_steps=40)
        jobs.enqueue([("long", "crel-long-0", ("crel-long-0", 40, 0.25))], queue=queue)
        load.ids.append("crel-long-0")
        wait_for(lambda: "crel-long-0" in load.runs(), timeout=30, what="the long task running")
        worker = Pods.worker_pid(pod)
        killed = Pods.tree(pod)
        os.kill(pod.pid, signal.SIGKILL)
        wait_for(lambda: not alive(worker), timeout=5, what="the worker to follow its supervisor")
        where = jobs.locate(["crel-long-0"])["crel-long-0"]
        with jobs.client() as client:
            queued = [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]
        assert queued == ["crel-long-0"], (where, pod.log_text()[-3000:])
    finally:
        kill_tree(pid for pid in killed if alive(pid))
        pod.stop()
        with jobs.client() as client:
            client.delete(queue)


def test_idempotency_claim_that_cannot_reach_its_store_keeps_the_task(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The fault of test_redis_restart_shorter_than_the_lease, forced: an idempotent task whose
    # key cannot be claimed (its store, Redis, is down longer than the claim's retries) while
    # its message is in a worker's hands. Its body never ran: the task must not be failed and
    # its message acknowledged (lost), but go back to its queue and run once the store is back.
    # Here the store is a Redis of its own (redis_url) and the broker stays up, so every
    # claim meets the outage; in the shared Redis of the scenario above, only the few that
    # start in it do.
    queue = "cidem"
    jobs = cluster.jobs
    store = start_redis(appendonly=True)
    env = Env(tmp=tmp_path, database_url="", journal=cluster.journal)
    pod = start_worker(
        [*WORKERKIT, "run", "celery", "--", "--pool=prefork"],
        env,
        app="tests.apps.fault_celery:app",
        name="idem-store-pod",
        engine={
            "E2E_REDIS_URL": jobs.url,  # the app's broker
            "redis_url": store.url(1),  # workerkit's idempotency store
            "queues": queue,
            "log_level": "info",
        },
        settings={"concurrency": "2", "recovery_window": str(WINDOW)},
        new_session=True,
    )
    ids = [f"cidem-idem-{n}" for n in range(2)]
    load = cluster.load("cidem", shorts=0, longs=0)
    load.ids.extend(ids)
    try:
        pod.wait_ready(timeout=40)
        store.process.stop()
        jobs.enqueue([("idem", job_id, (job_id, 0.02)) for job_id in ids], queue=queue)
        wait_for(
            lambda: all("redis unavailable" in _lines_of(pod, job_id) for job_id in ids),
            timeout=30,
            what="each task's claim to fail: its store unreachable",
        )
        store = start_redis(port=store.port, directory=store.directory, appendonly=True)

        lost_since: list[float] = []

        def done() -> bool:
            runs = load.runs()
            if all(any(run.ended for run in runs.get(job_id, [])) for job_id in ids):
                return True
            where = jobs.locate(ids)
            lost = [job_id for job_id in ids if not runs.get(job_id) and not where[job_id]]
            if not lost:
                lost_since.clear()
            elif not lost_since:
                lost_since.append(time.monotonic())
            elif time.monotonic() - lost_since[0] > 3.0:  # not a message in flight
                raise AssertionError(f"lost (never run, in no queue, not unacknowledged): {lost}")
            return False

        wait_for(done, timeout=30, what="each task run once its store is back")
        assert not problems(load.runs(), ids), problems(load.runs(), ids)
    finally:
        pod.stop()
        store.stop()
        with jobs.client() as client:
            client.delete(queue)


def _lines_of(pod: Supervisor, job_id: str) -> str:
    """The pod's log lines that mention ``job_id``, as one text."""
    lines = pod.log_path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if job_id in line)
