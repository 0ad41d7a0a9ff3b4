"""The supervisor's side of presence: the record it builds, and whom it sends it to."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from workerkit.engines.presence import PRESENCE_INTERVAL
from workerkit.events import WorkerReady
from workerkit.settings import Settings
from workerkit.supervisor import Supervisor
from workerkit.supervisor.presence import PRESENCE_TTL, WorkerPresence, pod_hostname
from workerkit.timing.deadlines import Deadlines


def test_the_worker_id_is_the_pods_name_the_workers_pid_and_a_random_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTNAME", "worker-7f9c-abcde")
    assert pod_hostname() == "worker-7f9c-abcde"
    first, second = WorkerPresence("sql", 4321, 100.0), WorkerPresence("sql", 4321, 100.0)
    host, pid, random = first.worker_id.split(":")
    assert (host, pid, len(random)) == ("worker-7f9c-abcde", "4321", 8)
    int(random, 16)
    assert first.worker_id != second.worker_id  # the same pid again (a restarted pod) is new


def test_the_engines_own_id_wins_when_its_worker_ready_names_one() -> None:
    presence = WorkerPresence("sql", 1, 100.0, hostname="h")
    presence.worker_ready(WorkerReady("sql", ("a", "b"), 8, "h:1:engine01"))
    assert presence.worker_id == "h:1:engine01"
    # Once ready its records went out under that id: it does not change any more.
    presence.worker_ready(WorkerReady("sql", ("a",), 8, "h:1:other"))
    assert presence.worker_id == "h:1:engine01"
    without = WorkerPresence("rq", 2, 100.0, hostname="h")
    without.worker_ready(WorkerReady("rq", ("q",), None))
    assert without.worker_id.startswith("h:2:")
    assert (without.queues, without.concurrency) == (("q",), 0)


def test_a_ready_record_has_no_deadlines_and_counts_per_queue_and_outcome() -> None:
    presence = WorkerPresence("celery", 9, 1000.0, hostname="pod")
    presence.worker_ready(WorkerReady("celery", ("q", "r"), 4))
    for queue, outcome in [("q", "succeeded"), ("q", "succeeded"), ("r", "failed"), (None, "x")]:
        presence.finished(queue, outcome)
    deadlines = Deadlines.after(50.0, 4.0, 2.0)  # ignored while ready
    record = presence.record("ready", {"j1": {}, "j2": {}}, deadlines, now=60.0, wall=2000.0)
    assert record.state == "ready"
    assert (record.engine, record.queues, record.concurrency) == ("celery", ("q", "r"), 4)
    assert (record.pid, record.hostname, record.started_at) == (9, "pod", 1000.0)
    assert record.jobs == ("j1", "j2")
    assert record.counts == {"q": {"succeeded": 2}, "r": {"failed": 1}, "unknown": {"x": 1}}
    assert (record.drain_deadline, record.hard_deadline) == (None, None)
    assert (record.heartbeat_at, record.ttl) == (2000.0, PRESENCE_TTL)
    assert PRESENCE_TTL == 3 * PRESENCE_INTERVAL
    # A snapshot: later outcomes do not change a record already built.
    presence.finished("q", "succeeded")
    assert record.counts["q"] == {"succeeded": 2}


def test_a_draining_record_carries_the_deadlines_in_epoch_seconds() -> None:
    presence = WorkerPresence("sql", 9, 1000.0, hostname="pod")
    # SIGTERM at monotonic 50 with D = 4, M = 2: request_stop at 54, kill at 55.6.
    deadlines = Deadlines.after(50.0, 4.0, 2.0)
    # Built at monotonic 51, which is epoch 2001.
    for state in ("draining", "releasing"):
        record = presence.record(state, (), deadlines, now=51.0, wall=2001.0)
        assert record.state == state
        assert record.drain_deadline == pytest.approx(2004.0)
        assert record.hard_deadline == pytest.approx(2005.6)
    with pytest.raises(ValueError, match="not a presence state"):
        presence.record("asleep", (), None, now=0.0, wall=0.0)


def test_the_deadlines_of_one_stop_are_the_same_in_every_record() -> None:
    # Two clock readings of the same stop whose differences round apart (2004.0004 -> 2004.0,
    # 2004.0006 -> 2004.001): the epoch deadlines are turned once, at the first record.
    presence = WorkerPresence("sql", 9, 1000.0, hostname="pod")
    deadlines = Deadlines.after(50.0, 4.0, 2.0)
    draining = presence.record("draining", (), deadlines, now=51.0, wall=2001.0004)
    releasing = presence.record("releasing", (), deadlines, now=52.0, wall=2002.0006)
    assert releasing.drain_deadline == draining.drain_deadline == 2004.0
    assert releasing.hard_deadline == draining.hard_deadline


#: A worker main process (its hello names its pid) and another connection of the same pod
#: (another pid): the worker reports a job in hand and three outcomes, then ready (the state
#: change sends the record at once), then writes the first presence command it gets, and
#: whether the other connection got anything, to argv[1].
WORKER = """
import json, os, socket, sys, time
from workerkit.events import *
path = os.environ["WORKERKIT_SUPERVISOR_SOCKET"]
main, other = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
main.connect(path)
other.connect(path)
other.sendall(encode(Hello("executor", pid=os.getpid() + 100000)))
main.sendall(b"".join(encode(e) for e in [
    Hello("worker"),
    JobStarted("j1", "t", "q", 1, {"job_id": "j1"}),
    JobStarted("c", "t", "r", 1, {"job_id": "c", "queue": "r"}),
    JobsFinished((FinishedJob("a", "t", "q", "succeeded", 0.1),
                  FinishedJob("b", "t", "q", "failed", 0.1))),
    JobFinished("c", None, None, "succeeded", 0.1),
    WorkerReady("celery", ("q", "r"), 3),
]))
main.settimeout(10)
data = b""
while b"presence" not in data:
    data += main.recv(65536)
