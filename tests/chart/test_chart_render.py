"""The chart renders, lints and validates for every values file of its matrix (ci/*.yaml), and
what it renders is what workerkit needs: one timing value in both places, probes on the
supervisor's port, a hardened pod, secrets by reference, labels and selectors that hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.support.helm import (
    CI_VALUES,
    container_env,
    deployments,
    find,
    lint,
    load_ci_values,
    render,
    render_error,
)
from workerkit.errors import UnknownSetting
from workerkit.settings import load_settings
from workerkit.timing import evaluate

#: Kubernetes versions every object must validate against (the chart's kubeVersion >= 1.29;
#: a preStop sleep needs 1.30, and the render refuses it below).
KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0")
#: Custom resources: validated against their vendored schemas in test_chart_crds.py.
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
SECRETS = {
    "database-url": "postgresql+psycopg://app:pw@db.example:5432/jobs",
    "redis-url": "redis://redis.example:6379/0",
    "DATABASE_URL": "postgresql+psycopg://app:pw@db.example:5432/jobs",
    "REDIS_URL": "redis://redis.example:6379/0",
}

CI_IDS = [p.stem for p in CI_VALUES]


def _rendered(path: Path) -> list[dict[str, Any]]:
    return render(load_ci_values(path), base=False)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj["spec"]["template"]["spec"]["containers"])


def test_the_matrix_is_there() -> None:
    assert {"sql-minimal", "rq-pool", "celery-keda", "full", "hardened"} <= set(CI_IDS)


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_lint_strict_finds_nothing(path: Path) -> None:
    """Lint's own findings. Lint renders with the templates' `fail` turned into a log line, so
    it never reports a refusal (a preStop on 1.29, a bad budget): the render tests do."""
    for kube in ("v1.29.0", "v1.34.0"):
        findings = lint(load_ci_values(path), kube_version=kube)
        assert [f for f in findings if f["severity"] >= 2] == [], kube
        assert all(f["severity"] <= 1 for f in findings)


def _has_prestop(objects: list[dict[str, Any]]) -> bool:
    return any("lifecycle" in c for d in find(objects, "Deployment") for c in _containers(d))


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_every_core_object_validates_strictly(path: Path) -> None:
    """Rendered for each cluster version (.Capabilities.KubeVersion) and validated against its
    schemas. The 1.29 schema has preStop's sleep action (alpha there, off by default), so a
    values file with a preStop must be refused by the render on 1.29, not merely validate."""
    values = load_ci_values(path)
    prestop = _has_prestop(render(values, base=False))
    for version in KUBE_VERSIONS:
        if prestop and tuple(map(int, version.split("."))) < (1, 30):
            message = render_error(values, base=False, kube_version=f"v{version}")
            assert "timing.prestopDelay is" in message
            assert f"the cluster is v{version}" in message
            continue
        objects = render(values, base=False, kube_version=f"v{version}")
        core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
        assert core
        for obj in core:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_matrix_covers_1_29_with_and_without_a_prestop() -> None:
    with_prestop = {p.stem for p in CI_VALUES if _has_prestop(_rendered(p))}
    assert with_prestop
    assert set(CI_IDS) - with_prestop


@pytest.mark.parametrize("component", ["workers.default", "scheduler"])
def test_a_prestop_sleep_is_refused_below_kubernetes_1_30(component: str) -> None:
    if component == "scheduler":
        values: dict[str, Any] = {
            "workers": {"default": {"app": "p:a"}},
            "scheduler": {"enabled": True, "app": "p:a", "timing": {"prestopDelay": 3}},
        }
    else:
        values = {"workers": {"default": {"app": "p:a", "timing": {"prestopDelay": 3}}}}
    for version in ("v1.29.0", "v1.29.9", "1.28.3"):
        message = render_error(values, kube_version=version)
        assert f"{component}: timing.prestopDelay is 3" in message
        assert "needs Kubernetes 1.30 or later" in message
        assert version.lstrip("v") in message
    for version in ("v1.30.0", "v1.30.0-gke.1200", "v1.34.1"):
        objects = render(values, kube_version=version)
        assert _has_prestop(objects)
    # Without a preStop, 1.29 is supported.
    plain = render({"workers": {"default": {"app": "p:a"}}}, kube_version="v1.29.0")
    assert not _has_prestop(plain)
    assert find(plain, "Deployment")


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_grace_prestop_and_probes_come_from_one_value(path: Path) -> None:
    for component, deployment in deployments(_rendered(path)).items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = container_env(deployment)
        assert pod["terminationGracePeriodSeconds"] == int(env["WORKERKIT_GRACE_PERIOD"])
        prestop = int(env["WORKERKIT_PRESTOP_DELAY"])
        if prestop:
            assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": prestop}}
        else:
            assert "lifecycle" not in container, component
        (port,) = container["ports"]
        assert port == {
            "name": "http",
            "containerPort": int(env["WORKERKIT_HTTP_PORT"]),
            "protocol": "TCP",
        }
        paths = {
            probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
            for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert paths == {
            "startupProbe": ("/startupz", "http"),
            "livenessProbe": ("/livez", "http"),
            "readinessProbe": ("/readyz", "http"),
        }
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget > float(env["WORKERKIT_STARTUP_TIMEOUT"])  # the worker's exit code first
        live = container["livenessProbe"]
        assert 1 <= live["periodSeconds"] <= 10
        assert live["periodSeconds"] <= float(env["WORKERKIT_LIVENESS_TIMEOUT"]) / 3


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_the_rendered_env_is_a_budget_workerkit_accepts(path: Path) -> None:
    """What each container reads (args + env + its secrets) loads and passes the worker's check."""
    for component, deployment in deployments(_rendered(path)).items():
        (container,) = _containers(deployment)
        assert "command" not in container  # the image's ENTRYPOINT ["workerkit"] runs
        args = container["args"]
        verb = "scheduler" if component == "scheduler" else "run"
        assert args[0] == verb
        assert args[2] == "--app"
        assert len(args) == 4
        env = container_env(deployment, SECRETS)
        workerkit_env = {k: v for k, v in env.items() if k.startswith("WORKERKIT_")}
        settings = load_settings({"engine": args[1], "app": args[3]}, env=workerkit_env)
        report = evaluate(settings)
        assert report.ok, (component, [f.message for f in report.errors])


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_the_pods_are_hardened(path: Path) -> None:
    values = load_ci_values(path)
    objects = _rendered(path)
    pods = [d["spec"]["template"]["spec"] for d in find(objects, "Deployment")]
    pods += [j["spec"]["template"]["spec"] for j in find(objects, "Job")]
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False  # no WORKERKIT_X_SERVICE_HOST (see below)
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert isinstance(security["runAsUser"], int)
        assert security["runAsUser"] > 0
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert security["runAsUser"] == values.get("podSecurityContext", {}).get("runAsUser", 10001)
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
        assert {"name": "TMPDIR", "value": "/tmp"} in container["env"]


