"""Poison entries in an RQ queue, written straight into Redis: refused with a reason, never a crash.

Real processes (``workerkit run rq``) and a private redis-server. Between good jobs, each kind of
entry nothing but a hand (or a bug) writes: bytes that are not text, an id whose key is not a
hash, an id with no hash at all, and job hashes whose meta, data or RQ's own fields do not
decode. Every good job runs exactly once, every poison entry ends in the failed registry or the
dead-letter list with its reason, and the worker never exits.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.harness import wait_until
from tests.support.redis_db import flushed_db
from tests.support.rq_harness import RqEnv, rq_supervisor
from workerkit import exitcodes
from workerkit.engines.rq.poison import dead_key

if TYPE_CHECKING:
    import redis

    from tests.support.servers import RedisServer

REDIS_DB = 6  # a database of our own on the session's server; flushed around each test
QUEUE_KEY = "rq:queue:default"


@pytest.fixture
def rq_env(redis_server: RedisServer, tmp_path: Path) -> Iterator[RqEnv]:
    with flushed_db(redis_server, REDIS_DB) as url:
        yield RqEnv(tmp=tmp_path, redis_url=url, journal=tmp_path / "journal.txt")


class _RunsCode:
    """Unpickling this runs ``touch MARKER``: proof that a payload was never unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _job_with(env: RqEnv, job_id: str, field: str, value: bytes | None) -> None:
    """A good job, enqueued as RQ does, then one field of its hash overwritten (None: deleted)."""
    env.enqueue("tick", job_id, job_id=job_id)
    client = env.connection()
    if value is None:
        client.hdel(f"rq:job:{job_id}", field)
    else:
        client.hset(f"rq:job:{job_id}", field, value)


def _failure_reason(client: redis.Redis, job_id: str) -> str:
    """The reason of the job's latest failure result (RQ's results stream), as text."""
    entries = client.xrevrange(f"rq:results:{job_id}", count=1)
    assert entries, f"no result for {job_id}"
    fields = entries[0][1]
    assert fields[b"type"] == b"2", fields  # Result.Type.FAILED
    return zlib.decompress(base64.b64decode(fields[b"exc_string"])).decode()


#: Per serializer: what the failures of the two pickled payloads say, and the refusals counted
#: by reason (the dead letters count as undecodable).
PICKLED: dict[str, tuple[str, str, dict[str, int]]] = {
    "json": ("was pickled", "was pickled", {"undecodable": 7, "pickled": 2}),
    "safe-pickle": (
        "cannot be decoded with SafePickleSerializer",
        "'posix.system' refused",
        {"undecodable": 8, "refused_global": 1},
    ),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("worker_class", "serializer"), [("forking", "json"), ("simple", "safe-pickle")]
)
def test_poison_entries_are_failed_or_dead_lettered_and_every_good_job_runs_once(
    rq_env: RqEnv, worker_class: str, serializer: str
) -> None:
    env = rq_env
    client = env.connection()
    marker = env.tmp / "unpickled"
    evil = pickle.dumps(("tests.apps.rq_jobs.tick", None, [_RunsCode(marker)], {}), protocol=5)
    not_text = b"\xff\xfe\x00poison"
    garbage_says, evil_says, counts = PICKLED[serializer]
    # Each poison entry, with what the job's failure reason (or the dead letter's) must say.
    poison: list[tuple[str, Any]] = [
        ("dead", lambda: client.rpush(QUEUE_KEY, not_text)),
        ("dead", lambda: (client.set("rq:job:x", "a string"), client.rpush(QUEUE_KEY, "x"))),
        ("skipped", lambda: client.rpush(QUEUE_KEY, "ghost")),  # no hash: RQ skips it
        ("meta cannot be decoded", lambda: _job_with(env, "bad-meta", "meta", b"\xffnot json")),
        ("meta is list", lambda: _job_with(env, "list-meta", "meta", b"[1, 2]")),
        (garbage_says, lambda: _job_with(env, "bad-data", "data", b"\x80\x04garbage")),
        (evil_says, lambda: _job_with(env, "evil-pickle", "data", evil)),
        ("is not a valid JobStatus", lambda: _job_with(env, "bad-status", "status", b"bogus")),
        ("cannot restore", lambda: _job_with(env, "bad-date", "created_at", b"yesterday")),
        ("it has no data", lambda: _job_with(env, "no-data", "data", None)),
    ]
    failed_ids = [
        *("bad-meta", "list-meta", "bad-data", "evil-pickle", "bad-status", "bad-date", "no-data")
    ]
    env.enqueue("tick", "g0", job_id="g0")
    for index, (_, write) in enumerate(poison, start=1):
        write()
        env.enqueue("tick", f"g{index}", job_id=f"g{index}")
    last = f"g{len(poison)}"
    refusals = [
        f'workerkit_payloads_refused_total{{engine="rq",queue="default",reason="{reason}"}} '
        f"{count:.1f}"
        for reason, count in counts.items()
    ]
    with rq_supervisor(env, worker_class=worker_class, serializer=serializer) as pod:
        pod.wait_ready()
        env.wait_line(f"ran {last} 1", timeout=30)

        def counted() -> bool:
            text = pod.get("/metrics")[1]
            return all(line in text for line in refusals)

        wait_until(counted, timeout=10, what=f"the refusals counted: {counts}")
        assert pod.proc.poll() is None, pod.log_text()  # the worker never exited
        pod.signal(signal.SIGTERM)
        code, _ = pod.wait_exit(10)
    assert code == exitcodes.OK, pod.log_text()
    assert not pod.events_named("worker_crashed"), pod.log_text()
    lines = env.lines()
    ran = sorted(line for line in lines if line.startswith("ran "))
    assert ran == sorted(f"ran g{i} 1" for i in range(len(poison) + 1)), lines
    assert not marker.exists(), "a pickled payload was unpickled"
    assert client.llen(QUEUE_KEY) == 0
    assert sorted(env.failed()) == sorted(failed_ids)
    expected = dict(zip(failed_ids, [what for what, _ in poison[3:]], strict=True))
    for job_id, what in expected.items():
        assert client.hget(f"rq:job:{job_id}", "status") == b"failed", job_id
        reason = _failure_reason(client, job_id)
        assert what in reason, (job_id, reason)
        assert "UndecodableJob" in reason, reason
    refused = {event["job_id"]: event for event in pod.events_named("job_payload_refused")}
    assert sorted(refused) == sorted(failed_ids), refused
    dead = [json.loads(item) for item in client.lrange(dead_key("default"), 0, -1)]
    assert [base64.b64decode(d["entry"]) for d in dead] == [not_text, b"x"], dead
    assert "not UTF-8" in dead[0]["reason"], dead
    assert "rq:job:x is not a hash" in dead[1]["reason"], dead
    assert all(d["queue"] == "default" and d["worker"] and d["at"] for d in dead), dead
    lettered = pod.events_named("queue_entry_dead_lettered")
    assert [event["entry"] for event in lettered] == ["\\xff\\xfe\x00poison", "x"], lettered
    assert all(event["dead_letter_key"] == dead_key("default") for event in lettered), lettered
