"""An existing Celery project moved under ``workerkit run celery`` keeps working as it did.

The project is tests/apps/migrating_proj (``proj/celery.py`` with ``config_from_object``,
``include=[...]`` and ``autodiscover_tasks``, ``@shared_task``); the tests run it with real
processes and a private Redis, and compare with what bare ``celery worker`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

from tests.support.harness import (
    REPO,
    WORKERKIT,
    Env,
    Supervisor,
    start_worker,
    stopped_after,
    wait_until,
)
from workerkit import exitcodes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:celery")

APP = "tests.apps.migrating_proj.celery:app"
TASKS = "tests.apps.migrating_proj"


def _env(tmp_path: Path) -> Env:
    return Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")


def _run(
    env: Env, redis_url: str, *, worker_args: tuple[str, ...] = (), **settings: str
) -> contextlib.AbstractContextManager[Supervisor]:
    """``workerkit run celery --app APP -- WORKER_ARGS``, no ``queues`` unless given."""
    return stopped_after(
        start_worker(
            [*WORKERKIT, "run", "celery", "--", *worker_args],
            env,
            app=APP,
            name="supervisor",
            engine={"E2E_REDIS_URL": redis_url, "redis_url": redis_url, "log_level": "info"},
            settings=settings,
            new_session=True,
        )
    )


@pytest.fixture
def producer(redis_url: str) -> Iterator[Any]:
    """The project's own app, as its web process uses it to send tasks and read results.

    Imported here, not at collection: its ``@shared_task``s would join every app finalized in
    this process.
    """
    from tests.apps.migrating_proj.celery import app

    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    yield app
    app.close()


def _send(producer: Any, task: str, *args: Any) -> Any:
    """``task.delay(*args)`` from a producer that has not imported the task's module."""
    return producer.send_task(f"{TASKS}.{task}", args=list(args))


def _stop(sup: Supervisor) -> int:
    sup.signal(signal.SIGTERM)
    return sup.wait_exit(10)[0]


