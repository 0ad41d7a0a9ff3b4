"""An existing RQ app under workerkit's worker, on a real Redis: what bare RQ does keeps working.

Producers on RQ's defaults (pickle) and producers already on JSON, jobs that carry ``meta``, and
jobs that are static or class methods. Workers run in burst mode in the test's own process; the
same under real processes and the supervisor is in tests/e2e/test_rq_lifecycle.py.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rq import Queue, get_current_job
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import DefaultSerializer, JSONSerializer

from tests.support.rq_in_process import rq_worker_in_this_process
from workerkit.engines.rq import RqApp, RqEngine, SimpleWorker, Worker
from workerkit.engines.rq.jobs import read_state
from workerkit.engines.rq.leases import AttemptKeys, lease_key
from workerkit.engines.rq.options import parse_worker_args
from workerkit.errors import ConfigurationError
from workerkit.job import current_job
from workerkit.settings import Settings

if TYPE_CHECKING:
    import redis

MODULE = __name__
app = RqApp(modules=[MODULE])
seen: list[dict[str, Any]] = []


def add(a: Any, b: Any) -> Any:
    return a + b


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


@app.task(checkpointed=True)
def progress(note: str) -> str:
    """Sees its own meta, updates it as RQ apps do, and releases itself once."""
    job = get_current_job()
    assert job is not None
    seen.append(dict(job.meta))
    context = current_job()
    if context.checkpoint is None:
        job.meta["progress"] = "half"
        job.save_meta()
        context.release(1)
    return f"{note} from {context.checkpoint}"


class Reporter:
    """Jobs written as static and class methods, as many RQ apps do."""

    prefix = "report"

    @staticmethod
    def build(n: int) -> str:
        return f"built {n}"

    @classmethod
    def make(cls, n: int) -> str:
        return f"{cls.prefix} {n}"

    system = staticmethod(os.system)  # defined in os: never runnable through the class


class Evil:
    """Unpickling this runs ``os.system``: what a Redis writer could send a pickle worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("WORKERKIT_RQ_SERIALIZER", raising=False)
    with rq_worker_in_this_process(monkeypatch):
        seen.clear()
        yield


def settings_for(redis_url: str) -> Settings:
    return Settings(engine="rq", redis_url=redis_url, app=f"{MODULE}:app")


def json_queue(client: redis.Redis[bytes]) -> Queue:
    return Queue("default", connection=client, serializer=JSONSerializer)


def rq_defaults_queue(client: redis.Redis[bytes]) -> Queue:
    """A producer that never heard of workerkit: RQ's defaults, so pickle."""
    return Queue("default", connection=client)


def worker_of(
    kind: type[Worker] | type[SimpleWorker], client: redis.Redis[bytes], url: str, **kwargs: Any
) -> Worker | SimpleWorker:
    return kind(["default"], connection=client, app=app, settings=settings_for(url), **kwargs)


def exc_string(client: redis.Redis[bytes], job_id: str, serializer: Any = JSONSerializer) -> str:
    job = Job.fetch(job_id, connection=client, serializer=serializer)
    result = job.latest_result()
    assert result is not None
    return result.exc_string or ""


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.job_id, r.reason)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", "") == "job_payload_refused"
    ]


