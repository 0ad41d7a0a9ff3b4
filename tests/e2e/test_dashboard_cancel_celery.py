"""Cancelling, from the dashboard, a Celery message a real worker holds until its eta: the
worker finds its lease gone at its next lease round and drops the message unstarted, so it never
runs at its eta; retried from the failed list, it runs exactly once. Asserted from the task's
own journal and the worker's log."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.apps.celery_dashboard import app, send_mail
from tests.support.harness import (
    WORKERKIT,
    Env,
    Supervisor,
    start_worker,
    stopped_after,
    wait_until,
)
from workerkit.dashboard.model import JobQuery
from workerkit.engines.celery.dashboard import CeleryDashboardSource, open_source
from workerkit.settings import Settings

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

APP = "tests.apps.celery_dashboard:app"
WINDOW = 6.0  # the recovery window: leases renewed every second; a cancel needs eta > now + W


@pytest.fixture
def source(redis_url: str) -> Iterator[CeleryDashboardSource]:
    app.conf.broker_url = redis_url
    settings = Settings(engine="celery", app=APP, redis_url=redis_url, recovery_window=WINDOW)
    made = open_source(settings)
    yield made
    made.close()


@dataclass(frozen=True)
class Held:
    """The eta message a worker holds: its task id and when it is due (epoch seconds)."""

    task_id: str
    eta: float


@contextlib.contextmanager
def holding_an_eta_message(
    env: Env, redis_url: str, source: CeleryDashboardSource
) -> Iterator[tuple[Supervisor, Held, str]]:
    """A real `workerkit run celery` (solo pool) holding one message until its eta, W + 8 s
    away; yields the pod, the message, and its version as the scheduled page shows it."""
    env.extra["WORKERKIT_RECOVERY_WINDOW"] = str(WINDOW)
    running = start_worker(
        [*WORKERKIT, "run", "celery", "--", "--pool", "solo"],
        env,
        app=APP,
        name="supervisor",
        engine={"E2E_REDIS_URL": redis_url, "redis_url": redis_url, "queues": "mail"},
        settings={"log_level": "info"},
        new_session=True,
    )
    with stopped_after(running) as pod:
        pod.wait_event("worker_ready", timeout=60)
        sent = send_mail.apply_async(("late",), countdown=WINDOW + 8)
        late = Held(sent.id, time.time() + WINDOW + 8)

        def held() -> list[str]:
            return [r.version for r in source.jobs(JobQuery(state="scheduled")).rows]

        [version] = wait_until(held, timeout=30, what="the worker to hold the eta message")
        yield pod, late, version


def _ran(env: Env, label: str) -> int:
    return sum(line.split()[:2] == ["send_mail", label] for line in env.lines())


def test_a_held_eta_message_cancelled_never_runs_and_runs_once_when_retried(
    tmp_path: Path, redis_url: str, source: CeleryDashboardSource
) -> None:
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    with holding_an_eta_message(env, redis_url, source) as (pod, late, version):
        source.cancel_waiting(late.task_id, version, "alice")
        lost = pod.wait_event("lease_lost", timeout=30)
        assert lost["job_id"] == late.task_id
        send_mail.delay("after")  # the worker goes on with other work
        wait_until(lambda: _ran(env, "after"), timeout=30, what="the next message to run")
        time.sleep(max(0.0, late.eta + 2.0 - time.time()))  # past its eta: it does not run
        assert _ran(env, "late") == 0
        [failed] = source.jobs(JobQuery(state="failed")).rows
        assert failed.id == late.task_id
        source.retry_failed(late.task_id, failed.version, "alice")
        wait_until(lambda: _ran(env, "late"), timeout=30, what="the retried message to run")
        pod.signal(signal.SIGTERM)
        assert pod.wait_exit(30)[0] == 0
    assert _ran(env, "late") == 1


def test_a_held_eta_message_cancelled_and_retried_at_once_runs_exactly_once(
    tmp_path: Path, redis_url: str, source: CeleryDashboardSource
) -> None:
    """Retried before its worker's next lease round: the copy is another delivery (a new
    delivery tag), so the worker still finds the held message's lease gone and drops it; the
    copy runs now and the held message never runs at its eta."""
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    with holding_an_eta_message(env, redis_url, source) as (pod, late, version):
        source.cancel_waiting(late.task_id, version, "alice")
        [failed] = source.jobs(JobQuery(state="failed")).rows
        source.retry_failed(late.task_id, failed.version, "alice")  # within the lease round
        wait_until(lambda: _ran(env, "late"), timeout=30, what="the retried copy to run")
        lost = pod.wait_event("lease_lost", timeout=30)
        assert lost["job_id"] == late.task_id
        time.sleep(max(0.0, late.eta + 3.0 - time.time()))  # past the held message's eta
        assert _ran(env, "late") == 1
        pod.signal(signal.SIGTERM)
        assert pod.wait_exit(30)[0] == 0
    assert _ran(env, "late") == 1
