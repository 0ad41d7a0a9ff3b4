"""The rq engine on Redis under faults: three ``workerkit run rq`` pods (forking workers), a load
of journaled jobs (tests/apps/fault_jobs.py), one fault per test (tests/support/faults.py has
the verdict). The redis-server (append-only) and the pods are shared by the module.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.support.faults import (
    Load,
    Pods,
    alive,
    kill_tree,
    restart_redis_during,
    running_long_jobs,
    wait_for,
)
from tests.support.harness import WORKERKIT, Supervisor, start_worker
from tests.support.rq_harness import RqEnv

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

pytestmark = pytest.mark.timeout(120)

#: The lease (V): a worker that stopped renewing loses its job 4 s later.
LEASE = 4.0
SETTLED = {"finished", "failed"}


class RqJobs:
    """RQ's keys in the module's Redis, read and written directly."""

    def __init__(self, holder: list[RedisServer]) -> None:
        self.holder = holder

    @property
    def url(self) -> str:
        return self.holder[0].url(0)

    def client(self) -> redis.Redis[bytes]:
        return redis.Redis.from_url(self.url)

    def enqueue(self, jobs: list[tuple[str, str, tuple[object, ...]]]) -> None:
        with self.client() as client:
            queue = Queue("default", connection=client, serializer=JSONSerializer)
            for task, job_id, args in jobs:
                queue.enqueue(f"tests.apps.fault_jobs.rq_{task}", *args, job_id=job_id)

    def statuses(self, ids: list[str]) -> dict[str, str | None]:
        with self.client() as client, client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(f"rq:job:{job_id}", "status")
            found = pipe.execute()
        return {
            job_id: (status.decode() if status else None)
            for job_id, status in zip(ids, found, strict=True)
        }

    def busy(self, ids: list[str]) -> list[str]:
        return [job_id for job_id, s in self.statuses(ids).items() if s not in SETTLED]

    def stuck(self, ids: list[str]) -> list[str]:
        with self.client() as client:
            started = set(
                StartedJobRegistry("default", connection=client).get_job_ids(cleanup=False)
            )
        marked = {job_id for job_id, s in self.statuses(ids).items() if s == "started"}
        return sorted(marked | (started & set(ids)))

    def kill_clients(self) -> int:
        """CLIENT KILL of every connection but this one (commands, blocking pops, pub/sub)."""
        with self.client() as client:
            killed = 0
            for kind in ("normal", "pubsub"):
                killed += int(client.execute_command("CLIENT KILL TYPE", kind, "SKIPME", "yes"))
            return killed


@dataclass
class Cluster:
    pods: Pods
    jobs: RqJobs
    journal: Path
    holder: list[RedisServer]

    def load(self, prefix: str, **kwargs: Any) -> Load:
        # One job at a time per worker, a fork each: fewer jobs than on the other engines.
        return Load(self.jobs, prefix, self.journal, **{"shorts": 36, "longs": 3, **kwargs})


@pytest.fixture(scope="module")
def cluster(
    fault_redis: list[RedisServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    jobs = RqJobs(fault_redis)
    tmp = tmp_path_factory.mktemp("rq-faults")
    env = RqEnv(tmp=tmp, redis_url=jobs.url, journal=tmp / "journal.txt")

    def start(name: str) -> Supervisor:
        return start_worker(
            [*WORKERKIT, "run", "rq", "--worker-class", "forking"],
            env,
            app="tests.apps.fault_jobs:rq_app",
            name=name,
            engine={"redis_url": jobs.url, "checkpoint_interval": "0.5"},
            settings={"visibility_timeout": str(LEASE)},
        )

    pods = Pods(start)
    try:
        yield Cluster(pods, jobs, env.journal, fault_redis)
    finally:
        pods.stop_all()


@pytest.fixture
def rq(cluster: Cluster) -> Cluster:
    cluster.pods.ensure()
    return cluster


def no_crash(rq: Cluster) -> None:
    for pod in rq.pods:
        assert pod.proc.poll() is None, pod.log_text()
        assert not pod.events_named("worker_crashed"), pod.log_text()


def restart_under_load(rq: Cluster, prefix: str, down_for: float) -> None:
    load = rq.load(prefix, gates=2)
    load.enqueue()
    load.wait_under_way(long_running=True)
    rq.holder[0] = restart_redis_during(rq.holder[0], load, down_for=down_for)
    load.wait_settled()
    load.check()
    no_crash(rq)


def test_redis_restart_shorter_than_the_lease(rq: Cluster) -> None:
    restart_under_load(rq, "rqshort", down_for=LEASE / 2)


def test_redis_restart_longer_than_the_lease(rq: Cluster) -> None:
    restart_under_load(rq, "rqlong", down_for=LEASE + 1)


def test_connections_killed_again_and_again(rq: Cluster) -> None:
    load = rq.load("rqkill")
    load.enqueue()
    load.wait_under_way(ended=10)
    killed = 0
    for _ in range(10):
        killed += rq.jobs.kill_clients()
        time.sleep(0.3)
    assert killed >= 10
    load.wait_settled()
    load.check()
    no_crash(rq)


def test_worker_stopped_past_its_lease_is_fenced_when_it_wakes(rq: Cluster) -> None:
    load = rq.load("rqstop", long_steps=40)  # 10 s jobs: still running when the lease is gone
    first = load.enqueue(longs_last=True)
    load.wait_under_way(ended=len(first) - load.longs)
    pod, victim, held = running_long_jobs(load, rq.pods)
    os.kill(victim, signal.SIGSTOP)  # the worker; its work horse runs on
    try:
        load.longs = 0
        load.enqueue(batch="b")
        wait_for(
            lambda: all(len(load.runs()[job_id]) > 1 for job_id in held),
            timeout=4 * LEASE,
            what="the stopped worker's job taken over by the other pods",
        )
    finally:
        os.kill(victim, signal.SIGCONT)
    load.wait_settled()
    load.check()
    assert pod.proc.poll() is None, pod.log_text()


def test_killed_pod_jobs_rerun_by_the_other_pods_once(rq: Cluster) -> None:
    load = rq.load("rqpod")
    load.enqueue()
    load.wait_under_way()
    killed = Pods.tree(rq.pods.pods[0])
    kill_tree(killed)  # the node is gone: supervisor, worker, horse at once
    killed_at = time.time()
    load.wait_settled()
    load.check(killed=killed, killed_at=killed_at)


def test_supervisor_sigkilled_its_worker_follows_and_jobs_run_once(rq: Cluster) -> None:
    load = rq.load("rqsup")
    load.enqueue()
    load.wait_under_way()
    pod = rq.pods.pods[0]
    worker = Pods.worker_pid(pod)
    killed = Pods.tree(pod)
    rq.pods.orphans.extend(killed[1:])
    os.kill(pod.pid, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: not alive(worker), timeout=3, what="the worker to die with its supervisor")
    load.wait_settled()
    load.check(killed=killed, killed_at=killed_at)


def test_poison_entries_fail_with_their_reason_and_the_workers_go_on(rq: Cluster) -> None:
    load = rq.load("rqpoison")
    with rq.jobs.client() as client:
        queue = Queue("default", connection=client, serializer=JSONSerializer)
        bad_meta = "rqpoison-p-meta"
        # The hash is spoiled before its id is queued: three pods are popping already.
        queue.create_job(
            "tests.apps.fault_jobs.rq_short", args=(bad_meta, 0.0), job_id=bad_meta
        ).save()
        client.hset(f"rq:job:{bad_meta}", "meta", b"\x80not json")
        client.rpush("rq:queue:default", bad_meta)
        client.rpush("rq:queue:default", b"\xff\xfe not utf-8", "rqpoison-p-nohash")
    load.enqueue()
    load.ids.append(bad_meta)
    load.wait_settled(failed=[bad_meta])
    load.check(failed=[bad_meta])
    no_crash(rq)
    with rq.jobs.client() as client:
        failed = FailedJobRegistry("default", connection=client)
        assert bad_meta in failed.get_job_ids(cleanup=False)
        assert client.lrange("rq:queue:default", 0, -1) == []


def test_redis_data_loss_loses_what_it_held_and_the_workers_go_on(rq: Cluster) -> None:
    # Not a guarantee but a statement: what Redis forgot is gone. The jobs still queued are
    # lost, a run in hand ends at most once, nothing runs twice at once, and every worker
    # reconnects and runs what comes next exactly once.
    lost = rq.load("rqloss", gates=2)
    lost.enqueue()
    lost.wait_under_way()
    rq.holder[0] = restart_redis_during(rq.holder[0], lost, down_for=1.0, lose_data=True)
    after = rq.load("rqafter", shorts=20, longs=1)
    after.enqueue()
    after.wait_settled()
    after.check()
    lost.check(once="at most")
    never = [job_id for job_id in lost.ids if not lost.runs().get(job_id)]
    assert never, "no job was lost: the restart came too late to find any queued"
    no_crash(rq)