def test_why_service_links_are_off() -> None:
    """A Service named workerkit-metrics (release "workerkit") would inject this variable."""
    with pytest.raises(UnknownSetting, match="WORKERKIT_METRICS_SERVICE_HOST"):
        load_settings({"engine": "sql"}, env={"WORKERKIT_METRICS_SERVICE_HOST": "10.0.0.1"})


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_urls_only_by_secret_reference(path: Path) -> None:
    for obj in [*find(_rendered(path), "Deployment"), *find(_rendered(path), "Job")]:
        for container in _containers(obj):
            for var in container["env"]:
                assert "://" not in var.get("value", ""), var
                if var["name"] in ("WORKERKIT_DATABASE_URL", "WORKERKIT_REDIS_URL"):
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == load_ci_values(path)["secrets"]["existingSecret"]


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_labels_selectors_and_names(path: Path) -> None:
    objects = _rendered(path)
    names: set[tuple[str, str]] = set()
    for obj in objects:
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        assert (obj["kind"], meta["name"]) not in names
        names.add((obj["kind"], meta["name"]))
        labels = meta["labels"]
        for key in ("name", "instance", "version", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels
        assert all(len(str(v)) <= 63 for v in labels.values())
    for deployment in find(objects, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert set(selector) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        }
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template_labels.items()
        assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        name = deployment["metadata"]["name"]
        for pdb in find(objects, "PodDisruptionBudget", name):
            assert pdb["spec"]["selector"]["matchLabels"] == selector
        scalers = [*find(objects, "HorizontalPodAutoscaler", name)]
        scalers += find(objects, "ScaledObject", name)
        for scaler in scalers:
            assert scaler["spec"]["scaleTargetRef"]["name"] == name
        assert ("replicas" in deployment["spec"]) == (not scalers), name