@pytest.mark.parametrize("kind", [Worker, SimpleWorker], ids=["forking", "simple"])
def test_a_pickled_job_with_meta_is_failed_with_the_producer_fix_and_the_worker_goes_on(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    kind: type[Worker] | type[SimpleWorker],
) -> None:
    rq_defaults_queue(redis_client).enqueue(add, 1, 2, job_id="pickled", meta={"owner": "billing"})
    corrupt = json_queue(redis_client).enqueue(f"{MODULE}.add", 0, 0, job_id="corrupt")
    redis_client.hset(corrupt.key, "meta", b"\xff not JSON")
    after = json_queue(redis_client).enqueue(f"{MODULE}.add", 2, 3, job_id="after")
    with caplog.at_level(logging.INFO, logger="workerkit.engines.rq"):
        worker_of(kind, redis_client, redis_url).work(burst=True)

    assert after.get_status() == "finished"  # the worker went on
    assert after.return_value() == 5
    failed = FailedJobRegistry("default", connection=redis_client).get_job_ids()
    assert sorted(failed) == ["corrupt", "pickled"]
    assert refusals(caplog) == [("pickled", "pickled"), ("corrupt", "undecodable")]
    reason = exc_string(redis_client, "pickled", DefaultSerializer)
    assert "UndecodableJob" in reason
    assert "was pickled (RQ's default serializer)" in reason
    assert "Queue(..., serializer=JSONSerializer)" in reason  # the producer-side fix
    assert "--serializer safe-pickle" in reason  # and how to drain what is queued
    assert "its meta cannot be decoded" in exc_string(redis_client, "corrupt")
    pickled = Job.fetch("pickled", connection=redis_client, serializer=DefaultSerializer)
    assert pickled.get_status() == "failed"
    assert pickled.meta == {"owner": "billing"}  # untouched
    assert json_queue(redis_client).get_job_ids() == []
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []
    assert redis_client.exists(lease_key("pickled")) == 0


