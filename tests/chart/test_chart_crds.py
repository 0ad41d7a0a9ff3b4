"""The chart's custom resources against the upstream CRD schemas vendored in tests/support.

kubernetes-validate knows only the built-in kinds; the KEDA ScaledObject, ServiceMonitor,
PodMonitor and PrometheusRule the chart renders are validated by ``tests.support.k8s`` against
the ``openAPIV3Schema`` of their CRDs, for every values file of the matrix and for values that
turn every one of them on. The negative cases show the validator refuses what the API server
would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helm import CI_VALUES, find, load_ci_values, render
from tests.support.k8s import is_crd_kind, validate_crd, vendored_kinds

ALERTS = Path(__file__).resolve().parents[2] / "deploy/helm/workerkit/files/alerts.yaml"

_KEDA_POOLS: dict[str, Any] = {
    "default": {
        "app": "proj.tasks:app",
        "keda": {"enabled": True, "authenticationRef": "workerkit-postgres"},
    },
    "mail": {
        "engine": "rq",
        "app": "proj.rq:app",
        "queues": ["mail", "mail-bulk"],
        "keda": {"enabled": True, "authenticationRef": "workerkit-redis"},
    },
    "reports": {
        "engine": "celery",
        "app": "proj.celery:app",
        "queues": ["reports"],
        "keda": {
            "enabled": True,
            "authenticationRef": "workerkit-redis",
            "minReplicaCount": 0,
            "cooldownPeriod": 600,  # to zero: at least J + D (the chart refuses less)
        },
    },
    "metered": {
        "app": "proj.tasks:app",
        "queues": ["metered"],
        "keda": {
            "enabled": True,
            "trigger": "prometheus",
            "prometheus": {
                "serverAddress": "http://prometheus-operated.monitoring:9090",
                "query": 'max(workerkit_queue_depth{queue="metered"})',
                "threshold": "20",
            },
        },
    },
}
_MONITORING = {"service": {"enabled": True}, "prometheusRule": {"enabled": True}}
_ONE_POOL = {"default": {"app": "proj.tasks:app"}}

#: Values that render each custom resource the chart has: KEDA on every engine's trigger and
#: on a Prometheus query; a ServiceMonitor or a PodMonitor; the PrometheusRule.
EVERY_CRD: dict[str, dict[str, Any]] = {
    "keda-every-trigger": {"workers": _KEDA_POOLS},
    "service-monitor": {
        "workers": _ONE_POOL,
        "metrics": {
            **_MONITORING,
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        },
    },
    "pod-monitor": {
        "workers": _ONE_POOL,
        "metrics": {
            "podMonitor": {"enabled": True, "interval": "15s"},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        },
    },
}

MATRIX = [pytest.param(load_ci_values(path), id=f"ci/{path.name}") for path in CI_VALUES] + [
    pytest.param(values, id=name) for name, values in EVERY_CRD.items()
]


def custom_resources(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [obj for obj in render(values) if is_crd_kind(obj)]


@pytest.mark.parametrize("values", MATRIX)
def test_every_custom_resource_matches_its_crd_schema(values: dict[str, Any]) -> None:
    problems = [problem for obj in custom_resources(values) for problem in validate_crd(obj)]
    assert not problems, "\n".join(problems)


def test_the_values_above_render_every_vendored_kind() -> None:
    """Otherwise a kind the chart renders badly could go unchecked."""
    kinds = {
        (obj["apiVersion"], obj["kind"])
        for values in EVERY_CRD.values()
        for obj in custom_resources(values)
    }
    assert kinds == set(vendored_kinds())


def test_each_scaled_object_targets_its_pool_deployment_without_replicas() -> None:
    objects = render(EVERY_CRD["keda-every-trigger"])
    scaled = find(objects, "ScaledObject")
    assert len(scaled) == len(_KEDA_POOLS)
    for obj in scaled:
        target = obj["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        (deployment,) = find(objects, "Deployment", target["name"])
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
        assert obj["metadata"]["name"] == deployment["metadata"]["name"]


def test_the_prometheus_rule_carries_the_alerts_file_unchanged() -> None:
    """Prometheus' own templates (``{{ $labels.pod }}``) must survive Helm's rendering."""
    (rule,) = find(render(EVERY_CRD["pod-monitor"]), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def _repeat_first_group(obj: dict[str, Any]) -> None:
    obj["spec"]["groups"].append(copy.deepcopy(obj["spec"]["groups"][0]))


@pytest.mark.parametrize(
    ("kind", "mutate", "expected"),
    [
        # KEDA reads every trigger's metadata as strings: an unquoted number is refused.
        (
            "ScaledObject",
            _set("spec.triggers.0.metadata.listLength", 10),
            "spec.triggers[0].metadata.listLength: 10 is not of type 'string'",
        ),
        # An HPA's field name on a ScaledObject: strict field validation refuses it.
        ("ScaledObject", _set("spec.maxReplicas", 5), "'maxReplicas' was unexpected"),
        # The CRD's CEL rule.
        (
            "ScaledObject",
            _set("spec.minReplicaCount", 50),
            "minReplicaCount must be less than or equal to maxReplicaCount",
        ),
        ("ScaledObject", _drop("spec.scaleTargetRef"), "'scaleTargetRef' is a required property"),
        ("ScaledObject", _set("spec.pollingInterval", "15"), "'15' is not of type 'integer'"),
        ("ScaledObject", _set("metadata.labels.replicas", 2), "2 is not of type 'string'"),
        ("ServiceMonitor", _set("spec.endpoints.0.interval", "30"), "'30' does not match"),
        ("PrometheusRule", _set("spec.groups.0.rules.0.for", "15 minutes"), "does not match"),
        ("PrometheusRule", _set("spec.groups.0.rules.0.severity", "warning"), "was unexpected"),
        # groups is a list-map keyed by name: two groups of one name are refused.
        ("PrometheusRule", _repeat_first_group, "duplicate entry in a list of type map"),
    ],
)
def test_a_broken_custom_resource_is_refused(
    kind: str, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    objects = [
        obj
        for values in EVERY_CRD.values()
        for obj in custom_resources(values)
        if obj["kind"] == kind
    ]
    broken = copy.deepcopy(objects[0])
    assert validate_crd(broken) == []
    mutate(broken)
    problems = validate_crd(broken)
    assert any(expected in problem for problem in problems), problems
