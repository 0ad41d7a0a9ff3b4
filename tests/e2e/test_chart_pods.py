"""From the rendered chart to a real run: a worker Deployment rendered from
deploy/helm/workerkit, its pod run here as the kubelet runs it (tests/support/kubelet.py) on
SQL, RQ and Celery pools, with a long checkpointed job in hand when the pod is deleted.

The kubelet's termination: the preStop sleep (P = 1 s), SIGTERM to PID 1, SIGKILL at the grace
period (G = 8 s from the start). The chart puts the same G, P and M = 2 s in the worker's
environment, so the worker stops the job at D = G - P - M = 5 s after SIGTERM and releases it
before the kill: the pod exits by itself, and a second pod of the same spec resumes the job from
its checkpoint and finishes it, once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.support.container import REPO, DockerfileFacts, namespace_processes, require_containers
from tests.support.harness import wait_until
from tests.support.kubelet import Pod, PodSpecError
from tests.support.servers import free_port
from workerkit.app import App, EnqueueOptions
from workerkit.engines.sql import SqlQueue
from workerkit.settings import Settings

pytestmark = pytest.mark.e2e

CHART = REPO / "deploy" / "helm" / "workerkit"
POOL = "longjobs"
SECRET = "workerkit-urls"
GRACE, PRESTOP, MARGIN = 8, 1, 2
STEPS = 100  # of 0.1 s: 10 s of work, longer than the pod's D = 5 s
JOB = "x"


def render(work: Work, port: int) -> list[dict[str, Any]]:
    """The chart's objects for one pool, rendered with the test's short timing."""
    values = {
        "image": {"repository": "registry.example.com/workerkit-e2e"},
        "secrets": {"existingSecret": SECRET},
        "timing": {
            "gracePeriod": GRACE,
            "prestopDelay": PRESTOP,
            "releaseMargin": MARGIN,
            "jobTimeout": 60,
            "checkpointInterval": 1,
        },
        "probes": {"port": port, "livenessTimeout": 30, "startupTimeout": 30},
        "workers": {
            "default": {"enabled": False},
            POOL: {
                "engine": work.engine,
                "app": work.app,
                "queues": work.queues,
                "concurrency": 1,
                "replicas": 1,
                # The app is on the path as its wheel would be in the image; the jobs write
                # the test's journal, a volume shared with the test.
                "env": [
                    {"name": "PYTHONPATH", "value": str(REPO)},
                    {"name": "E2E_JOURNAL", "value": str(work.journal)},
                    *work.extra_env,
                ],
            },
        },
    }
    assert (CHART / "Chart.yaml").exists(), f"{CHART}: the Helm chart is missing"
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="rel", namespace="jobs", is_install=True)
    return [
        o
        for path, text in manifests.items()
        if path.endswith(".yaml")  # not NOTES.txt
        for o in yaml.safe_load_all(text)
        if o
    ]


def rendered(objects: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in objects
        if o["kind"] == kind and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def lines(journal: Path) -> list[str]:
    try:
        return journal.read_text().splitlines()
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------------
# the same long checkpointed job on each engine, read from its own journal lines


@dataclass
class Work:
    """One engine's long checkpointed job: how to enqueue it and read what happened."""

    engine: str
    app: str
    queues: list[str]
    url: str
    journal: Path

    @property
    def extra_env(self) -> list[dict[str, Any]]:
        """The pool's own env in the values (besides the app's path and the journal)."""
        return []

    def enqueue(self) -> None:
        raise NotImplementedError

    def starts(self) -> list[int]:
        """The checkpoint each run started from."""
        raise NotImplementedError

    def stops(self) -> list[int]:
        """Where each run stopped for a release."""
        raise NotImplementedError

    def done(self) -> int:
        return sum(line.split()[:2] == ["done", JOB] for line in lines(self.journal))

    def assert_released(self, stopped_at: int) -> None:
        raise NotImplementedError

    def assert_finished(self) -> None:
        raise NotImplementedError


def _numbers(journal: Path, pattern: str) -> list[int]:
    return [int(m.group(1)) for x in lines(journal) if (m := re.match(pattern, x))]


