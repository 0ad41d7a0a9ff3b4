"""drill local's own logic, without processes: the rolling update's arithmetic, the plan of
actions, what a rendered Deployment says, and how flags, manifest and env combine."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from workerkit.drill.local import container_env, plan_local
from workerkit.drill.manifest import read_manifest
from workerkit.drill.rollout import Action, plan_actions, resolve_strategy, store_address
from workerkit.errors import ConfigurationError

PG = "postgresql+psycopg://u@db.example:5432/jobs"


@pytest.mark.parametrize(
    ("replicas", "surge", "unavailable", "expected"),
    [
        (3, 1, 0, (1, 0)),
        (10, "25%", "25%", (3, 2)),  # surge rounds up, unavailable down, as Kubernetes does
        (3, "100%", 0, (3, 0)),
        (1, 0, 1, (0, 1)),
    ],
)
def test_strategy_counts_as_kubernetes_does(
    replicas: int, surge: Any, unavailable: Any, expected: tuple[int, int]
) -> None:
    assert resolve_strategy(replicas, surge, unavailable) == expected


@pytest.mark.parametrize(
    ("surge", "unavailable", "words"),
    [
        (0, 0, "both 0"),
        ("0%", "10%", "both 0"),  # 10% of 3 rounds down to 0
        ("lots", 0, "max-surge 'lots'"),
        (-1, 0, "must not be negative"),
    ],
)
def test_strategy_refusals(surge: Any, unavailable: Any, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        resolve_strategy(3, surge, unavailable)


def test_the_plan_interleaves_the_actions_over_the_window() -> None:
    assert plan_actions(3, 1, 0, 48) == [
        Action("restart", 6.0),
        Action("crash", 18.0),
        Action("restart", 30.0),
        Action("restart", 42.0),
    ]
    kinds = [a.kind for a in plan_actions(2, 2, 1, 50)]
    assert sorted(kinds) == ["crash", "crash", "restart", "restart", "store"]
    assert kinds[0] == "restart"
    assert plan_actions(0, 0, 0, 10) == []


def test_store_addresses() -> None:
    assert store_address(PG) == ("db.example", 5432)
    assert store_address("redis://127.0.0.1/0") == ("127.0.0.1", 6379)
    assert store_address("sqlite:////tmp/q.db") is None


def _deployment(name: str = "rel-workerkit-worker-default", **pod: Any) -> dict[str, Any]:
    container = {
        "name": "worker",
        "args": ["run", "sql", "--app", "proj.tasks:app"],
        "env": [
            {"name": "WORKERKIT_GRACE_PERIOD", "value": "30"},
            {"name": "WORKERKIT_CONCURRENCY", "value": "4"},
            {
                "name": "WORKERKIT_DATABASE_URL",
                "valueFrom": {"secretKeyRef": {"name": "urls", "key": "database-url"}},
            },
        ],
        "lifecycle": {"preStop": {"sleep": {"seconds": 2}}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 4,
            "strategy": {"rollingUpdate": {"maxSurge": "50%", "maxUnavailable": 1}},
            "template": {
                "spec": {"terminationGracePeriodSeconds": 30, "containers": [container], **pod}
            },
        },
    }


def _write(tmp_path: Path, *docs: dict[str, Any]) -> Path:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all([{"kind": "Service", "metadata": {"name": "x"}}, *docs]))
    return path


def test_a_rendered_deployment_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_DATABASE_URL", PG)
    facts = read_manifest(_write(tmp_path, _deployment()))
    assert (facts.replicas, facts.max_surge, facts.max_unavailable) == (4, "50%", 1)
    assert (facts.grace, facts.prestop) == (30.0, 2.0)
    assert (facts.engine, facts.app) == ("sql", "proj.tasks:app")
    assert facts.env["WORKERKIT_DATABASE_URL"] == PG  # the Secret's, from the shell


def test_manifest_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKERKIT_DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="export WORKERKIT_DATABASE_URL"):
        read_manifest(_write(tmp_path, _deployment()))
    monkeypatch.setenv("WORKERKIT_DATABASE_URL", PG)
    two = _write(tmp_path, _deployment("a"), _deployment("b"))
    with pytest.raises(ConfigurationError, match=r"2 Deployments found .*a, b.*--deployment"):
        read_manifest(two)
    assert read_manifest(two, "b").name == "b"
    with pytest.raises(ConfigurationError, match="no Deployment found"):
        read_manifest(_write(tmp_path))


def _options(**given: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "rate": "10/s", "duration": "10s", "mix": "short=90,long=5,flaky=5", "queues": None,
        "long_seconds": "10s", "settle_timeout": "60s", "drill_id": "d1", "app": None,
        "database_url": None, "redis_url": None, "config_file": None, "restarts": 3,
        "crashes": 1, "drill_dir": Path("/tmp/d"),
    }  # fmt: skip
    options.update(given)
    return options


def test_flags_win_over_the_manifest_which_wins_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERKIT_DATABASE_URL", PG)
    manifest = _write(tmp_path, _deployment())
    plan = plan_local("sql", _options(manifest=manifest, replicas=2))
    spec = plan.rollout
    assert (spec.replicas, spec.max_surge, spec.max_unavailable) == (2, "50%", 1)
    assert (spec.grace, spec.prestop) == (30.0, 2.0)
    assert spec.argv[-4:] == ["run", "sql", "--app", "proj.tasks:app"]
    assert spec.env["WORKERKIT_CONCURRENCY"] == "4"
    assert plan.drill.settings.database_url == PG
    assert [a.kind for a in plan.actions] == ["restart", "crash", "restart", "restart"]
    assert plan.warnings == ()


def test_a_grace_period_the_kubelet_does_not_give_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERKIT_DATABASE_URL", PG)
    broken = _deployment(terminationGracePeriodSeconds=3)
    plan = plan_local("sql", _options(manifest=_write(tmp_path, broken)))
    assert plan.rollout.grace == 3.0
    assert plan.rollout.env["WORKERKIT_GRACE_PERIOD"] == "30"
    (warning,) = plan.warnings
    assert "WORKERKIT_GRACE_PERIOD is 30 but the pod's is 3 s" in warning
    # Without a manifest, --grace sets both, as the chart does.
    plain = plan_local("sql", _options(app="p:a", database_url=PG, grace=7))
    assert (plain.rollout.grace, plain.rollout.env["WORKERKIT_GRACE_PERIOD"]) == (7.0, "7")


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"app": None}, "--app MODULE:APP"),
        ({"restart_store": True, "database_url": "sqlite:////tmp/q.db"}, "SQLite"),
        ({"restart_store": True}, "--store-command"),
        ({"env_items": ("NOVALUE",)}, "NAME=VALUE"),
        ({"max_surge": "0", "max_unavailable": "0"}, "both 0"),
    ],
)
def test_plan_refusals(given: dict[str, Any], words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKERKIT_APP", raising=False)
    options = _options(app="p:a", database_url=PG)
    options.update(given)
    with pytest.raises(ConfigurationError, match=words):
        plan_local("sql", options)


def test_sqlite_pods_on_this_one_host_keep_replicas_at_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """All the drill's pods share this host, where SQLite's locks hold: WORKERKIT_REPLICAS is
    left unset for SQLite (rule S1 refuses replicas > 1 on it), set for PostgreSQL."""
    monkeypatch.delenv("WORKERKIT_REPLICAS", raising=False)

    def env(url: str) -> dict[str, str]:
        settings = SimpleNamespace(app="tasks", database_url=url, redis_url="")
        return container_env("sql", settings, None, grace=30, prestop=5, replicas=3, extra={})

    assert "WORKERKIT_REPLICAS" not in env("sqlite:///jobs.db")
    assert env("postgresql://u@h/db")["WORKERKIT_REPLICAS"] == "3"
