"""docs/tutorials/kubernetes.md, top to bottom without a cluster (tests/docs/cluster.py).

Run as the page shows them: ``workerkit check --format helm-values`` (its timing block must be
the one values.yaml pastes), ``helm template`` through Helm's SDK, ``kubernetes-validate``.
Checked: each cluster-only command's flags, files, namespace and the objects it names. Acted
out: the Secret (its name and key from the page, a real PostgreSQL's URL), ``helm install`` (the
rendered migrations Job's container run to completion, then the worker Deployment's pod started
and ready), ``kubectl exec -- CMD`` (CMD run here with the pod's environment), ``kubectl delete
pod`` (the kubelet mimic's termination: preStop sleep, SIGTERM to PID 1, SIGKILL at the grace
period), and every ``kubectl logs`` line the page shows, seen in that pod's log.

Two deviations, for a shared machine with no registry: the probes' port is a free one, and the
pod finds the page's tasks.py on its PYTHONPATH (in a volume) instead of in an image.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docs.blocks import ROOT
from tests.docs.cluster import helm_template, kubectl_args, problems_of
from tests.docs.tutorial import Command, Tutorial, matcher
from tests.support.container import DockerfileFacts, require_containers
from tests.support.kubelet import Pod, Termination
from tests.support.servers import free_port

PAGE = "docs/tutorials/kubernetes.md"
NAMESPACE = "jobs"


class LogReader:
    """A pod's log, read in order as ``kubectl logs -f`` shows it."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.position = 0

    def expect(self, shown: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for expected in shown:
            pattern = matcher(expected)
            while True:
                lines = self.pod.log.log_path.read_text().splitlines()
                found = next(
                    (i for i in range(self.position, len(lines)) if pattern.fullmatch(lines[i])),
                    None,
                )
                if found is not None:
                    self.position = found + 1
                    break
                assert time.monotonic() < deadline, (
                    f"the page shows {expected!r}; {self.pod.name}'s log:\n" + "\n".join(lines)
                )
                time.sleep(0.05)


class Cluster:
    """What the page's cluster-only commands do, acted out here."""

    def __init__(self, tmp_path: Path, rendered: dict[str, str], database_url: str) -> None:
        self.tmp = tmp_path
        self.objects = [o for text in rendered.values() for o in yaml.safe_load_all(text) if o]
        self.database_url = database_url
        self.secrets: dict[str, dict[str, str]] = {}
        self.image_dir = tmp_path / "image"  # the image's contents: the app
        self.pods: list[Pod] = []
        self.logs: list[LogReader] = []
        self.terminations: list[Termination] = []

    def _object(self, kind: str, component: str) -> dict[str, Any]:
        (found,) = [
            o
            for o in self.objects
            if o["kind"] == kind
            and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
        ]
        return found

    def pod(self, kind: str, component: str, name: str) -> Pod:
        workload = self._object(kind, component)
        container = workload["spec"]["template"]["spec"]["containers"][0]
        container.setdefault("env", []).append(
            {"name": "PYTHONPATH", "value": f"{self.image_dir}:{ROOT}"}
        )
        made = Pod.from_deployment(
            workload,
            secrets=self.secrets,
            image=DockerfileFacts.load(),
            workdir=self.tmp,
            volumes=[self.image_dir],
            name=name,
        )
        self.pods.append(made)
        return made

    def start_worker(self) -> None:
        pod = self.pod("Deployment", "worker-default", f"worker-{len(self.pods)}").start()
        pod.wait_started()
        self.logs.append(LogReader(pod))

    def act(self, tutorial: Tutorial, command: Command) -> None:
        assert problems_of(command.line, self.tmp, self.objects, NAMESPACE) == []
        argv = shlex.split(command.line)
        if argv[0] == "helm":  # install: the pre-install hook, then the worker
            self.image_dir.mkdir(exist_ok=True)
            shutil.copy(self.tmp / "tasks.py", self.image_dir)
            migrations = self.pod("Job", "migrations", "migrations")
            assert migrations.run_to_completion(60) == 0, migrations.log.log_text()
            self.start_worker()
            return
        verb, positional, flags, after = kubectl_args(command.line)
        if verb == "create":  # a generic secret from literals
            assert positional[:2] == ["secret", "generic"], command.line
            keys = [value.partition("=")[0] for value in flags["--from-literal"]]
            self.secrets[positional[2]] = dict.fromkeys(keys, self.database_url)
        elif verb == "exec":  # the command, with the pod's environment
            env = self.pods[-1].container.env
            tutorial.env["WORKERKIT_DATABASE_URL"] = env["WORKERKIT_DATABASE_URL"]
            tutorial.run(Command(shlex.join(after), command.before_interrupt))
        elif verb == "logs":
            if self.pods[-1].running is not None and self.pods[-1].log.proc.poll() is not None:
                self.start_worker()  # the Deployment's replacement for the deleted pod
            log = self.logs[-1]
            log.expect(command.before_interrupt)
            if command.second_terminal is not None:
                second = command.second_terminal
                assert problems_of(second, self.tmp, self.objects, NAMESPACE) == []
                assert kubectl_args(second)[0] == "delete", second
                self.terminations.append(log.pod.terminate())
                log.expect(command.after_interrupt or [])

    def stop(self) -> None:
        for pod in self.pods:
            pod.stop()


@pytest.mark.timeout(150)
def test_deploy_on_kubernetes_with_the_chart(tmp_path: Path, blank_postgres_url: str) -> None:
    require_containers()
    tutorial = Tutorial.prepare(PAGE, tmp_path)
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")  # the reader is in a clone's root
    files: list[str] = []
    outputs: dict[str, list[str]] = {}
    cluster: Cluster | None = None
    try:
        for kind, step in tutorial.steps():
            if isinstance(step, str):
                files.append(step)
            elif kind == "helm-sdk":
                override = {"probes": {"port": free_port()}}
                lines, rendered = helm_template(step.line, tmp_path, override)
                assert lines == step.before_interrupt, lines
                cluster = Cluster(tmp_path, rendered, blank_postgres_url)
            elif kind == "cluster-only":
                assert cluster is not None, "a cluster command before the render"
                cluster.act(tutorial, step)
            else:
                outputs[step.line.split()[0]] = tutorial.run(step)
        assert cluster is not None
        first, second = cluster.terminations[0], cluster.pods[-1]
        second_log = second.log.log_text()
        final = second.terminate()
    finally:
        if cluster is not None:
            cluster.stop()

    assert files == ["tasks.py", "values.yaml"]
    # values.yaml pastes exactly the block workerkit check printed
    printed = yaml.safe_load("\n".join(outputs["workerkit"][1:]))
    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    assert values["timing"] == printed["timing"]
    # the deleted pod: preStop 2 s, SIGTERM, out of the Service at once, the job released and
    # the pod gone by itself about P + D = 7 s after the delete, before the SIGKILL at 10 s
    assert not first.killed, first
    assert first.exit_code == 0
    assert first.sigterm_at >= 2
    assert first.readiness_after_sigterm is not None
    assert first.readiness_after_sigterm[0] == 503
    assert 7 <= first.exited_at < 10, first
    # the next pod resumed where the first stopped, not from 0
    assert "starting at 0" not in second_log
    assert not final.killed
    assert final.exit_code == 0


def test_the_cluster_checks_catch_a_wrong_flag_file_namespace_or_name(tmp_path: Path) -> None:
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    (tmp_path / "values.yaml").write_text("{}\n")
    labels = {"app.kubernetes.io/component": "worker-default"}
    deployment = {
        "kind": "Deployment",
        "metadata": {"name": "jobs-workerkit-worker-default"},
        "spec": {"template": {"metadata": {"labels": labels}}},
    }

    def problems(line: str) -> list[str]:
        return problems_of(line, tmp_path, [deployment], NAMESPACE)

    assert problems("helm install jobs deploy/helm/workerkit -n jobs -f values.yaml") == []
    assert problems("helm install jobs deploy/helm/workerkit -n jobs --valuez v.yaml") != []
    assert problems("helm install jobs deploy/helm/workerkit -n jobs -f missing.yaml") != []
    assert problems("helm install jobs deploy/helm/workerkit -n other") != []
    assert problems("helm install jobs deploy/helm/other -n jobs") != []
    assert problems("kubectl -n jobs logs -f deploy/jobs-workerkit-worker-default") == []
    assert problems("kubectl -n jobs logs -f deploy/jobs-workerkit-worker-dflt") != []
    assert problems("kubectl logs deploy/jobs-workerkit-worker-default") != []  # namespace
    assert problems("kubectl -n jobs lgs deploy/jobs-workerkit-worker-default") != []
    assert problems("kubectl -n jobs exec deploy/jobs-workerkit-worker-default") != []
    selector = "app.kubernetes.io/component=worker-default"
    assert problems(f"kubectl -n jobs delete pod -l {selector}") == []
    assert problems("kubectl -n jobs delete pod -l app.kubernetes.io/component=worker") != []
    assert problems("docker build .") != []