time.sleep(0.3)
other.setblocking(False)
try:
    leaked = other.recv(65536).decode()
except BlockingIOError:
    leaked = ""
line = next(l for l in data.splitlines() if b"presence" in l)
with open(sys.argv[1], "w") as f:
    json.dump({"line": line.decode(), "leaked": leaked, "pid": os.getpid()}, f)
"""


class ScriptedEngine:
    name = "celery"

    def __init__(self, out: Path) -> None:
        self.out = out

    def worker_command(self, settings: Settings) -> list[str]:
        return [sys.executable, "-c", WORKER, str(self.out)]

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        return len(refs)


def test_the_supervisor_sends_the_record_to_the_workers_main_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTNAME", "pod-xyz")
    out = tmp_path / "got.json"
    sup = Supervisor(
        Settings(engine="celery", http_port=0),
        ScriptedEngine(out),  # type: ignore[arg-type]
        handle_signals=False,
    )
    anyio.run(sup.run)
    got = json.loads(out.read_text())
    assert got["leaked"] == ""
    record = json.loads(got["line"])["presence"]
    assert record["worker_id"].startswith(f"pod-xyz:{got['pid']}:")
    assert record["pid"] == got["pid"]
    assert record["state"] == "ready"
    assert (record["engine"], record["queues"], record["concurrency"]) == ("celery", ["q", "r"], 3)
    assert record["jobs"] == ["j1"]
    assert record["counts"] == {"q": {"succeeded": 1, "failed": 1}, "r": {"succeeded": 1}}


class QuickEngine(ScriptedEngine):
    def worker_command(self, settings: Settings) -> list[str]:
        return [sys.executable, "-c", "pass"]


class SchedulerEngine(QuickEngine):
    runs_scheduler = True


@pytest.mark.parametrize(("engine", "kept"), [(QuickEngine, True), (SchedulerEngine, False)])
def test_a_schedulers_supervisor_keeps_no_presence(
    tmp_path: Path, engine: type[QuickEngine], kept: bool
) -> None:
    sup = Supervisor(
        Settings(engine="celery", http_port=0),
        engine(tmp_path),  # type: ignore[arg-type]
        handle_signals=False,
    )
    anyio.run(sup.run)
    assert (sup.presence is not None) is kept
