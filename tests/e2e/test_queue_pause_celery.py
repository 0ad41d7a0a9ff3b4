"""A queue paused from the dashboard, on a real ``workerkit run celery`` consuming two queues:
the paused queue's tasks wait while the other's run, and run (each exactly once) after the
resume. Asserted from the tasks' own journal; the idle cost of an all-paused worker is measured
in Redis's command count (no busy loop)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.apps.celery_dashboard import app, build_report, send_mail
from tests.support.harness import (
    WORKERKIT,
    Env,
    Supervisor,
    start_worker,
    stopped_after,
    wait_until,
)
from workerkit.engines.celery.dashboard import CeleryDashboardSource, open_source
from workerkit.settings import Settings

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

APP = "tests.apps.celery_dashboard:app"
#: The contract's bound on a pause taking effect (~1-2 s), with a margin for a loaded machine.
PAUSE_TAKES_EFFECT = 4.0


@contextlib.contextmanager
def _worker(env: Env, redis_url: str) -> Iterator[Supervisor]:
    running = start_worker(
        [*WORKERKIT, "run", "celery", "--", "--pool", "solo"],
        env,
        app=APP,
        name="supervisor",
        engine={
            "E2E_REDIS_URL": redis_url,
            "redis_url": redis_url,
            "queues": "mail,reports",
            "log_level": "info",
        },
        settings={},
        new_session=True,
    )
    with stopped_after(running) as pod:
        yield pod


@pytest.fixture
def source(redis_url: str) -> Iterator[CeleryDashboardSource]:
    app.conf.broker_url = redis_url
    made = open_source(Settings(engine="celery", app=APP, redis_url=redis_url))
    yield made
    made.close()


def _ran(env: Env, task: str) -> list[str]:
    return [line.split()[1] for line in env.lines() if line.split()[:1] == [task]]


def _commands(client: redis.Redis[bytes]) -> int:
    return int(client.info("stats")["total_commands_processed"])


def test_a_paused_queue_waits_while_the_other_runs_and_runs_once_after_resume(
    tmp_path: Path, redis_url: str, source: CeleryDashboardSource
) -> None:
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    with _worker(env, redis_url) as pod:
        pod.wait_event("worker_ready", timeout=60)
        send_mail.delay("first")
        wait_until(lambda: _ran(env, "send_mail") == ["first"], timeout=30, what="a first run")
        # Probes sent every 0.1 s while the pause takes hold: the last one that runs was sent
        # at most ~2 s after the pause (no event marks the instant; the probes measure it).
        sent_at: dict[str, float] = {}
        paused_at = time.monotonic()
        source.pause_queue("reports", "alice")
        while time.monotonic() - paused_at < PAUSE_TAKES_EFFECT:
            sent_at[f"p{len(sent_at)}"] = time.monotonic() - paused_at
            build_report.delay(f"p{len(sent_at) - 1}")
            time.sleep(0.1)
        for n in range(3):  # the reports first: without the pause, the worker takes them too
            build_report.delay(f"r{n}")
        for n in range(3):
            send_mail.delay(f"m{n}")
        wait_until(
            lambda: len(_ran(env, "send_mail")) == 4, timeout=30, what="the mail queue to run"
        )
        probes = _ran(env, "build_report")
        assert all(label.startswith("p") for label in probes), probes
        took = max((sent_at[label] for label in probes), default=0.0)
        print(f"pause took effect within {took:.2f} s ({len(probes)} of {len(sent_at)} probes ran)")
        assert took < PAUSE_TAKES_EFFECT - 1.0, (took, probes)
        waiting = [q.waiting for q in source.queues() if q.name == "reports"]
        assert waiting == [3 + len(sent_at) - len(probes)]

        # Every queue paused: the worker idles (a blocking wait a second), no busy loop.
        source.pause_queue("mail", "alice")
        time.sleep(PAUSE_TAKES_EFFECT)
        client = redis.Redis.from_url(redis_url)
        try:
            before, started = _commands(client), time.monotonic()
            time.sleep(5.0)
            rate = (_commands(client) - before) / (time.monotonic() - started)
        finally:
            client.close()
        print(f"all queues paused: {rate:.1f} Redis commands/s (keeper, pause read, idle wait)")
        assert rate < 30, rate

        resumed = time.monotonic()
        source.resume_queue("reports", "alice")
        source.resume_queue("mail", "alice")
        wait_until(
            lambda: len(_ran(env, "build_report")) == 3 + len(sent_at),
            timeout=30,
            what="the reports to run",
        )
        print(f"resume to the last report run: {time.monotonic() - resumed:.2f} s")
        assert [q.waiting for q in source.queues() if q.name == "reports"] == [0]
        pod.signal(signal.SIGTERM)
        assert pod.wait_exit(30)[0] == 0
    assert sorted(_ran(env, "build_report")) == sorted(["r0", "r1", "r2", *sent_at])
    assert sorted(_ran(env, "send_mail")) == ["first", "m0", "m1", "m2"]
