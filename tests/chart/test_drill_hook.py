"""The ``helm test`` hook (templates/tests/drill.yaml): one Pod per pool running ``workerkit
drill ENGINE`` against the pool's store, rendered, linted, validated and parsed by the real
command line, so that ``helm test`` runs what the chart says it runs."""

from __future__ import annotations

from typing import Any

import click
import kubernetes_validate
import pytest

from tests.support.helm import find, lint, render, render_error
from workerkit.cli import main
from workerkit.drill.options import spec_from_options

SQL_POOL = {"workers": {"default": {"app": "proj.tasks:app"}}}
TWO_POOLS = {
    "workers": {
        "default": {"app": "proj.tasks:app"},
        "mail": {"engine": "rq", "app": "proj.rq:app", "queues": ["mail", "mail-bulk"]},
    }
}


def _drill_pods(values: dict[str, Any], **opts: Any) -> dict[str, dict[str, Any]]:
    """The test hook Pods by pool (their component label is ``drill-<pool>``)."""
    pods = find(render(values, **opts), "Pod")
    return {
        p["metadata"]["labels"]["app.kubernetes.io/component"].removeprefix("drill-"): p
        for p in pods
    }


def test_one_test_pod_per_pool_with_its_engine_app_and_queues() -> None:
    pods = _drill_pods(TWO_POOLS)
    assert set(pods) == {"default", "mail"}
    for pool, pod in pods.items():
        meta = pod["metadata"]
        assert meta["annotations"]["helm.sh/hook"] == "test"
        assert meta["name"] == f"rel-workerkit-drill-{pool}"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["activeDeadlineSeconds"] == 600
    sql_args = pods["default"]["spec"]["containers"][0]["args"]
    assert sql_args[:4] == ["drill", "sql", "--app", "proj.tasks:app"]
    assert "--queues" not in sql_args
    rq_args = pods["mail"]["spec"]["containers"][0]["args"]
    assert rq_args[:4] == ["drill", "rq", "--app", "proj.rq:app"]
    assert rq_args[rq_args.index("--queues") + 1] == "mail,mail-bulk"


def test_the_store_comes_from_the_pools_secret_and_the_pod_is_hardened() -> None:
    pods = _drill_pods(TWO_POOLS)
    for pool, variable, key in (
        ("default", "WORKERKIT_DATABASE_URL", "database-url"),
        ("mail", "WORKERKIT_REDIS_URL", "redis-url"),
    ):
        spec = pods[pool]["spec"]
        (container,) = spec["containers"]
        (url,) = [e for e in container["env"] if e["name"] == variable]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "workerkit-urls", "key": key}
        assert all("://" not in e.get("value", "") for e in container["env"])
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["enableServiceLinks"] is False
        assert {"name": "TMPDIR", "value": "/tmp"} in container["env"]


def test_the_args_are_what_workerkit_drill_accepts() -> None:
    """Parsed by the real `workerkit drill ENGINE` and turned into a drill spec."""
    values = {**TWO_POOLS, "drillTest": {"rate": "600/m", "duration": "2m", "mix": "short=1"}}
    for pod in _drill_pods(values).values():
        args = pod["spec"]["containers"][0]["args"]
        drill = main.get_command(click.Context(main), "drill")
        assert isinstance(drill, click.Group)
        command = drill.commands[args[1]]
        context = command.make_context("drill", list(args[2:]))
        spec = spec_from_options(args[1], {**context.params, "redis_url": None})
        assert (spec.rate, spec.duration, dict(spec.mix)) == (10.0, 120.0, {"short": 1})
        assert spec.settings.app == args[3]


def test_pools_filter_and_off_switch() -> None:
    assert set(_drill_pods({**TWO_POOLS, "drillTest": {"pools": ["mail"]}})) == {"mail"}
    assert _drill_pods({**TWO_POOLS, "drillTest": {"enabled": False}}) == {}


@pytest.mark.parametrize(
    ("drill", "words"),
    [
        ({"rate": "fast"}, ["/drillTest/rate"]),
        ({"duration": "soon"}, ["/drillTest/duration"]),
        ({"mix": "short=90,huge=10"}, ["/drillTest/mix"]),
        ({"activeDeadlineSeconds": 0}, ["/drillTest/activeDeadlineSeconds"]),
        ({"color": "red"}, ["color"]),
    ],
)
def test_the_schema_refuses_bad_values(drill: dict[str, Any], words: list[str]) -> None:
    message = render_error({**SQL_POOL, "drillTest": drill})
    for word in words:
        assert word in message, message


def test_lint_strict_and_kubernetes_validate() -> None:
    values = {**TWO_POOLS, "drillTest": {"resources": {"requests": {"cpu": "50m"}}}}
    for kube in ("v1.29.0", "v1.34.0"):
        assert [f for f in lint(values, kube_version=kube) if f["severity"] >= 2] == []
    for version in ("1.29.0", "1.34.0"):
        pods = _drill_pods(values, kube_version=f"v{version}")
        assert pods
        for pod in pods.values():
            kubernetes_validate.validate(pod, version, strict=True)