class SqlWork(Work):
    def _queue(self) -> SqlQueue:
        return SqlQueue(self.url, settings=Settings(database_url=self.url))

    def enqueue(self) -> None:
        app = App(self.url, settings=Settings(database_url=self.url))
        try:
            app.enqueue("cooperative", [JOB, STEPS], {}, EnqueueOptions(job_id=JOB))
        finally:
            app.backend.close()

    def starts(self) -> list[int]:
        return _numbers(self.journal, rf"start {JOB} 1 from (\d+)$")

    def stops(self) -> list[int]:
        return _numbers(self.journal, rf"stop {JOB} at (\d+)$")

    def _job(self) -> dict[str, Any]:
        queue = self._queue()
        try:
            job = queue.get_job(JOB)
        finally:
            queue.close()
        assert job is not None
        return job

    def assert_released(self, stopped_at: int) -> None:
        job = self._job()
        assert (job["state"], job["attempts"], job["lease_token"]) == ("ready", 0, None), job
        assert job["checkpoint"] == stopped_at, job

    def assert_finished(self) -> None:
        job = self._job()
        assert (job["state"], job["attempts"]) == ("succeeded", 1), job


class RqWork(Work):
    def _connection(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def enqueue(self) -> None:
        from rq import Queue
        from rq.serializers import JSONSerializer

        queue = Queue("default", connection=self._connection(), serializer=JSONSerializer)
        queue.enqueue("tests.apps.rq_jobs.cooperative", JOB, STEPS, job_id=JOB)

    def starts(self) -> list[int]:
        return _numbers(self.journal, rf"start {JOB} 1 from (\d+)$")

    def stops(self) -> list[int]:
        return _numbers(self.journal, rf"stop {JOB} at (\d+)$")

    def assert_released(self, stopped_at: int) -> None:
        from rq import Queue

        from workerkit.engines.rq.jobs import read_state

        state = read_state(self._connection(), JOB)
        assert (state["checkpoint"], state["attempts"]) == (stopped_at, 0), state
        assert Queue("default", connection=self._connection()).get_job_ids() == [JOB]

    def assert_finished(self) -> None:
        from rq.job import Job
        from rq.serializers import JSONSerializer

        job = Job.fetch(JOB, connection=self._connection(), serializer=JSONSerializer)
        assert job.get_status() == "finished"
        assert job.return_value() == f"{JOB} ok"


class CeleryWork(Work):
    @property
    def extra_env(self) -> list[dict[str, Any]]:
        # The test app names its broker itself (tests/apps/celery_jobs.py), as apps do; from
        # the same secret, by reference.
        ref = {"name": SECRET, "key": "redis-url"}
        return [{"name": "E2E_REDIS_URL", "valueFrom": {"secretKeyRef": ref}}]

    def enqueue(self) -> None:
        from tests.support.celery_harness import send

        send(self.url, "steps", JOB, STEPS, 0.1, task_id=JOB)

    def starts(self) -> list[int]:
        return _numbers(self.journal, rf"start {JOB} from=(\d+) attempt=1 ")

    def stops(self) -> list[int]:
        return _numbers(self.journal, rf"release {JOB} at=(\d+) ")

    def _queue(self) -> list[str]:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            raw = client.lrange("celery", 0, -1)
        finally:
            client.close()
        return [json.loads(item)["headers"]["id"] for item in raw]

    def assert_released(self, stopped_at: int) -> None:
        del stopped_at  # the next run's start says where it resumed
        assert self._queue() == [JOB]  # back in its queue before the pod exited

    def assert_finished(self) -> None:
        assert self._queue() == []


def _work(engine: str, request: pytest.FixtureRequest, journal: Path, *, blank: bool) -> Work:
    if engine == "sql":
        # blank: no workerkit schema yet, for the chart's migrations hook Job to create.
        url = request.getfixturevalue("blank_postgres_url" if blank else "postgres_url")
        return SqlWork(engine, "tests.apps.sql_jobs:app", [], url, journal)
    url = request.getfixturevalue("redis_url")
    if engine == "rq":
        return RqWork(engine, "tests.apps.rq_jobs:app", [], url, journal)
    return CeleryWork(engine, "tests.apps.celery_jobs:app", ["celery"], url, journal)


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    """The test's pods, whatever is left of them killed at the end."""
    started: list[Pod] = []
    try:
        yield started
    finally:
        for pod in started:
            pod.stop()


# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("engine", ["sql", "rq", "celery"])
def test_the_rendered_pod_releases_its_job_before_the_kill_and_the_next_pod_resumes_it(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest, pods: list[Pod]
) -> None:
    require_containers()
    data = tmp_path / "data"  # shared with the pods: the journal
    data.mkdir()
    work = _work(engine, request, data / "journal.txt", blank=True)
    objects = render(work, free_port())
    deployment = rendered(objects, "Deployment", f"worker-{POOL}")
    image = DockerfileFacts.load()
    secrets = {SECRET: {"database-url": work.url, "redis-url": work.url}}

    def pod(name: str, workload: dict[str, Any] = deployment) -> Pod:
        made = Pod.from_deployment(
            workload, secrets=secrets, image=image, workdir=tmp_path, volumes=[data], name=name
        )
        pods.append(made)
        return made

    if engine == "sql":  # the pre-install hook first, as Helm runs it: the schema
        migrate = pod("migrations", rendered(objects, "Job", "migrations"))
        assert migrate.container.argv == ["workerkit", "db", "upgrade"]
        assert migrate.run_to_completion(60) == 0, migrate.log.log_text()

    first = pod("pod-a")
    # What the kubelet got from the chart: one G for the kill and for the worker.
    assert (first.grace, first.prestop) == (GRACE, PRESTOP)
    assert first.container.argv == ["workerkit", "run", engine, "--app", work.app]
    env = first.container.env
    assert (env["WORKERKIT_GRACE_PERIOD"], env["WORKERKIT_PRESTOP_DELAY"]) == ("8", "1")
    assert (first.container.uid, first.container.read_only_root) == (10001, True)
    assert first.container.empty_dirs == ["/tmp"]
    assert first.startup is not None
    assert first.readiness is not None
    assert (first.startup.path, first.readiness.path) == ("/startupz", "/readyz")

    work.enqueue()
    first.start()
    first.wait_started()
    assert first.status()["Uid"].split()[0] == "10001"
    assert first.log.wait_event("supervisor_starting")["pid"] == 1
    # The uid has its passwd and group entries (as the image has): Celery's privilege check
    # does not mistake it for root.
    assert "SecurityWarning" not in first.log.log_path.read_text()
    wait_until(lambda: work.starts() == [0], timeout=30, what="the job to start")
    ended = first.terminate()

    print(f"{engine} pod-a: {ended}")
    assert not ended.killed, f"SIGKILLed at the grace period:\n{first.log.log_text()}"
    assert ended.exit_code == 0, first.log.log_text()
    assert ended.sigterm_at >= PRESTOP  # the preStop sleep came first
    assert ended.exited_at < GRACE, ended
    assert ended.readiness_after_sigterm is not None
    assert ended.readiness_after_sigterm[0] == 503, ended  # out of the Service at once
    (stopped_at,) = work.stops()
    assert 0 < stopped_at < STEPS, stopped_at
    work.assert_released(stopped_at)
    assert work.done() == 0
    (stopped,) = first.log.events_named("supervisor_stopped")
    assert stopped["outcome"] in ("released", "clean"), stopped

    second = pod("pod-b")
    second.start()
    second.wait_started()
    wait_until(lambda: work.done() == 1, timeout=STEPS * 0.1 + 30, what="the job to finish")
    ended = second.terminate()  # idle now: out at once
    assert not ended.killed
    assert ended.exit_code == 0, second.log.log_text()
    assert ended.exited_at < PRESTOP + MARGIN + 1, ended  # idle: no drain to wait for

    assert work.starts() == [0, stopped_at], lines(work.journal)  # resumed, not restarted
    assert work.done() == 1, lines(work.journal)
    work.assert_finished()


@pytest.mark.timeout(60)
def test_a_grace_period_that_drifted_from_the_workers_is_a_kill_with_the_job_in_hand(
    tmp_path: Path, request: pytest.FixtureRequest, pods: list[Pod]
) -> None:
    # The control: the same pod with terminationGracePeriodSeconds set apart from the worker's
    # WORKERKIT_GRACE_PERIOD (what the chart's one timing block rules out). The kubelet kills
    # at 4 s, before the worker's release at P + D = 6 s: the kill above would have been seen.
    require_containers()
    data = tmp_path / "data"
    data.mkdir()
    work = _work("sql", request, data / "journal.txt", blank=False)
    deployment = rendered(render(work, free_port()), "Deployment", f"worker-{POOL}")
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 4
    pod = Pod.from_deployment(
        deployment,
        secrets={SECRET: {"database-url": work.url}},
        image=DockerfileFacts.load(),
        workdir=tmp_path,
        volumes=[data],
    )
    pods.append(pod)
    work.enqueue()
    pod.start()
    pod.wait_started()
    pid1 = pod.pid1
    wait_until(lambda: work.starts() == [0], timeout=30, what="the job to start")
    ended = pod.terminate()
    assert ended.killed, ended
    assert 4 <= ended.exited_at < 6, ended
    assert namespace_processes(pid1) == {}  # PID 1 killed: the whole container with it
    assert work.stops() == []  # never asked to stop: the job was cut mid-step
    assert work.done() == 0
    assert not pod.log.events_named("supervisor_stopped")


def test_the_kubelet_here_reads_a_pod_as_kubernetes_does(tmp_path: Path) -> None:
    # Our own logic (no processes): command/args over the image's, env order and $(VAR),
    # secret references, and refusals of what it cannot run the way the kubelet would.
    image = DockerfileFacts.load()
    container: dict[str, Any] = {
        "name": "worker",
        "args": ["run", "rq"],
        "env": [
            {"name": "A", "value": "1"},
            {"name": "B", "value": "$(A)-$(PATH)-$$(A)-$(NOPE)"},
            {"name": "URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ],
        "ports": [{"name": "http", "containerPort": 9000}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "securityContext": {"runAsUser": 4242, "readOnlyRootFilesystem": True},
    }
    spec: dict[str, Any] = {"containers": [container], "securityContext": {"runAsGroup": 7}}
    workload = {"spec": {"template": {"spec": spec}}}

    def pod() -> Pod:
        return Pod.from_deployment(
            workload, secrets={"s": {"k": "redis://x"}}, image=image, workdir=tmp_path
        )

    made = pod()
    assert made.container.argv == [*image.entrypoint, "run", "rq"]
    assert made.container.env["B"] == "1-$(PATH)-$(A)-$(NOPE)"  # not the image's PATH
    assert made.container.env["URL"] == "redis://x"
    assert made.container.env["TMPDIR"] == "/tmp"  # the image's ENV under the pod's
    assert (made.container.uid, made.container.gid) == (4242, 7)
    assert made.readiness is not None
    assert (made.readiness.port, made.readiness.period) == (9000, 5.0)
    assert (made.grace, made.prestop, made.container.empty_dirs) == (30.0, 0.0, [])
    container["command"] = ["python", "-m", "x"]
    assert pod().container.argv == ["python", "-m", "x", "run", "rq"]
    del container["args"]
    assert pod().container.argv == ["python", "-m", "x"]  # a command drops the image's CMD
    container["env"][2]["valueFrom"]["secretKeyRef"]["key"] = "missing"
    with pytest.raises(PodSpecError, match="has no key 'missing'"):
        pod()
    container["env"].pop()
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    with pytest.raises(PodSpecError, match="only the sleep action"):
        pod()
    container["lifecycle"] = {"preStop": {"sleep": {"seconds": 3}}}
    assert pod().prestop == 3.0
    container["securityContext"] = {"runAsUser": 0, "runAsNonRoot": True}
    with pytest.raises(PodSpecError, match="runAsNonRoot"):
        pod()
