"""What a real ``workerkit run celery`` writes: in JSON mode nothing but JSON objects; a job's
release as one INFO line.

The app (tests/apps/celery_logs.py) writes through every channel a real app does: Celery's
banner and task loggers, ``print``, a Python warning, a retry, a failure with a traceback, a
release; then the worker gets SIGTERM with a task in hand.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.celery_harness import celery_supervisor, send
from tests.support.harness import Env, Supervisor, wait_until

LOGS_APP = "tests.apps.celery_logs:app"


def _env(tmp_path: Path) -> Env:
    return Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")


def _records(sup: Supervisor) -> list[dict[str, Any]]:
    """Every line the supervisor, the worker and its pool children wrote, as JSON objects."""
    records, bad = [], []
    for line in sup.log_path.read_text(errors="replace").splitlines():
        if not line.strip():
            bad.append(line)
            continue
        try:
            data = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if isinstance(data, dict):
            records.append(data)
        else:
            bad.append(line)
    assert not bad, "lines that are not JSON objects:\n" + "\n".join(bad[:40])
    return records


def _with(records: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [r for r in records if text in str(r.get("message", ""))]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("pool", "level"), [("prefork", "info"), ("solo", "info"), ("prefork", "debug")]
)
def test_json_mode_writes_only_json_objects(
    tmp_path: Path, redis_url: str, pool: str, level: str
) -> None:
    env = _env(tmp_path)
    with celery_supervisor(
        env, redis_url, worker_args=(f"--pool={pool}",), app=LOGS_APP, log_level=level
    ) as sup:
        sup.wait_ready()
        send(redis_url, "say", "s1", task_id="s1")
        send(redis_url, "warn", "w1", task_id="w1")
        send(redis_url, "flaky", "f1", task_id="f1")
        send(redis_url, "boom", "b1", task_id="b1")
        send(redis_url, "release_once", "r1", task_id="r1")
        for line in ("say s1", "warn w1", "flaky f1 1", "boom b1", "done r1"):
            env.wait_line(line)
        send(redis_url, "sleepy", "z1", 1.0, task_id="z1")
        env.wait_line("start z1")
        sup.signal(signal.SIGTERM)
        code, _ = sup.wait_exit(15)
    assert code == 0, sup.log_text()
    assert env.lines()[-1] == "done z1"  # the task in hand finished in the drain
    records = _records(sup)
    # The original text is kept, in a field of its own record.
    (banner,) = [r for r in records if r.get("event") == "celery_banner"]
    assert "[queues]" in banner["banner"]
    assert ". say" in banner["banner"]
    (said,) = _with(records, "task logger says s1")
    assert (said["logger"], said["task_id"], said["task_name"]) == (
        "tests.apps.celery_logs",
        "s1",
        "say",
    )
    assert _with(records, "printed by say s1")
    assert _with(records, "a warning from task warn w1")[0]["logger"] == "py.warnings"
    assert _with(records, "Retry in")
    failed = [r for r in _with(records, "b1") if "exception" in r]
    assert failed, "the failure's record with its traceback"
    assert "ValueError: boom b1" in failed[0]["exception"]
    assert any(r.get("event") == "supervisor_stopped" for r in records)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_release_is_one_info_line_without_a_traceback(
    tmp_path: Path, redis_url: str, pool: str
) -> None:
    env = _env(tmp_path)
    with celery_supervisor(
        env, redis_url, worker_args=(f"--pool={pool}",), app=LOGS_APP, log_level="info"
    ) as sup:
        sup.wait_ready()
        send(redis_url, "release_once", "r2", task_id="r2")
        env.wait_line("done r2")
        wait_until(
            lambda: any("succeeded" in str(e.get("message")) for e in sup.log_events()),
            timeout=10,
            what="the second run's success line",
        )
    about = [e for e in sup.log_events() if "r2" in json.dumps(e)]
    (released,) = [e for e in about if e.get("event") == "job_released"]
    assert released["level"] == "info"
    assert released["job_id"] == "r2"
    assert [e for e in about if e["level"] not in ("info", "debug")] == [], about
    assert [e for e in about if "exception" in e or "Reject" in str(e.get("message"))] == []
