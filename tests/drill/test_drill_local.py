"""The "Done means" of #17 item 3: ``workerkit drill local`` on each engine, as a user runs it.

Each test runs the real command (3 replicas of ``workerkit run ENGINE``, 3 rolling restarts, 1
crash, 50 canaries/s for 60 s, 5% long checkpointed canaries) and reads its JSON report, which
the drill computes from the canaries' own records in the store. A good budget: every canary
exactly once, exit 0. A broken one (the kubelet's grace period shorter than the long canaries,
while the worker was told a longer one, so its release never comes before the SIGKILL): the
lost canaries are reported and the exit code is DRILL_FAILED.

A crash (SIGKILL of a whole pod) may kill a worker between a canary's end and its
acknowledgement; the engine delivers it again (at-least-once). The canary is idempotent (its
completion and its "done" mark are one atomic write), so that delivery is recognised and skipped:
the report lists it as ``redelivered``, information, and the drill still passes. Nothing else is
excused: every canary exactly once, exit 0, on every engine.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.support.harness import WORKERKIT
from tests.support.helm import render
from tests.support.redis_db import flushed_db
from workerkit import exitcodes

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

pytestmark = [pytest.mark.drill, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
REDIS_DB = 8

#: The Done-means drill: 3 replicas, 3 rolling restarts, 1 crash, 50/s for 60 s, 5% long. maxSurge
#: 3 (100%): each rollout starts its 3 new pods at once, so that 3 fit in 60 s on a loaded CI
#: machine, where a pod takes ~6 s to be ready; maxUnavailable 0 keeps old pods until then.
DRILL = [
    "--replicas", "3", "--restarts", "3", "--crash", "1", "--seed", "1", "--max-surge", "3",
    "--rate", "50/s", "--duration", "60s", "--mix", "short=95,long=5", "--json",
]  # fmt: skip


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[str]:
    """A database of the session's Redis of our own, flushed around the test."""
    with flushed_db(redis_server, REDIS_DB) as url:
        yield url