def _check(tmp_path: Path, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    """``workerkit check --engine celery --app APP --format json`` in a fresh process."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    variables.update(env, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [*WORKERKIT, "check", "--engine", "celery", "--app", APP, "--format", "json", *args],
        cwd=tmp_path,
        env=variables,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


# --- item 1: a task's own time_limit -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_tasks_own_time_limit_kills_it_at_that_limit_under_prefork(
    tmp_path: Path, redis_url: str, producer: Any
) -> None:
    env = _env(tmp_path)
    # queues given: this test is about the limit, not about item 3's default queue
    with _run(
        env, redis_url, worker_args=("--pool=prefork",), concurrency="2", queues="celery"
    ) as sup:
        sup.wait_ready()
        result = _send(producer, "billing.tasks.slow_invoice", "inv-1", 6)
        env.wait_line("start inv-1")
        started = time.monotonic()
        with pytest.raises(Exception) as info:  # noqa: PT011 - the class comes back from Redis
            result.get(timeout=15)
        elapsed = time.monotonic() - started
        assert type(info.value).__name__ == "TimeLimitExceeded", info.value
        assert elapsed < 4.0, elapsed  # bare Celery: 2 s; before the fix it ran its 6 s
        time.sleep(1.0)
        assert env.lines() == ["start inv-1"]  # killed, not finished, not re-run
        assert _stop(sup) == 0


def test_the_timing_budget_counts_a_tasks_own_limit(tmp_path: Path) -> None:
    _, report = _check(tmp_path)
    timeouts = {t["name"]: t["timeout"] for t in report["tasks"]}
    assert timeouts[f"{TASKS}.billing.tasks.slow_invoice"] == 2.0


# --- item 2: values the app sets explicitly ----------------------------------------------------


def test_explicit_values_equal_to_celerys_defaults_are_reported_by_check(tmp_path: Path) -> None:
    code, report = _check(tmp_path, PROJ_EXPLICIT_DEFAULTS="1")
    failed = {f["rule_id"]: f["message"] for f in report["findings"] if not f["ok"]}
    assert code == exitcodes.CHECK_FAILED
    assert "task_acks_late = False" in failed["C1"]
    assert "worker_prefetch_multiplier = 4" in failed["C3"]


@pytest.mark.timeout(60)
def test_run_refuses_an_explicit_unsafe_value_instead_of_overriding_it(
    tmp_path: Path, redis_url: str
) -> None:
    env = _env(tmp_path)
    env.extra["PROJ_EXPLICIT_DEFAULTS"] = "1"
    with _run(env, redis_url) as sup:
        code, _ = sup.wait_exit(30)
        assert code == exitcodes.CONFIG_ERROR
        invalid = sup.wait_event("timing_budget_invalid")
        assert "[C1]" in invalid["message"]
        assert "[C3]" in invalid["message"]
        assert not sup.events_named("worker_started")


# --- item 3: the default queue -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_without_queues_the_worker_consumes_celerys_default_queue(
    tmp_path: Path, redis_url: str, producer: Any
) -> None:
    env = _env(tmp_path)
    with _run(env, redis_url, log_level="debug") as sup:
        sup.wait_ready()
        assert _send(producer, "billing.tasks.charge", "inv-2").get(timeout=15) == "charged inv-2"
        assert sup.wait_event("worker_ready_event")["queues"] == ["celery"]
        # item 14: one line says what differs from bare `celery worker`, and what it breaks
        (line,) = sup.events_named("celery_differences")
        assert {"mingle", "gossip", "heartbeat", "task_acks_late"} <= set(line["differences"])
        assert "Flower" in line["message"]
        if (os.cpu_count() or 1) != 1:
            assert line["differences"]["concurrency"].startswith("1 (celery: ")
        assert _stop(sup) == 0


# --- item 4: tasks of include=[...] and autodiscover_tasks() -----------------------------------


def test_check_sees_the_tasks_of_include_and_autodiscover(tmp_path: Path) -> None:
    _, report = _check(tmp_path)
    names = {t["name"] for t in report["tasks"]}
    assert names == {
        f"{TASKS}.billing.tasks.charge",
        f"{TASKS}.billing.tasks.slow_invoice",
        f"{TASKS}.reports.monthly_report",
    }


# --- item 14: task events for `celery events` and Flower ---------------------------------------


@pytest.mark.timeout(60)
def test_with_task_events_a_celery_events_receiver_sees_tasks_and_heartbeats(
    tmp_path: Path, redis_url: str, redis_client: Any, producer: Any
) -> None:
    seen: list[dict[str, Any]] = []
    with producer.connection_for_read() as conn:
        receiver = producer.events.Receiver(conn, handlers={"*": seen.append})
        capture = threading.Thread(
            target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
        )
        capture.start()
        wait_until(
            lambda: redis_client.exists("_kombu.binding.celeryev"),
            timeout=10,
            what="the receiver's queue bound to the events exchange",
        )
        env = _env(tmp_path)
        try:
            with _run(env, redis_url, worker_args=("-E",), queues="celery") as sup:
                sup.wait_ready()
                result = _send(producer, "billing.tasks.charge", "inv-e")
                assert result.get(timeout=15) == "charged inv-e"

                def task_events() -> set[str]:
                    return {e["type"] for e in list(seen) if e.get("uuid") == result.id}

                wait_until(
                    lambda: {"task-received", "task-started", "task-succeeded"} <= task_events(),
                    timeout=10,
                    what=f"the task's events (got {task_events()})",
                )
                wait_until(
                    lambda: any(e["type"] == "worker-heartbeat" for e in list(seen)),
                    timeout=10,
                    what="a worker heartbeat (Flower shows a worker without them offline)",
                )
                assert "heartbeat" not in sup.wait_event("celery_differences")["differences"]
                assert _stop(sup) == 0
        finally:
            receiver.should_stop = True
            capture.join(5)
