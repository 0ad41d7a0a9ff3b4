"""The Celery engine's batched per-task events: what one write to the supervisor carries."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from workerkit.engines.celery.task_events import Pending, TaskEvents, encode_batch
from workerkit.events import BadMessage, EventClient, decode


def started(job_id: str) -> Pending:
    return ("job_started", 1.0, {"job_id": job_id, "task": "t", "queue": "q", "attempt": 1})


def finished(job_id: str, outcome: str = "succeeded") -> Pending:
    fields = {"job_id": job_id, "task": "t", "queue": "q", "outcome": outcome, "duration": 0.5}
    return ("job_finished", 2.0, fields)


def lines(batch: list[Pending]) -> list[dict[str, Any]]:
    data = encode_batch(7, batch)
    assert data.endswith(b"\n")
    # The wire format, and that the supervisor's decoder accepts every line of it.
    out = [json.loads(line) for line in data.splitlines()]
    assert not [line for line in data.splitlines() if isinstance(decode(line), BadMessage)]
    assert all(m["pid"] == 7 for m in out)
    return out


def test_jobs_that_started_and_succeeded_in_one_batch_are_one_jobs_finished_line() -> None:
    out = lines([started("a"), finished("a"), started("b"), finished("b")])
    assert [m["type"] for m in out] == ["jobs_finished"]
    assert out[0]["jobs"] == [["a", "t", "q", "succeeded", 0.5], ["b", "t", "q", "succeeded", 0.5]]


def test_a_start_is_kept_when_its_job_is_still_running_or_did_not_succeed() -> None:
    out = lines([started("a"), finished("a", "released"), started("b")])
    assert [m["type"] for m in out] == ["job_started", "jobs_finished", "job_started"]
    assert [out[0]["job_id"], out[2]["job_id"]] == ["a", "b"]


def test_only_consecutive_finishes_merge_so_the_order_of_a_job_is_kept() -> None:
    # Released, then redelivered and started again within one batch: the finish of the first
    # run must reach the supervisor before the start of the second.
    out = lines([started("a"), finished("a", "released"), started("a"), finished("x")])
    assert [m["type"] for m in out] == [
        "job_started",
        "jobs_finished",
        "job_started",
        "jobs_finished",
    ]
    assert out[1]["jobs"] == [["a", "t", "q", "released", 0.5]]


def test_the_sender_writes_what_gathered_as_the_supervisor_reads_it(tmp_path: Path) -> None:
    # The supervisor's end of the channel: a Unix socket whose lines we decode.
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        client = EventClient(path, role="celery-executor")
        conn, _ = server.accept()
        sender = TaskEvents(client)
        sender.send("job_started", **started("a")[2])  # an idle worker's: written at once
        sender.send("job_finished", **finished("a")[2])
        sender.send("job_started", **started("b")[2])
        sender.flush()
        client.close()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
    assert not [line for line in data.splitlines() if isinstance(decode(line), BadMessage)]
    out = [json.loads(line) for line in data.splitlines()]
    # An idle worker's first event at once; then what gathered (or, on a slow machine, each
    # event alone): the same lines either way.
    assert [(m["type"], m.get("job_id")) for m in out] == [
        ("hello", None),
        ("job_started", "a"),
        ("jobs_finished", None),
        ("job_started", "b"),
    ]
    assert out[2]["jobs"] == [["a", "t", "q", "succeeded", 0.5]]
    assert all(m["pid"] == sender.pid for m in out)
