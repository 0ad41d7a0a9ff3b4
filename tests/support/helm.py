"""The Helm chart (deploy/helm/workerkit) for the tests: render, lint, and read what it renders.

Helm 4's SDK (``helm_python``) renders offline, so no cluster and no helm binary are needed.
:func:`render` returns the rendered objects; :func:`render_error` the message of a render that
fails (a template's ``fail``); :data:`CI_VALUES` lists the values files of the chart's test
matrix (deploy/helm/workerkit/ci/*.yaml). :func:`settings_for` builds the workerkit
:class:`~workerkit.Settings` a rendered container would read, from the same values.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

from workerkit.settings import Settings, load_settings
from workerkit.timing.helm_values import CHART_SCHEDULER_KEYS, CHART_TIMING_KEYS

__all__ = (
    "CHART_DIR",
    "CI_VALUES",
    "RELEASE",
    "container_env",
    "deployments",
    "failed_rule_ids",
    "find",
    "lint",
    "load_ci_values",
    "render",
    "render_error",
    "settings_for",
)

CHART_DIR = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "workerkit"
#: The values files of the chart's test matrix, by file name.
CI_VALUES: tuple[Path, ...] = tuple(sorted((CHART_DIR / "ci").glob("*.yaml")))
#: The release name and namespace every render uses.
RELEASE = "rel"
NAMESPACE = "jobs"

#: Placeholders that every render needs and the tests do not care about.
BASE_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/myapp"},
    "secrets": {"existingSecret": "workerkit-urls"},
}

_RULE_ID = re.compile(r"timing rule \[([A-Z][0-9])\] failed: (.*?) \(")


def load_ci_values(path: Path) -> dict[str, Any]:
    """One values file of the matrix."""
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render_manifests(
    values: Mapping[str, Any] | None = None,
    *,
    base: bool = True,
    kube_version: str | None = None,
    **opts: Any,
) -> dict[str, str]:
    """Template path -> manifest text. ``base`` adds :data:`BASE_VALUES` under ``values``.

    ``kube_version`` (``v1.29.0``) is the cluster version the templates see as
    ``.Capabilities.KubeVersion`` (``helm install`` takes it from the cluster; unset, Helm's
    own default, a recent version). ``Chart.render`` has no parameter for it, but the C library
    under it takes ``kube_version`` in its options, as ``helm template --kube-version`` does.
    """
    merged = _merge(BASE_VALUES, values or {}) if base else dict(values or {})
    opts.setdefault("name", RELEASE)
    opts.setdefault("namespace", NAMESPACE)
    opts.setdefault("is_install", True)
    if kube_version is None:
        return _chart().render(merged, **opts)
    opts["kube_version"] = kube_version
    raw = _native.call_string("helm_render", _chart()._raw(), json.dumps(merged), json.dumps(opts))
    manifests: dict[str, str] = json.loads(raw)
    return manifests


@functools.cache
def _chart() -> helm.Chart:
    """The chart, loaded once per test process (a render then takes milliseconds)."""
    helm.disable_logging()  # lint logs each template `fail` at INFO on stderr
    return helm.Chart.load(CHART_DIR)


def render(values: Mapping[str, Any] | None = None, **opts: Any) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (over :data:`BASE_VALUES`), in order.

    ``opts`` go to ``Chart.render`` (``name``, ``namespace``, ``is_install``, ``is_upgrade``),
    ``kube_version`` sets the cluster's version, and ``base=False`` renders ``values`` alone.
    Raises ``helm_python.errors.HelmRenderError`` when a template fails (its message carries
    the ``fail`` text).
    """
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_manifests(values, **opts).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render_error(values: Mapping[str, Any] | None = None, **opts: Any) -> str:
    """The error message of a render that must fail; AssertionError when it renders."""
    try:
        render_manifests(values, **opts)
    except helm.HelmError as exc:
        return str(exc)
    raise AssertionError(f"the chart rendered with values {values!r}")


def failed_rule_ids(message: str) -> set[str]:
    """The rule ids of a timing failure's lines (``timing rule [G1] failed: ...``)."""
    return {m.group(1) for m in _RULE_ID.finditer(message)}


def lint(values: Mapping[str, Any] | None = None, kube_version: str = "v1.30.0") -> list[Any]:
    """``helm lint --strict``'s findings (``{"severity", "path", "error"}``) for ``values``."""
    merged = _merge(BASE_VALUES, values or {})
    report = helm.lint(CHART_DIR, merged, strict=True, kube_version=kube_version)
    messages: list[Any] = list(report.get("messages") or [])
    messages += [{"severity": 3, "path": "", "error": e} for e in report.get("errors") or []]
    return messages


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """The objects of one kind (and name)."""
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Deployments by component label (``worker-<pool>``, ``scheduler``)."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in find(objects, "Deployment")
    }


def container_env(
    deployment: Mapping[str, Any], secrets: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The first container's env as a mapping; a secretKeyRef reads ``secrets[key]``."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "valueFrom" in var and secrets is not None:
            env[var["name"]] = secrets[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


def settings_for(values: Mapping[str, Any], pool: str | None = "default", **extra: Any) -> Settings:
    """The settings a pool (or the scheduler, ``pool=None``) would run with, from ``values``.

    Built from the values directly (not from a render, which fails on a bad budget): the
    top-level timing, the pool's or scheduler's timing over it, the engine and replicas. The
    database is PostgreSQL: rule S1 needs the URL, which the chart only has as a Secret.
    """
    component = values.get("scheduler", {}) if pool is None else values["workers"][pool]
    timing = {**(values.get("timing") or {}), **(component.get("timing") or {})}
    engine = component.get("engine", "sql")
    cli: dict[str, object] = {"engine": engine}
    keys = {**CHART_TIMING_KEYS, **(CHART_SCHEDULER_KEYS if pool is None else {})}
    for key, value in timing.items():
        if value is not None and key in keys:
            cli[keys[key]] = value
    if engine != "celery":
        cli.pop("max_countdown", None)
    cli["replicas"] = component.get("replicas", 2)
    cli["database_url"] = "postgresql+psycopg://u@db.example/jobs"
    cli.update(extra)
    return load_settings(cli, env={}, cwd=CHART_DIR)