def test_safe_pickle_drains_a_queue_of_rq_default_producers_and_refuses_every_other_global(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    old = rq_defaults_queue(redis_client)
    old.enqueue(add, 1, 2, job_id="p-add", meta={"owner": "billing"})
    old.enqueue(iso, dt.datetime(2026, 1, 2, tzinfo=dt.UTC), job_id="p-datetime")
    old.enqueue(add, Evil(marker), 1, job_id="p-evil")
    old.enqueue(add, ipaddress.ip_address("10.0.0.1"), 1, job_id="p-outside")
    old.enqueue(Reporter.make, 4, job_id="p-classmethod")  # RQ stores the class and "make"
    json_queue(redis_client).enqueue(f"{MODULE}.add", 2, 3, job_id="j-add")  # already migrated
    with caplog.at_level(logging.INFO, logger="workerkit.engines.rq"):
        worker_of(SimpleWorker, redis_client, redis_url, serializer="safe-pickle").work(burst=True)

    assert not marker.exists()  # os.system was never called
    assert refusals(caplog) == [("p-evil", "refused_global"), ("p-outside", "refused_global")]
    assert "global 'posix.system' refused" in exc_string(redis_client, "p-evil", DefaultSerializer)
    outside = exc_string(redis_client, "p-outside", DefaultSerializer)
    assert "'ipaddress.IPv4Address' refused" in outside
    # Each job is answered in the format it came in: its producer reads its result as before.
    p_add = Job.fetch("p-add", connection=redis_client, serializer=DefaultSerializer)
    assert (p_add.get_status(), p_add.return_value()) == ("finished", 3)
    assert p_add.meta == {"owner": "billing"}
    p_datetime = Job.fetch("p-datetime", connection=redis_client, serializer=DefaultSerializer)
    assert p_datetime.return_value() == "2026-01-02T00:00:00+00:00"
    p_class = Job.fetch("p-classmethod", connection=redis_client, serializer=DefaultSerializer)
    assert p_class.return_value() == "report 4"
    j_add = Job.fetch("j-add", connection=redis_client, serializer=JSONSerializer)
    assert (j_add.get_status(), j_add.return_value()) == ("finished", 5)


def test_the_serializer_is_a_setting_with_a_variable_and_a_wrong_name_is_refused(
    redis_client: redis.Redis[bytes], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse_worker_args([]).serializer == "json"
    monkeypatch.setenv("WORKERKIT_RQ_SERIALIZER", "safe-pickle")
    assert parse_worker_args([]).serializer == "safe-pickle"
    assert parse_worker_args(["--serializer", "json"]).serializer == "json"  # the option wins
    worker = worker_of(SimpleWorker, redis_client, redis_url)  # `rq worker --worker-class`
    assert worker.serializer.loads(worker.serializer.dumps({"a": 1})) == {"a": 1}
    assert worker.serializer.__name__ == "SafePickleSerializer"
    monkeypatch.setenv("WORKERKIT_RQ_SERIALIZER", "yaml")
    with pytest.raises(ConfigurationError, match="WORKERKIT_RQ_SERIALIZER='yaml'"):
        RqEngine([])


def test_static_and_class_methods_of_an_allowed_module_run_and_borrowed_ones_are_refused(
    redis_client: redis.Redis[bytes], redis_url: str, tmp_path: Path
) -> None:
    q = json_queue(redis_client)
    q.enqueue(Reporter.build, 2, job_id="static")
    q.enqueue(f"{MODULE}.Reporter.make", 3, job_id="class-by-name")
    q.enqueue(f"{MODULE}.Reporter.system", f"touch {tmp_path / 'pwned'}", job_id="borrowed")
    assert OrderedDict.__module__ == "collections"  # imported here: not runnable through MODULE
    q.enqueue(f"{MODULE}.OrderedDict.fromkeys", [1], job_id="imported-class")
    q.enqueue(f"{MODULE}.Reporter.__init_subclass__", job_id="private")
    q.enqueue("os.path.join", "a", job_id="outside")
    worker_of(SimpleWorker, redis_client, redis_url).work(burst=True)

    for job_id, expected in [("static", "built 2"), ("class-by-name", "report 3")]:
        job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
        assert job.get_status() == "finished", exc_string(redis_client, job_id)
        assert job.return_value() == expected
    assert not (tmp_path / "pwned").exists()
    failed = FailedJobRegistry("default", connection=redis_client).get_job_ids()
    assert sorted(failed) == ["borrowed", "imported-class", "outside", "private"]
    assert "defines no function 'Reporter.system'" in exc_string(redis_client, "borrowed")
    assert "defines no class 'OrderedDict'" in exc_string(redis_client, "imported-class")
    assert "not a public name" in exc_string(redis_client, "private")
    assert "is not allowed" in exc_string(redis_client, "outside")


def test_user_meta_round_trips_unchanged_through_release_resume_crash_and_recovery(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    q = json_queue(redis_client)
    job = q.enqueue(f"{MODULE}.progress", "p", job_id="m", meta={"owner": "billing"})
    worker = worker_of(SimpleWorker, redis_client, redis_url)
    worker.work(burst=True, max_jobs=1)  # released itself with checkpoint 1
    job.refresh()
    assert job.meta == {"owner": "billing", "progress": "half"}
    assert read_state(redis_client, "m") == {"attempts": 0, "max_attempts": 3, "checkpoint": 1}

    worker.work(burst=True)
    job.refresh()
    assert job.return_value() == "p from 1"
    assert seen == [{"owner": "billing"}, {"owner": "billing", "progress": "half"}]
    assert job.meta == {"owner": "billing", "progress": "half"}
    assert read_state(redis_client, "m") == {"attempts": 1, "max_attempts": 3}

    # An attempt started and then abandoned (its process died), released by the supervisor.
    crashed = q.enqueue(f"{MODULE}.add", 1, 2, job_id="c", meta={"owner": "ops"})
    fetched = worker.job_class.fetch(
        q.pop_job_id() or "", connection=redis_client, serializer=JSONSerializer
    )
    worker.prepare_execution(fetched)
    assert worker.execution is not None
    keys = AttemptKeys("c", worker.execution.id, "default")
    assert RqEngine([]).release_in_flight(settings_for(redis_url), [keys.ref()], crashed=True)
    crashed.refresh()
    assert (crashed.get_status(), crashed.meta) == ("queued", {"owner": "ops"})
    assert read_state(redis_client, "c")["attempts"] == 1


def test_the_state_an_older_worker_kept_in_meta_is_moved_out_and_its_checkpoint_resumed(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    legacy = {"attempts": 0, "max_attempts": 3, "checkpoint": 7}
    meta = {"owner": "billing", "workerkit": legacy}
    job = json_queue(redis_client).enqueue(f"{MODULE}.progress", "p", job_id="old", meta=meta)
    worker_of(SimpleWorker, redis_client, redis_url).work(burst=True)
    job.refresh()
    assert job.return_value() == "p from 7"
    assert seen == [{"owner": "billing"}]
    assert job.meta == {"owner": "billing"}
    assert read_state(redis_client, "old") == {"attempts": 1, "max_attempts": 3}