def drill_local(engine: str, args: list[str], tmp: Path, **env: str) -> tuple[int, Any, str]:
    """Run ``workerkit drill local ENGINE ARGS``: its exit code, JSON report and stderr."""
    done = subprocess.run(
        [*WORKERKIT, "drill", "local", engine, *DRILL, "--drill-dir", str(tmp / "drill"), *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=280,
        check=False,
    )
    (tmp / "report.json").write_text(done.stdout)  # kept with the pods' logs for a failure
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    return done.returncode, report, done.stderr[-4000:]


def _events(report: dict[str, Any], what: str) -> list[dict[str, Any]]:
    return [e for e in report["rollout"] if e["event"] == what]


def _assert_rolled(report: dict[str, Any]) -> None:
    """The rollout happened as asked: 3 revisions after the first, 1 crash, 12 pods."""
    assert len(_events(report, "rolled out")) == 3, report["rollout"]
    assert len(_events(report, "crashed")) == 1
    assert len({e["pod"] for e in _events(report, "created")}) == 12
    assert {p["hostname"] for p in report["pods"]} <= {e["pod"] for e in report["rollout"]}


def test_sql_drill_every_canary_exactly_once(postgres_url: str, tmp_path: Path) -> None:
    code, report, stderr = drill_local(
        "sql",
        [
            "--app", "tests.apps.sql_jobs:app", "--database-url", postgres_url,
            "--long-seconds", "8s", "--settle-timeout", "40s", "--grace", "6",
            "--env", "WORKERKIT_RELEASE_MARGIN=2", "--env", "WORKERKIT_CHECKPOINT_INTERVAL=1",
            "--env", "WORKERKIT_VISIBILITY_TIMEOUT=5", "--env", "WORKERKIT_CONCURRENCY=10",
        ],
        tmp_path,
    )  # fmt: skip
    _assert_good(code, report, stderr, tmp_path / "drill")
    assert report["counts"]["released"] > 0  # long canaries were handed over at the stops


def _assert_good(code: int, report: Any, stderr: str, drill_dir: Path) -> None:
    """Every canary exactly once, exit 0; a redelivery after completion (a crash between a
    canary's end and its ack) only as a skipped, recorded run."""
    assert report is not None, stderr
    counts = report["counts"]
    problems = (counts, report["lost"], report["twice"], stderr)
    assert (code, report["ok"]) == (exitcodes.OK, True), problems
    assert counts["sent"] == 3000, counts
    assert counts["exactly_once"] == 3000, problems
    assert counts["lost"] == counts["twice"] == 0, problems
    # Each released long canary went on from its checkpoint (how many a rollout catches in hand
    # depends on the machine's speed: none in one loaded CI run of rq, so no lower bound).
    assert counts["resumed"] >= counts["released"], counts
    assert counts["redelivered"] == len(report["redelivered"]), report["redelivered"]
    for again in report["redelivered"]:  # each came back from a completed run's pod
        assert again["completed_on"] is not None, again
    _assert_rolled(report)
    _assert_stopped_in_time(report, drill_dir)


def _assert_stopped_in_time(report: dict[str, Any], drill_dir: Path) -> None:
    """No pod was SIGKILLed at its grace period before its supervisor had stopped. The
    supervisor exits at the grace period's end (D + M = G - P), so on a loaded machine the
    kubelet's SIGKILL may find it a few ms after its last log line: that kill costs nothing."""
    for event in _events(report, "sigkill"):
        log = (drill_dir / "pods" / f"{event['pod']}.log").read_text()
        assert '"event":"supervisor_stopped"' in log, f"{event}: killed while still stopping"


def test_rq_drill_every_canary_exactly_once(redis_db: str, tmp_path: Path) -> None:
    """RQ runs one job at a time per worker: long canaries of 1 s (longer than the drain
    window, 0.8 s) keep 3 workers about busy at 50/s; SimpleWorker, no fork per job."""
    code, report, stderr = drill_local(
        "rq",
        [
            "--app", "tests.apps.rq_jobs:app", "--redis-url", redis_db,
            "--long-seconds", "1s", "--settle-timeout", "60s", "--grace", "2",
            "--env", "WORKERKIT_RELEASE_MARGIN=1.2", "--env", "WORKERKIT_CHECKPOINT_INTERVAL=0.4",
            "--env", "WORKERKIT_VISIBILITY_TIMEOUT=5",
            "--run-arg=--worker-class", "--run-arg=simple",
        ],
        tmp_path,
    )  # fmt: skip
    _assert_good(code, report, stderr, tmp_path / "drill")


def test_celery_drill_every_canary_exactly_once(redis_db: str, tmp_path: Path) -> None:
    code, report, stderr = drill_local(
        "celery",
        [
            "--app", "tests.apps.celery_jobs:app", "--redis-url", redis_db, "--queues", "celery",
            "--long-seconds", "3s", "--settle-timeout", "60s", "--grace", "4",
            "--env", "WORKERKIT_RELEASE_MARGIN=2", "--env", "WORKERKIT_CHECKPOINT_INTERVAL=1",
            "--env", "WORKERKIT_RECOVERY_WINDOW=5", "--env", "WORKERKIT_CONCURRENCY=4",
            "--env", "WORKERKIT_QUEUES=celery", "--run-arg=--", "--run-arg=--pool=prefork",
        ],
        tmp_path,
        E2E_REDIS_URL=redis_db,  # the test app's broker (tests/apps/celery_jobs.py)
    )  # fmt: skip
    _assert_good(code, report, stderr, tmp_path / "drill")


def _broken_manifest(path: Path) -> Path:
    """The chart's Deployment for a sql pool, hand-edited the way a broken budget ships: the
    pod's terminationGracePeriodSeconds cut to 3 s while the worker still reads
    WORKERKIT_GRACE_PERIOD=30. ``workerkit run`` has no switch that skips the timing check's
    errors (only warnings pass, with strict off); its check passes here because it checks the
    30 s the container was told, not the 3 s the kubelet gives: the long canaries (8 s) are
    SIGKILLed mid-run with no release margin at all, and their leases (60 s) outlast the drill."""
    values = {
        "workers": {
            "default": {
                "app": "tests.apps.sql_jobs:app",
                "replicas": 3,
                "concurrency": 10,
                "timing": {"gracePeriod": 30, "releaseMargin": 2, "checkpointInterval": 1,
                           "visibilityTimeout": 60},
            }
        }
    }  # fmt: skip
    (deployment,) = [o for o in render(values) if o["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 3
    path.write_text(yaml.safe_dump(deployment))
    return path


def test_sql_drill_with_a_broken_budget_reports_lost_canaries(
    postgres_url: str, tmp_path: Path
) -> None:
    manifest = _broken_manifest(tmp_path / "deployment.yaml")
    code, report, stderr = drill_local(
        "sql",
        ["--manifest", str(manifest), "--long-seconds", "8s", "--settle-timeout", "10s"],
        tmp_path,
        WORKERKIT_DATABASE_URL=postgres_url,  # the Secret's value, as the operator exports it
    )
    assert "WORKERKIT_GRACE_PERIOD is 30 but the pod's is 3 s" in stderr, stderr
    assert report is not None, stderr
    counts = report["counts"]
    assert code == exitcodes.DRILL_FAILED, (code, counts, stderr)
    assert not report["ok"]
    assert counts["lost"] + counts["twice"] > 0, counts
    assert counts["lost"] == len(report["lost"])
    assert report["by_kind"]["long"]["lost"] > 0
    assert _events(report, "sigkill"), "no pod was killed at the grace period"
    assert {e["pod"].rsplit("-r", 1)[0] for e in _events(report, "created")} == {
        "rel-workerkit-worker-default"
    }
