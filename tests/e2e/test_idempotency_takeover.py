"""Takeover with real processes: an owner dies (or stalls) holding an idempotency key.

Each worker is a process running tests/support/idempotency_proc.py, which journals what it did; the
tests assert on those journals and on the store's record, on SQLite, PostgreSQL and Redis.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from workerkit.engines.sql import upgrade
from workerkit.idempotency.redis import RedisIdempotencyStore
from workerkit.idempotency.sql import SqlIdempotencyStore

if TYPE_CHECKING:
    from workerkit.idempotency import IdempotencyStore

REPO = Path(__file__).resolve().parents[2]
IP = 1.5  # the owner's in-progress expiry: short, but far above a process's start-up jitter
KEY = "charge:7"


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def spec(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return "redis:" + str(request.getfixturevalue("redis_url"))
    url: str = request.getfixturevalue(f"{request.param}_url")
    upgrade(url)
    return "sql:" + url


@pytest.fixture
def store(spec: str) -> Iterator[IdempotencyStore]:
    kind, _, url = spec.partition(":")
    opened: IdempotencyStore = (
        SqlIdempotencyStore(url) if kind == "sql" else RedisIdempotencyStore.from_url(url)
    )
    try:
        yield opened
    finally:
        opened.close()


class Workers:
    """Worker processes of one test, each stopped by its own pid at the end."""

    def __init__(self, spec: str, tmp: Path) -> None:
        self.spec = spec
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, mode: str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        journal = self.tmp / f"{name}.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.idempotency_proc", self.spec, KEY, str(journal),
             mode, *extra],
            cwd=REPO,
        )  # fmt: skip
        self.procs.append(proc)
        return proc, journal

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # a stopped process too
                proc.wait()


@pytest.fixture
def workers(spec: str, tmp_path: Path) -> Iterator[Workers]:
    made = Workers(spec, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


def events(journal: Path, event: str) -> list[dict[str, Any]]:
    if not journal.exists():
        return []
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["event"] == event]


def wait_for(journal: Path, event: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while not (found := events(journal, event)):
        assert proc.poll() is None, f"{journal.name} exited before {event!r}"
        assert time.monotonic() < deadline, f"{journal.name} never journaled {event!r}"
        time.sleep(0.01)
    return found[0]


def test_a_killed_owners_key_is_taken_over_after_ip_and_its_late_completion_refused(
    workers: Workers, store: IdempotencyStore, tmp_path: Path
) -> None:
    # The successor is started (and imported) first, so that it asks for the key right after the
    # kill, well inside the owner's Ip, whatever the machine's speed.
    go = tmp_path / "go"
    successor, journal = workers.start("successor", "race", "--go", str(go))
    wait_for(journal, "ready", successor)
    owner, owner_journal = workers.start("owner", "hold", "--ip", str(IP))
    running = wait_for(owner_journal, "running", owner)
    dead_token = running["token"]
    owner.send_signal(signal.SIGKILL)
    assert owner.wait(10) == -signal.SIGKILL
    record = store.get(KEY)
    assert record is not None
    assert (record.state, record.owner_token) == ("in_progress", dead_token)

    go.touch()
    assert successor.wait(30) == 0
    assert events(journal, "deferred"), "the successor waited for the dead owner's Ip"
    assert events(journal, "running")
    [returned] = events(journal, "returned")
    assert returned["ran"] is True
    assert returned["result"]["by"] == successor.pid

    record = store.get(KEY)
    assert record is not None
    assert record.state == "completed"
    assert record.takeovers == 1
    assert record.owner_token != dead_token
    # The killed attempt's completion arrives late (a retried request, a replayed message):
    # refused, and the successor's result stands.
    assert not store.complete(KEY, dead_token, '{"by": "the dead"}', retention=60)
    assert not store.forget(KEY, dead_token)
    after = store.get(KEY)
    assert after is not None
    assert after.result_json is not None
    assert json.loads(after.result_json) == returned["result"]


def test_a_stalled_owner_that_wakes_after_a_takeover_cannot_record_its_result(
    workers: Workers, store: IdempotencyStore, tmp_path: Path
) -> None:
    finish, go = tmp_path / "finish", tmp_path / "go"
    successor, journal = workers.start("successor", "race", "--go", str(go))
    wait_for(journal, "ready", successor)
    owner, owner_journal = workers.start("owner", "hold", "--ip", str(IP), "--finish", str(finish))
    wait_for(owner_journal, "running", owner)
    owner.send_signal(signal.SIGSTOP)  # a long GC pause, a frozen VM, a partition

    go.touch()
    assert successor.wait(30) == 0
    assert events(journal, "deferred")
    [returned] = events(journal, "returned")
    assert returned["ran"] is True

    finish.touch()
    owner.send_signal(signal.SIGCONT)
    assert owner.wait(30) == 3
    assert events(owner_journal, "claim_lost")
    assert not events(owner_journal, "returned")
    record = store.get(KEY)
    assert record is not None
    assert record.result_json is not None
    assert json.loads(record.result_json)["by"] == successor.pid
