"""What ``workerkit drill local --manifest`` reads from a rendered Deployment.

``helm template``'s output (or ``kubectl get deployment NAME -o yaml``/``-o json``): replicas,
``strategy.rollingUpdate``, ``terminationGracePeriodSeconds``, the preStop sleep, the worker
container's ``args`` and ``env``. The why: the drill must run the values the cluster will run,
not a second copy of them typed by hand; a ``secretKeyRef`` cannot be read here, so its variable
comes from this shell's environment, by the same name, or the drill refuses to start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workerkit.errors import ConfigurationError

__all__ = ("DeploymentFacts", "read_manifest")


@dataclass(frozen=True)
class DeploymentFacts:
    """The parts of one Deployment the local rollout uses (None: the manifest does not say)."""

    name: str
    replicas: int | None = None
    max_surge: int | str | None = None
    max_unavailable: int | str | None = None
    grace: float | None = None
    prestop: float | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def engine(self) -> str | None:
        """ENGINE of ``args`` ``run ENGINE --app APP``."""
        args = list(self.args)
        return args[1] if len(args) > 1 and args[0] == "run" else None

    @property
    def app(self) -> str | None:
        args = list(self.args)
        for flag in ("--app", "-A"):
            if flag in args[:-1]:
                return args[args.index(flag) + 1]
        return None


def _documents(text: str, path: Path) -> list[Any]:
    if text.lstrip().startswith("{"):
        return [json.loads(text)]
    try:
        import yaml  # type: ignore[import-untyped]  # PyYAML ships no types
    except ImportError:
        raise ConfigurationError(
            f"--manifest {path}: reading YAML needs PyYAML (pip install pyyaml); or give JSON "
            "(kubectl get deployment NAME -o json)"
        ) from None
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"--manifest {path}: not YAML: {exc}") from None


def _deployments(documents: Sequence[Any]) -> list[Mapping[str, Any]]:
    found: list[Mapping[str, Any]] = []
    for doc in documents:
        if not isinstance(doc, Mapping):
            continue
        if doc.get("kind") == "List":
            found += _deployments(doc.get("items") or [])
        elif doc.get("kind") == "Deployment":
            found.append(doc)
    return found


def _env(container: Mapping[str, Any], where: str) -> dict[str, str]:
    """The container's env: plain values, and each secretKeyRef from this environment."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = str(item["name"])
        if "value" in item:
            env[name] = str(item["value"])
            continue
        source = item.get("valueFrom") or {}
        ref = source.get("secretKeyRef")
        if ref is not None and name in os.environ:
            env[name] = os.environ[name]
        elif ref is not None and not ref.get("optional"):
            raise ConfigurationError(
                f"--manifest {where}: env {name} comes from Secret {ref.get('name')!r} (key "
                f"{ref.get('key')!r}), which cannot be read here; export {name} in this shell "
                f"with the value the cluster's Secret holds"
            )
    return env


def read_manifest(path: Path, deployment: str | None = None) -> DeploymentFacts:
    """The Deployment of the manifest at ``path`` (``deployment``: its name, needed when the
    manifest has several). ConfigurationError naming the problem otherwise."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"--manifest {path}: {exc.strerror}") from None
    found = _deployments(_documents(text, path))
    names = [str((d.get("metadata") or {}).get("name", "")) for d in found]
    if deployment is not None:
        found = [d for d, n in zip(found, names, strict=True) if n == deployment]
    if len(found) != 1:
        what = "no Deployment" if not found else f"{len(found)} Deployments"
        hint = f" (it has: {', '.join(names)}; pick one with --deployment NAME)" if names else ""
        raise ConfigurationError(f"--manifest {path}: {what} found{hint}")
    doc = found[0]
    name = str(doc["metadata"]["name"])
    spec = doc.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or []
    worker = next((c for c in containers if c.get("name") == "worker"), None)
    container = worker or (containers[0] if containers else {})
    rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    prestop = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep")
    grace = pod.get("terminationGracePeriodSeconds")
    replicas = spec.get("replicas")
    return DeploymentFacts(
        name=name,
        replicas=None if replicas is None else int(replicas),
        max_surge=rolling.get("maxSurge"),
        max_unavailable=rolling.get("maxUnavailable"),
        grace=None if grace is None else float(grace),
        prestop=float(prestop["seconds"]) if prestop else None,
        args=tuple(str(a) for a in container.get("args") or ()),
        env=_env(container, f"{path} ({name})"),
    )
