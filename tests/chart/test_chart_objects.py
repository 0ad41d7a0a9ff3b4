"""What each part of the chart renders, and the clear refusals: the migrations hook, the
scheduler, autoscalers (KEDA's SQL query run against a real PostgreSQL), scraping, the
NetworkPolicy, the checksum that rolls pods, and every value the chart cannot run without."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from tests.support.helm import (
    CHART_DIR,
    container_env,
    deployments,
    find,
    render,
    render_error,
    render_manifests,
)
from workerkit import Settings
from workerkit.app import App, EnqueueOptions
from workerkit.engines.sql.queue import SqlQueue

SQL_POOL = {"workers": {"default": {"app": "proj.tasks:app"}}}
CPU_REQUEST = {"requests": {"cpu": "250m"}}


def _pool(**pool: Any) -> dict[str, Any]:
    return {"workers": {"default": {"app": "proj.tasks:app", **pool}}}


def _only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = find(objects, kind)
    return obj


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "words"),
    [
        pytest.param({"image": {"repository": ""}}, ["image.repository is empty"], id="image"),
        pytest.param(_pool(app=""), ["workers.default.app is empty", "MODULE:ATTRIBUTE"], id="app"),
        pytest.param(
            _pool(engine="kafka"), ["/workers/default/engine", "'sql', 'rq', 'celery'"], id="engine"
        ),
        pytest.param(
            _pool(hpa={"enabled": True}, keda={"enabled": True, "authenticationRef": "a"}),
            ["workers.default.hpa.enabled and workers.default.keda.enabled are both true"],
            id="hpa-and-keda",
        ),
        pytest.param(
            {**SQL_POOL, "secrets": {"existingSecret": ""}},
            ["secrets.existingSecret is empty", "WORKERKIT_DATABASE_URL", '"database-url"'],
            id="no-secret-sql",
        ),
        pytest.param(
            {
                "secrets": {"existingSecret": ""},
                "workers": {"default": {"engine": "rq", "app": "proj.rq:app"}},
            },
            ["secrets.existingSecret is empty", "workers.default (engine rq)", "REDIS_URL"],
            id="no-secret-rq",
        ),
        pytest.param(
            _pool(keda={"enabled": True}),
            ["workers.default.keda.authenticationRef is empty", "TriggerAuthentication"],
            id="keda-no-auth",
        ),
        pytest.param(
            _pool(keda={"enabled": True, "trigger": "prometheus"}),
            ["workers.default.keda.prometheus.serverAddress", "prometheus.query are required"],
            id="keda-prometheus-no-query",
        ),
        pytest.param(
            {**SQL_POOL, "scheduler": {"enabled": True}},
            ["scheduler.app is empty"],
            id="scheduler-app",
        ),
        pytest.param(
            {**SQL_POOL, "scheduler": {"enabled": True, "app": "p:a", "replicas": 1}},
            [
                "scheduler.pdb.minAvailable is 1 and scheduler.replicas is 1",
                "every node drain would block",
            ],
            id="scheduler-pdb-blocks-drains",
        ),
        pytest.param(
            _pool(engine="celery", keda={"enabled": True, "authenticationRef": "a"}),
            ["workers.default.keda.trigger is auto, but workers.default.queues is empty"],
            id="celery-keda-no-queues",
        ),
        pytest.param(
            _pool(
                engine="rq",
                timing={"jobTimeout": 1200, "gracePeriod": 90, "prestopDelay": 5},
                keda={"enabled": True, "authenticationRef": "a", "minReplicaCount": 0},
            ),
            [
                "workers.default.keda.cooldownPeriod is 300, below the pool's job timeout J (1200)",
                "drain window D = G - P - M (80) = 1280",
                "at least 1280",
            ],
            id="keda-to-zero-mid-job",
        ),
        pytest.param(
            _pool(hpa={"enabled": True}),
            ["workers.default.hpa.enabled, but workers.default.resources.requests.cpu is not set"],
            id="hpa-without-cpu-request",
        ),
        pytest.param(
            _pool(podLabels={"app.kubernetes.io/component": "x"}),
            ['workers.default.podLabels has the label "app.kubernetes.io/component"'],
            id="pod-label-of-the-chart",
        ),
        pytest.param(
            {"commonLabels": {"app.kubernetes.io/name": "x"}},
            ['commonLabels has the label "app.kubernetes.io/name"'],
            id="common-label-of-the-chart",
        ),
        pytest.param({"timing": {"gracePeriod": 30.5}}, ["/timing/gracePeriod"], id="whole-G"),
        pytest.param(_pool(nope=1), ["'nope' not allowed"], id="unknown-key"),
    ],
)
def test_render_refuses_with_a_clear_message(values: dict[str, Any], words: list[str]) -> None:
    message = render_error({**SQL_POOL, **values})
    for word in words:
        assert word in message


# --- the pools ----------------------------------------------------------------------------


def test_a_pool_added_takes_the_defaults_and_false_means_false() -> None:
    objects = render(
        {
            "workers": {
                "default": {"enabled": False},
                "mail": {"engine": "rq", "app": "proj.rq:app", "pdb": {"enabled": False}},
            }
        }
    )
    (deployment,) = find(objects, "Deployment")
    assert deployment["metadata"]["name"] == "rel-workerkit-worker-mail"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert find(objects, "PodDisruptionBudget") == []
    assert find(objects, "Job") == []  # no sql pool: no migrations


def test_env_follows_the_contract_order() -> None:
    values = _pool(queues=["a", "b"], concurrency=3, env=[{"name": "MINE", "value": "1"}])
    values["timing"] = {"visibilityTimeout": 60, "prestopDelay": 2}
    deployment = deployments(render(values))["worker-default"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [v["name"] for v in env] == [
        "WORKERKIT_GRACE_PERIOD",
        "WORKERKIT_PRESTOP_DELAY",
        "WORKERKIT_RELEASE_MARGIN",
        "WORKERKIT_JOB_TIMEOUT",
        "WORKERKIT_CHECKPOINT_INTERVAL",
        "WORKERKIT_IDEMPOTENCY_RETENTION",
        "WORKERKIT_VISIBILITY_TIMEOUT",
        "WORKERKIT_STRICT",
        "WORKERKIT_HTTP_PORT",
        "WORKERKIT_LIVENESS_TIMEOUT",
        "WORKERKIT_STARTUP_TIMEOUT",
        "WORKERKIT_LOG_FORMAT",
        "WORKERKIT_LOG_LEVEL",
        "WORKERKIT_QUEUES",
        "WORKERKIT_CONCURRENCY",
        "WORKERKIT_REPLICAS",
        "WORKERKIT_DATABASE_URL",
        "TMPDIR",
        "MINE",
    ]
    assert container_env(deployment)["WORKERKIT_QUEUES"] == "a,b"


def test_large_whole_numbers_render_as_plain_integers() -> None:
    """Helm reads numbers as float64, whose text is 1.2e+06 from a million on."""
    values = _pool(keda={"enabled": True, "authenticationRef": "a", "cooldownPeriod": 1200000})
    values["timing"] = {"gracePeriod": 1200000, "idempotencyRetention": 1234567.5}
    values["migrations"] = {"activeDeadlineSeconds": 1200000}
    manifests = render_manifests(values)
    objects = render(values)
    deployment = deployments(objects)["worker-default"]
    env = container_env(deployment)
    assert env["WORKERKIT_GRACE_PERIOD"] == "1200000"
    assert env["WORKERKIT_IDEMPOTENCY_RETENTION"] == "1234567.5"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 1200000
    assert _only(objects, "Job")["spec"]["activeDeadlineSeconds"] == 1200000
    assert _only(objects, "ScaledObject")["spec"]["cooldownPeriod"] == 1200000
    notes = manifests["workerkit/templates/NOTES.txt"]
    assert "grace period 1200000 s" in notes
    for text in manifests.values():
        assert "e+0" not in text


def test_keda_to_zero_renders_with_a_cooldown_past_the_longest_job() -> None:
    keda = {"enabled": True, "authenticationRef": "a", "minReplicaCount": 0, "cooldownPeriod": 325}
    values = _pool(engine="rq", keda=keda)  # J 300 + D (30 - 0 - 5) = 325
    assert _only(render(values), "ScaledObject")["spec"]["cooldownPeriod"] == 325
    assert "at least 325" in render_error(_pool(engine="rq", keda={**keda, "cooldownPeriod": 324}))
    # One replica stays: a scale-down drains and releases, nothing is lost; no floor then.
    kept = _pool(engine="rq", keda={**keda, "minReplicaCount": 1, "cooldownPeriod": 30})
    assert _only(render(kept), "ScaledObject")["spec"]["cooldownPeriod"] == 30


def test_every_pdb_lets_unhealthy_pods_be_evicted() -> None:
    values = {**SQL_POOL, "scheduler": {"enabled": True, "app": "p:a"}}
    pdbs = find(render(values), "PodDisruptionBudget")
    assert len(pdbs) == 2
    for pdb in pdbs:
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_a_pool_timing_overrides_the_top_level_block() -> None:
    values = {
        "timing": {"gracePeriod": 40, "prestopDelay": 4},
        "workers": {
            "default": {"app": "proj.tasks:app", "timing": {"gracePeriod": 90, "prestopDelay": 0}},
            "other": {"app": "proj.tasks:app"},
        },
    }
    found = deployments(render(values))
    default, other = found["worker-default"], found["worker-other"]
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    assert container_env(default)["WORKERKIT_PRESTOP_DELAY"] == "0"
    assert "lifecycle" not in default["spec"]["template"]["spec"]["containers"][0]
    assert other["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 40
    assert container_env(other)["WORKERKIT_PRESTOP_DELAY"] == "4"


def test_sql_replicas_setting_is_the_autoscalers_maximum() -> None:
    plain = deployments(render(_pool(replicas=3)))["worker-default"]
    assert container_env(plain)["WORKERKIT_REPLICAS"] == "3"
    scaled = _pool(hpa={"enabled": True, "maxReplicas": 7}, resources=CPU_REQUEST)
    hpa = deployments(render(scaled))["worker-default"]
    assert "replicas" not in hpa["spec"]
    assert container_env(hpa)["WORKERKIT_REPLICAS"] == "7"


def test_a_config_change_changes_the_checksum() -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = deployments(render(values))["worker-default"]
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    base = checksum(SQL_POOL)
    assert checksum(SQL_POOL) == base
    assert checksum({**SQL_POOL, "timing": {"jobTimeout": 600}}) != base
    assert checksum(_pool(app="proj.other:app")) != base
    assert checksum({**SQL_POOL, "image": {"tag": "2"}}) == base  # the image rolls pods itself


def test_long_names_stay_under_63_and_apart() -> None:
    pools = {f"p{i}-{'x' * 37}": {"app": "p:a"} for i in range(2)}  # 40 characters
    objects = render({"fullnameOverride": "x" * 60, "workers": {"default": None, **pools}})
    names = [d["metadata"]["name"] for d in find(objects, "Deployment")]
    assert len(set(names)) == 2
    assert all(len(n) <= 63 for n in names)


# --- migrations and the scheduler ---------------------------------------------------------------


def test_migrations_hook_job() -> None:
    job = _only(render(SQL_POOL), "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 600
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "migrate"
    assert container["args"] == ["db", "upgrade"]
    assert "command" not in container
    url = next(v for v in container["env"] if v["name"] == "WORKERKIT_DATABASE_URL")
    assert url["valueFrom"]["secretKeyRef"]["key"] == "database-url"
    assert find(render({**SQL_POOL, "migrations": {"enabled": False}}), "Job") == []


def test_migrations_env_and_placement() -> None:
    migrations = {
        "env": [{"name": "PROJ_SETTINGS", "value": "prod"}],
        "envFrom": [{"configMapRef": {"name": "proj"}}],
        "nodeSelector": {"pool": "batch"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
    }
    pod = _only(render({**SQL_POOL, "migrations": migrations}), "Job")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["env"][-1] == {"name": "PROJ_SETTINGS", "value": "prod"}
    assert container["envFrom"] == migrations["envFrom"]
    assert pod["nodeSelector"] == {"pool": "batch"}
    assert pod["tolerations"] == migrations["tolerations"]


def test_scheduler_deployment_and_pdb() -> None:
    values = {
        "workers": {"default": {"engine": "rq", "app": "proj.rq:app"}},
        "scheduler": {
            "enabled": True,
            "engine": "sql",
            "app": "proj.tasks:app",
            "timing": {"leaseDuration": 20, "namespace": "proj", "gracePeriod": 20},
        },
    }
    objects = render(values)
    scheduler = deployments(objects)["scheduler"]
    assert scheduler["metadata"]["name"] == "rel-workerkit-scheduler"
    assert scheduler["spec"]["replicas"] == 2
    (container,) = scheduler["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "scheduler"
    assert container["args"] == ["scheduler", "sql", "--app", "proj.tasks:app"]
    env = container_env(scheduler)
    assert env["WORKERKIT_SCHEDULER_LEASE_DURATION"] == "20"
    assert env["WORKERKIT_SCHEDULER_NAMESPACE"] == "proj"
    assert env["WORKERKIT_GRACE_PERIOD"] == "20"
    assert scheduler["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 20
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    pdb = find(objects, "PodDisruptionBudget", "rel-workerkit-scheduler")[0]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "scheduler"
    assert find(objects, "Job")  # the sql scheduler needs the schema: migrations run


# --- autoscaling ----------------------------------------------------------------------------


def test_keda_redis_lists_per_engine() -> None:
    keda = {"enabled": True, "authenticationRef": "redis-auth", "listLength": 5}
    values = {
        "workers": {
            "default": None,
            "c": {
                "engine": "celery",
                "app": "proj",
                "queues": ["reports", "exports"],
                "keda": keda,
            },
            "r": {"engine": "rq", "app": "proj.rq:app", "queues": ["mail"], "keda": keda},
        }
    }
    scaled = {o["metadata"]["name"]: o for o in find(render(values), "ScaledObject")}
    lists = {
        name: [t["metadata"]["listName"] for t in obj["spec"]["triggers"]]
        for name, obj in scaled.items()
    }
    assert lists == {
        "rel-workerkit-worker-c": ["reports", "exports"],
        "rel-workerkit-worker-r": ["rq:queue:mail"],
    }
    trigger = scaled["rel-workerkit-worker-r"]["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listLength"] == "5"
    assert trigger["authenticationRef"] == {"name": "redis-auth"}


def test_keda_sql_query_counts_the_pools_waiting_and_running_jobs(postgres_url: str) -> None:
    values = _pool(queues=["critical", "bulk"], keda={"enabled": True, "authenticationRef": "pg"})
    trigger = _only(render(values), "ScaledObject")["spec"]["triggers"][0]
    assert trigger["type"] == "postgresql"
    assert trigger["authenticationRef"] == {"name": "pg"}
    queue = SqlQueue(postgres_url, settings=Settings())
    app = App(backend=queue)
    try:
        for _ in range(3):
            app.enqueue("t", options=EnqueueOptions(queue="critical"))
        app.enqueue("t", options=EnqueueOptions(queue="bulk"))
        app.enqueue("t", options=EnqueueOptions(queue="other"))
        app.enqueue("t", options=EnqueueOptions(queue="bulk", run_at=time.time() + 3600))
        app.enqueue("t", options=EnqueueOptions(queue="other"))
        assert len(queue.claim(["critical"], "w1", 2)) == 2  # running: still counted
        assert len(queue.claim(["other"], "w1", 1)) == 1  # another pool's: not counted
    finally:
        queue.close()
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            count = conn.execute(sa.text(trigger["metadata"]["query"])).scalar_one()
    finally:
        engine.dispose()
    # Running or due and waiting, in the pool's queues; not the other queue, not later: a
    # pool busy with its last jobs is not scaled down (or to zero) under them.
    assert count == 4


def test_keda_prometheus_trigger() -> None:
    prom = {"serverAddress": "http://prom:9090", "query": "sum(x)", "threshold": 20}
    values = _pool(keda={"enabled": True, "trigger": "prometheus", "prometheus": prom})
    trigger = _only(render(values), "ScaledObject")["spec"]["triggers"][0]
    assert trigger == {
        "type": "prometheus",
        "metadata": {"serverAddress": "http://prom:9090", "query": "sum(x)", "threshold": "20"},
    }


def test_hpa() -> None:
    hpa = {"enabled": True, "minReplicas": 3, "maxReplicas": 9}
    objects = render(_pool(hpa=hpa, resources=CPU_REQUEST))
    hpa = _only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert "replicas" not in deployments(objects)["worker-default"]["spec"]


# --- scraping and the network ---------------------------------------------------------------


def test_no_service_unless_scraping_asks() -> None:
    assert find(render(SQL_POOL), "Service") == []
    monitored = render({**SQL_POOL, "metrics": {"serviceMonitor": {"enabled": True}}})
    service = _only(monitored, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # draining pods stay scraped
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = _only(monitored, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector
    pods = render({**SQL_POOL, "metrics": {"podMonitor": {"enabled": True}}})
    assert find(pods, "Service") == []
    assert _only(pods, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_prometheus_rule_carries_the_charts_alerts() -> None:
    alerts = CHART_DIR / "files" / "alerts.yaml"
    values = {**SQL_POOL, "metrics": {"prometheusRule": {"enabled": True}}}
    rule = _only(render(values), "PrometheusRule")
    data = yaml.safe_load(alerts.read_text())
    groups = (
        data.get("groups", data.get("spec", {}).get("groups")) if isinstance(data, dict) else data
    )
    assert rule["spec"]["groups"] == groups


def test_network_policy_admits_only_the_http_port() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]
    policy = _only(
        render({**SQL_POOL, "networkPolicy": {"enabled": True, "from": peers}}), "NetworkPolicy"
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [
        {"ports": [{"port": "http", "protocol": "TCP"}], "from": peers}
    ]
    assert set(policy["spec"]["podSelector"]["matchLabels"]) == {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
    }
