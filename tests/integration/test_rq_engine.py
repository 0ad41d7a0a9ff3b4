"""The rq engine on a real Redis, in process: allowlist, serializer, release, recovery, fencing.

Workers run in burst mode (``work(burst=True)``) in the test's own process; the multi-process
behaviour (signals, work horses, whole pods killed) is in tests/e2e/test_rq_lifecycle.py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rq import Queue, Retry
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import DefaultSerializer, JSONSerializer
from rq.utils import now, utcformat

import workerkit
from tests.support.harness import gone, wait_until
from tests.support.rq_in_process import rq_worker_in_this_process
from workerkit.engines import leaseguard
from workerkit.engines.rq import RqApp, RqEngine, SimpleWorker, Worker, WorkerkitJob
from workerkit.engines.rq.jobs import read_state
from workerkit.engines.rq.leases import (
    AttemptKeys,
    Leases,
    deferred_key,
    lease_key,
    started_key,
)
from workerkit.engines.rq.recovery import Recovery, lease_ttl
from workerkit.errors import ConfigurationError
from workerkit.idempotency import idempotency_of
from workerkit.idempotency.redis import RedisIdempotencyStore
from workerkit.job import current_job
from workerkit.settings import Settings

if TYPE_CHECKING:
    import redis
    from rq.job import Job

MODULE = __name__
app = RqApp(modules=[MODULE])
calls: list[str] = []
marks: dict[str, float] = {}


@app.task(timeout=120, checkpointed=True, max_attempts=2)
def resumable(start_note: str) -> int:
    job = current_job()
    calls.append(f"{start_note} attempt={job.attempt} checkpoint={job.checkpoint}")
    if job.checkpoint is None:
        job.release(5)
    return int(job.checkpoint) * 2


def add(a: int, b: int) -> int:
    return a + b


def objects_frozen() -> int:
    return gc.get_freeze_count()


def threads_here() -> int:
    """The threads of the process running the job (a work horse's: its lease watchdog's?)."""
    return len(os.listdir("/proc/self/task"))


def end_the_guard() -> int:
    """Kills the lease guard (the worker's child running leaseguard.py) and returns the
    threads here."""
    worker = os.getppid()
    children = Path(f"/proc/{worker}/task/{worker}/children").read_text().split()
    (guard,) = [
        int(pid)
        for pid in children
        if b"leaseguard.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    os.kill(guard, signal.SIGKILL)
    # Gone (or a zombie) before this job ends, so that the worker's next fork finds it ended.
    wait_until(lambda: gone(guard), timeout=10, what="the guard gone")
    return threads_here()


def lease_page() -> mmap.mmap:
    """The worker's lease page, as this work horse inherited it (the memfd of its LeaseClock;
    the one naming this horse: the workers of earlier tests left theirs open here)."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "workerkit-lease" in os.readlink(f"/proc/self/fd/{fd}"):
                page = mmap.mmap(int(fd), mmap.PAGESIZE)
                if struct.unpack_from("q", page, leaseguard.RUNNING)[0] == os.getpid():
                    return page
    raise AssertionError("no lease page in this work horse")


def numb_until_the_guard_kills(marker: str) -> int:
    """The first time: blocks the signals that would start its watchdog or interrupt it, and
    keeps saying the lease is about to expire (as it would be with the worker stopped), so that
    only the lease guard can end it. Then: returns its attempt's number."""
    if not os.path.exists(marker):
        Path(marker).touch()
        signal.pthread_sigmask(
            signal.SIG_BLOCK, {leaseguard.WAKE_SIGNAL, signal.SIGTERM, signal.SIGALRM}
        )
        page = lease_page()
        while True:  # the worker renews meanwhile: this overwrites its deadline
            now_ms = int(time.clock_gettime(leaseguard.CLOCK) * 1000)
            struct.pack_into("q", page, leaseguard.DEADLINE, now_ms)
            time.sleep(0.01)
    return current_job().attempt


def until_released(started_note: str) -> None:
    job = current_job()
    calls.append(started_note)
    while not job.stop_requested:
        time.sleep(0.01)
    marks["stop_requested"] = time.monotonic()
    try:
        time.sleep(30)  # interrupted by the release (JobInterrupted), never finishes
        calls.append("slept on")
    finally:
        marks["interrupted"] = time.monotonic()


@workerkit.idempotent(key="test-rq:charge:{order_id}")
def charge(order_id: int, amount: int) -> dict[str, int]:
    calls.append(f"charge {order_id} {amount}")
    return {"order_id": order_id, "charged": amount}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with rq_worker_in_this_process(monkeypatch):
        calls.clear()
        yield


def settings_for(redis_url: str, **changes: Any) -> Settings:
    return Settings(engine="rq", redis_url=redis_url, app=f"{MODULE}:app", **changes)


def queue(client: redis.Redis[bytes]) -> Queue:
    return Queue("default", connection=client, serializer=JSONSerializer)


def simple_worker(client: redis.Redis[bytes], redis_url: str, **kwargs: Any) -> SimpleWorker:
    return SimpleWorker(
        ["default"], connection=client, app=app, settings=settings_for(redis_url), **kwargs
    )


def test_json_is_the_default_serializer_and_pickle_is_used_only_when_asked_with_a_warning(
    redis_client: redis.Redis[bytes], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert simple_worker(redis_client, redis_url).serializer is JSONSerializer
    with caplog.at_level(logging.WARNING, logger="workerkit.engines.rq"):
        worker = simple_worker(redis_client, redis_url, serializer="pickle")
    assert worker.serializer is DefaultSerializer
    assert [r.event for r in caplog.records] == ["unsafe_serializer"]  # type: ignore[attr-defined]


def test_a_job_naming_a_function_outside_the_allowlist_fails_with_the_reason_never_imported(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    q = queue(redis_client)
    bad = q.enqueue("os.system", "echo pwned", job_id="bad")
    sneaky = q.enqueue(f"{MODULE}.threading", job_id="sneaky")  # imported there, not defined
    good = q.enqueue(f"{MODULE}.add", 2, 3, job_id="good")
    simple_worker(redis_client, redis_url).work(burst=True)

    assert good.get_status() == "finished"
    assert good.return_value() == 5
    failed = FailedJobRegistry("default", connection=redis_client).get_job_ids()
    assert sorted(failed) == ["bad", "sneaky"]
    for job in (bad, sneaky):
        result = job.latest_result()
        assert result is not None
        assert "TaskNotAllowed" in (result.exc_string or ""), result.exc_string
        assert "not allowed" in (result.exc_string or "")


def test_the_allowlist_is_enforced_for_callbacks_and_instance_methods() -> None:
    job_class = WorkerkitJob.bound_to(app)
    with pytest.raises(Exception, match="not allowed"):
        app.resolve("subprocess.run")
    with pytest.raises(Exception, match="not allowed"):
        app.resolve(f"{MODULE}._isolated")
    assert app.resolve(f"{MODULE}.add") is add
    assert job_class.workerkit_app is app


def test_a_job_that_releases_itself_goes_back_to_the_front_with_its_checkpoint_and_attempt(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.resumable", "first", job_id="r")
    q.enqueue(f"{MODULE}.add", 1, 1, job_id="behind")
    worker = simple_worker(redis_client, redis_url)
    worker.work(burst=True, max_jobs=1)

    assert q.get_job_ids() == ["r", "behind"]  # back at the front, ahead of the queued one
    job.refresh()
    assert job.get_status() == "queued"
    assert read_state(redis_client, "r") == {"attempts": 0, "max_attempts": 2, "checkpoint": 5}
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []
    assert redis_client.exists(lease_key("r")) == 0

    worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "finished"
    assert job.return_value() == 10
    assert calls == ["first attempt=1 checkpoint=None", "first attempt=1 checkpoint=5"]
    assert "checkpoint" not in read_state(redis_client, "r")  # dropped when the job completed
    assert redis_client.zcard(started_key("default")) == 0


def test_without_a_supervisor_the_worker_keeps_the_deadlines_itself(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    # D = G - M = 0.6 s: request_stop at D, release at D + M/2 = 1.0 s after the SIGTERM
    # (RQ's work() installs the worker's signal handlers).
    settings = settings_for(redis_url, grace_period=1.4, release_margin=0.8)
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.until_released", "started", job_id="long")
    worker = SimpleWorker(["default"], connection=redis_client, app=app, settings=settings)

    def stop_when_started() -> None:
        while calls != ["started"]:
            time.sleep(0.01)
        marks["sigterm"] = time.monotonic()
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)

    marks.clear()
    threading.Thread(target=stop_when_started, daemon=True).start()
    worker.work(burst=True)

    assert calls == ["started"]  # interrupted by the release, never slept on
    stop_requested = marks["stop_requested"] - marks["sigterm"]
    released = marks["interrupted"] - marks["sigterm"]
    assert 0.6 <= stop_requested < 0.6 + 0.5, marks  # at D (late by the upkeep tick at most)
    assert 1.0 <= released < 1.0 + 0.5, marks  # at D + M/2
    job.refresh()
    assert job.get_status() == "queued"  # back in its queue, attempt given back
    assert read_state(redis_client, "long")["attempts"] == 0
    assert q.get_job_ids() == ["long"]


def checkpoints_until_fenced(tag: str) -> None:
    """Saves a checkpoint every 10 ms until a write is fenced out (LeaseLost), then ends."""
    job = current_job()
    calls.append(tag)
    step = 0
    while True:
        step += 1
        job.save_checkpoint(step)
        time.sleep(0.01)


def test_a_job_that_ends_as_the_release_takes_its_lease_is_released_not_lost(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The release deadline's run -> release transition fences out the job's next checkpoint;
    the job ends (LeaseLost) before the release has marked the attempt ``releasing``. It must
    still be released (requeued, attempt given back), not reported lease_lost and left to
    crash recovery (found in CI: a stubborn job checkpointing every 0.1 s)."""
    calls.clear()
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.checkpoints_until_fenced", "started", job_id="raced")
    worker = simple_worker(redis_client, redis_url)
    leases = worker._wk_leases
    transition = leases.transition

    def transition_then_let_the_job_end_first(*args: Any, **kwargs: Any) -> bool:
        attempt = worker._wk_attempt
        assert attempt is not None
        taken = transition(*args, **kwargs)
        # The job's next checkpoint is fenced out now: it ends (horse_done) before the release
        # marks the attempt `releasing`, and its thread then decides how the attempt ended.
        wait_until(attempt.horse_done.is_set, timeout=10, what="the job to end")
        return taken

    monkeypatch.setattr(leases, "transition", transition_then_let_the_job_end_first)

    def release_when_started() -> None:
        wait_until(lambda: "started" in calls, timeout=10, what="the job to start")
        worker._wk_release_now()

    threading.Thread(target=release_when_started, daemon=True).start()
    with caplog.at_level(logging.INFO):
        worker.work(burst=True)

    finished = [r for r in caplog.records if getattr(r, "event", "") == "job_finished"]
    assert [r.outcome for r in finished] == ["released"]  # type: ignore[attr-defined]
    job.refresh()
    assert job.get_status() == "queued"  # back in its queue, attempt given back
    assert read_state(redis_client, "raced")["attempts"] == 0


def test_a_lost_lease_is_not_renewed_again(
    redis_client: redis.Redis[bytes], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a renewal finds the lease taken, the attempt is stopped and the upkeep asks Redis
    no more (it asked every 50 ms until the job ended)."""
    worker, _job, _keys = started_attempt(redis_client, redis_url, "lost-lease")
    attempt = worker._wk_attempt
    assert attempt is not None
    renewals: list[AttemptKeys] = []
    interrupted: list[object] = []

    def taken_elsewhere(keys: AttemptKeys) -> bool:
        renewals.append(keys)
        return False  # the store's answer when another attempt holds the lease

    monkeypatch.setattr(worker._wk_leases, "renew", taken_elsewhere)
    monkeypatch.setattr(worker, "_wk_interrupt", interrupted.append)
    monkeypatch.setattr(attempt, "renewed_at", lambda: 0.0)  # due long ago

    worker._wk_renew_due()
    assert attempt.lease_lost
    assert interrupted == [attempt]
    assert worker._wk_renew_due() is None
    assert worker._wk_renew_due() is None
    assert len(renewals) == 1


def started_attempt(
    client: redis.Redis[bytes], redis_url: str, job_id: str, *, enqueue: bool = True
) -> tuple[SimpleWorker, Job, AttemptKeys]:
    """An attempt started as a worker starts it (then abandoned: its process 'died')."""
    q = queue(client)
    if enqueue:
        q.enqueue(f"{MODULE}.add", 1, 2, job_id=job_id)
    worker = simple_worker(client, redis_url)
    job = worker.job_class.fetch(q.pop_job_id() or "", connection=client, serializer=JSONSerializer)
    worker.prepare_execution(job)
    assert worker.execution is not None
    return worker, job, AttemptKeys(job_id, worker.execution.id, "default")


def test_an_abandoned_attempt_is_requeued_exactly_once_by_racing_workers_and_never_while_leased(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    worker, _, keys = started_attempt(redis_client, redis_url, "a")
    leases = Leases(redis_client, 10.0)
    assert leases.abandoned("default") == []  # its lease is alive: not abandoned
    assert worker.wk_recover_abandoned() == 0
    assert queue(redis_client).get_job_ids() == []

    redis_client.delete(lease_key("a"))  # the lease expired: the process died
    assert leases.abandoned("default") == [keys]
    results: list[str | None] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        recovery = Recovery(redis_client, leases, worker.job_class, JSONSerializer)
        barrier.wait()
        results.append(recovery.recover(keys, ["none"], "test"))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results.count("retried") == 1
    assert results.count(None) == 7
    assert queue(redis_client).get_job_ids() == ["a"]
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []
    assert redis_client.zcard(started_key("default")) == 0


def test_a_job_whose_worker_keeps_dying_ends_in_the_failed_registry_with_the_reason(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    for attempt in range(3):  # DEFAULT_MAX_ATTEMPTS
        worker, job, _ = started_attempt(redis_client, redis_url, "oom", enqueue=attempt == 0)
        redis_client.delete(lease_key("oom"))
        worker.wk_recover_abandoned()
        redis_client.delete("workerkit:rq:scan:default")  # let the next scan run at once
    job.refresh()
    assert job.get_status() == "failed"
    assert FailedJobRegistry("default", connection=redis_client).get_job_ids() == ["oom"]
    assert "died 3 times" in (job.latest_result().exc_string or "")  # type: ignore[union-attr]
    assert queue(redis_client).get_job_ids() == []


def test_release_in_flight_gives_the_attempt_back_after_a_kill_and_keeps_it_after_a_crash(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    engine = RqEngine([])
    settings = settings_for(redis_url)
    _, job, keys = started_attempt(redis_client, redis_url, "k")
    assert engine.release_in_flight(settings, [keys.ref()], crashed=False) == 1
    assert read_state(redis_client, "k")["attempts"] == 0
    assert engine.release_in_flight(settings, [keys.ref()], crashed=False) == 0  # settled once

    queue(redis_client).remove("k")
    _, job, keys = started_attempt(redis_client, redis_url, "c")
    assert engine.release_in_flight(settings, [keys.ref()], crashed=True) == 1
    job.refresh()
    assert (job.get_status(), read_state(redis_client, "c")["attempts"]) == ("queued", 1)


def test_a_fenced_out_attempt_cannot_write_its_checkpoint_or_renew(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    _, _, keys = started_attempt(redis_client, redis_url, "f")
    leases = Leases(redis_client, 10.0)
    assert leases.renew(keys)
    assert leases.write_state(keys, b"{}")
    redis_client.set(lease_key("f"), "run:someone-else")
    assert not leases.renew(keys)
    assert not leases.write_state(keys, b'{"stale": true}')
    assert not leases.requeue(keys, ["run", "release", "none"], None)


def test_app_timing_lists_the_tasks_and_a_missing_app_is_a_configuration_error(
    redis_url: str,
) -> None:
    timing = RqEngine([]).app_timing(settings_for(redis_url))
    assert [(t.name, t.timeout, t.checkpointed) for t in timing.tasks] == [
        (f"{MODULE}.resumable", 120, True)
    ]
    with pytest.raises(ConfigurationError, match="RqApp"):
        RqEngine([]).app_timing(Settings(engine="rq", redis_url=redis_url))
    with pytest.raises(ConfigurationError, match="--worker-class"):
        RqEngine(["--worker-class", "threads"])
    assert RqEngine(["--worker-class", "simple"]).worker_command(settings_for(redis_url))[-4:] == [
        "--worker-class",
        "simple",
        "--serializer",
        "json",
    ]


def test_the_lease_lives_v_minus_one_scan_so_a_dead_job_is_requeued_within_v(
    redis_url: str,
) -> None:
    assert lease_ttl(settings_for(redis_url, visibility_timeout=10)) == 9.0
    assert lease_ttl(settings_for(redis_url)) == 29.0


def test_the_forking_worker_runs_jobs_in_a_work_horse(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.add", 20, 22, job_id="w")
    Worker(["default"], connection=redis_client, app=app, settings=settings_for(redis_url)).work(
        burst=True
    )
    job.refresh()
    assert job.get_status() == "finished"
    assert job.return_value() == 42
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []
    assert redis_client.exists(lease_key("w")) == 0


def test_a_work_horse_leaves_the_objects_it_inherited_to_its_parent_s_collector(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    # A collection in the horse would write to the headers of the objects it inherited and
    # copy their pages: they are frozen there, not here.
    frozen_here = gc.get_freeze_count()
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.objects_frozen", job_id="frozen")
    Worker(["default"], connection=redis_client, app=app, settings=settings_for(redis_url)).work(
        burst=True
    )
    job.refresh()
    assert job.get_status() == "finished"
    # Every object the worker had at the fork, beyond any this process froze before it.
    assert job.return_value() > frozen_here + 10_000
    assert gc.get_freeze_count() == frozen_here


def test_a_short_jobs_work_horse_starts_no_thread_and_does_again_if_the_guard_has_ended(
    redis_client: redis.Redis[bytes], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Its lease is long: the guard beside the worker would wake its watchdog if it got short. A
    # thread per horse made each of its copy-on-write faults dearer (bench/README.md).
    q = queue(redis_client)
    first = q.enqueue(f"{MODULE}.end_the_guard", job_id="first")
    second = q.enqueue(f"{MODULE}.threads_here", job_id="second")
    worker = Worker(["default"], connection=redis_client, app=app, settings=settings_for(redis_url))
    with caplog.at_level(logging.WARNING, logger="workerkit.engines.rq"):
        worker.work(burst=True)
    for job in (first, second):
        job.refresh()
        assert job.get_status() == "finished", job.latest_result().exc_string
    assert first.return_value() == 1
    # Without the guard, the next horse watches its own lease from its start, as before.
    assert second.return_value() == 2
    assert [r for r in caplog.records if getattr(r, "event", "") == "lease_guard_ended"]
    assert worker._wk_guard is not None
    assert worker._wk_guard.pid is None


def test_a_work_horse_the_lease_guard_killed_is_given_back_not_settled_as_a_crash(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    # The guard killed the horse before the lease expired; the worker, reaping it while the
    # lease is still its own, gives the job back with its attempt, as after its watchdog's stop.
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.numb_until_the_guard_kills", str(tmp_path / "ran"), job_id="numb")
    worker = Worker(["default"], connection=redis_client, app=app, settings=settings_for(redis_url))
    with caplog.at_level(logging.WARNING, logger="workerkit.engines.rq"):
        worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "finished", job.latest_result().exc_string
    assert job.return_value() == 1  # the killed attempt was given back
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "lease_expired_in_horse"]
    assert (record.by, record.status) == ("lease_guard", -signal.SIGKILL)  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if getattr(r, "event", "") == "work_horse_died"]


def hold_key(redis_url: str, order_id: int, amount: int) -> tuple[RedisIdempotencyStore, str, str]:
    """Claim charge's key as a live first run would: (store, key, token)."""
    policy = idempotency_of(charge)
    assert policy is not None
    store = RedisIdempotencyStore.from_url(redis_url)
    key = policy.key_for((order_id, amount), {})
    claim = store.claim(key, policy.fingerprint_for((order_id, amount), {}), in_progress_expiry=60)
    assert claim.owned
    assert claim.token is not None
    return store, key, claim.token


def test_a_duplicate_while_the_first_runs_is_deferred_attempt_kept_then_replays_without_running(
    redis_client: redis.Redis[bytes], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The default store of the rq engine is Redis at redis_url: the worker's settings say so,
    # even when this process's own environment would pick the sql engine.
    store, key, token = hold_key(redis_url, 7, 100)
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.charge", 7, 100, job_id="dup", retry=Retry(max=3))
    worker = Worker(["default"], connection=redis_client, app=app, settings=settings_for(redis_url))
    with caplog.at_level(logging.INFO, logger="workerkit.engines.rq"):
        worker.work(burst=True)

    job.refresh()
    assert calls == []
    assert job.get_status() == "scheduled"  # not failed, not retried: deferred
    assert job.retries_left == 3  # RQ's Retry untouched
    assert read_state(redis_client, "dup")["attempts"] == 0  # the attempt was given back
    assert ScheduledJobRegistry("default", connection=redis_client).get_job_ids() == ["dup"]
    assert FailedJobRegistry("default", connection=redis_client).get_job_ids() == []
    assert StartedJobRegistry("default", connection=redis_client).get_job_ids() == []
    assert redis_client.zcard(started_key("default")) == 0
    assert redis_client.exists(lease_key("dup")) == 0
    run_at = redis_client.zscore(deferred_key("default"), "dup")
    assert run_at is not None
    assert run_at <= time.time() + 2.0  # min(Ip = 60 s, backoff 1-2 s)
    finished = [r for r in caplog.records if getattr(r, "event", "") == "job_finished"]
    assert [r.outcome for r in finished] == ["deferred"]  # type: ignore[attr-defined]

    # Not due yet: stays put. Then the first run completes, and the job comes back when due.
    leases = Leases(redis_client, 10.0)
    assert leases.promote("default", utcformat(now()), now=run_at - 1) == 0
    assert store.complete(key, token, '{"order_id":7,"charged":100}', retention=600)
    assert leases.promote("default", utcformat(now()), now=run_at) == 1
    assert q.get_job_ids() == ["dup"]
    assert redis_client.zcard(deferred_key("default")) == 0

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="workerkit.engines.rq"):
        worker.work(burst=True)
    job.refresh()
    assert calls == []  # replayed, never run
    assert job.get_status() == "finished"
    assert job.return_value() == {"order_id": 7, "charged": 100}
    assert read_state(redis_client, "dup")["attempts"] == 1  # the same as the deferred one
    finished = [r for r in caplog.records if getattr(r, "event", "") == "job_finished"]
    assert [r.outcome for r in finished] == ["skipped_duplicate"]  # type: ignore[attr-defined]
    store.close()


def test_deferred_jobs_are_left_to_rqs_scheduler_when_it_runs_and_come_back_with_the_scan(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    store, _, _ = hold_key(redis_url, 8, 1)
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.charge", 8, 1, job_id="d")
    worker = simple_worker(redis_client, redis_url)
    worker.work(burst=True)
    assert q.get_job_ids() == []
    leases = Leases(redis_client, 10.0)
    far = time.time() + 60
    redis_client.set("rq:scheduler-lock:default", "someone", ex=60)
    assert leases.promote("default", utcformat(now()), now=far) == 0  # RQ's scheduler moves it
    assert q.get_job_ids() == []
    redis_client.delete("rq:scheduler-lock:default")
    time.sleep(2.1)  # the backoff is at most 2 s: due now, and the worker's own scan moves it
    worker.wk_recover_abandoned()
    assert q.get_job_ids() == ["d"]
    assert q.fetch_job("d").get_status() == "queued"  # type: ignore[union-attr]
    store.close()


def test_an_idempotency_key_reused_with_other_arguments_fails_at_once_never_retried(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    q = queue(redis_client)
    first = q.enqueue(f"{MODULE}.charge", 9, 10, job_id="first")
    other = q.enqueue(f"{MODULE}.charge", 9, 20, job_id="other", retry=Retry(max=3))
    simple_worker(redis_client, redis_url).work(burst=True)

    assert first.get_status() == "finished"
    assert calls == ["charge 9 10"]
    assert other.get_status() == "failed"
    assert FailedJobRegistry("default", connection=redis_client).get_job_ids() == ["other"]
    assert ScheduledJobRegistry("default", connection=redis_client).get_job_ids() == []
    result = other.latest_result()
    assert result is not None
    assert "IdempotencyKeyMismatch" in (result.exc_string or "")
    assert "already used with other arguments" in (result.exc_string or "")


def sloppy(a: int) -> int:
    calls.append(f"sloppy {a}")
    return a + "1"  # type: ignore[operator, no-any-return]


def test_arguments_that_do_not_fit_fail_at_once_never_retried_but_a_type_error_inside_is(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    q = queue(redis_client)
    unbound = q.enqueue(f"{MODULE}.add", 1, job_id="unbound", retry=Retry(max=3))
    inside = q.enqueue(f"{MODULE}.sloppy", 1, job_id="inside", retry=Retry(max=1))
    simple_worker(redis_client, redis_url).work(burst=True)

    assert unbound.get_status() == "failed"
    result = unbound.latest_result()
    assert result is not None
    assert "ArgumentsMismatch: add(a, b): missing a required argument: 'b'" in (
        result.exc_string or ""
    )
    assert unbound.retries_left == 3  # not one retry spent
    # A TypeError raised by the task's own body is retried as any other failure.
    assert inside.get_status() == "failed"
    assert calls == ["sloppy 1", "sloppy 1"]


def test_the_settle_fence_works_when_redis_does_not_know_its_script_yet(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    # The hot path sends a bare EVALSHA (no SCRIPT EXISTS round trip); NOSCRIPT falls back.
    redis_client.script_flush()
    q = queue(redis_client)
    job = q.enqueue(f"{MODULE}.add", 1, 2, job_id="s")
    simple_worker(redis_client, redis_url).work(burst=True)
    assert job.get_status() == "finished"
    assert job.return_value() == 3
    assert redis_client.exists(lease_key("s")) == 0


def test_a_work_horses_new_connections_do_not_read_redis_py_s_package_metadata(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py >= 7 builds a DriverInfo (importlib.metadata, ~1 ms) for every connection of a
    # pool made from a URL, so each work horse paid for it once per connection it opened.
    import importlib.metadata

    import redis as redis_lib

    connection = redis_lib.Redis.from_url(redis_url)
    worker = Worker(["default"], connection=connection, app=app, settings=settings_for(redis_url))
    reads: list[str] = []
    real_version = importlib.metadata.version

    def counted(name: str) -> str:
        reads.append(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", counted)
    for client in (worker.connection, worker._wk_redis):
        client.connection_pool.reset()  # what a forked horse's pool does (a new pid)
        assert client.ping()
    assert reads == []
    connection.close()


def test_a_job_logs_workerkit_s_start_and_finish_at_info_not_rq_s_duplicates_of_them(
    redis_client: redis.Redis[bytes], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue(redis_client).enqueue(f"{MODULE}.add", 1, 2, job_id="logged")
    with caplog.at_level(logging.INFO):
        simple_worker(redis_client, redis_url).work(burst=True)
    per_job = [
        r
        for r in caplog.records
        if "logged" in r.getMessage() or getattr(r, "job_id", "") == "logged"
    ]
    events = [getattr(r, "event", r.getMessage()) for r in per_job if r.levelno >= logging.INFO]
    # RQ's own dequeue and "Job OK" lines say what job_started and job_finished say: DEBUG.
    assert events == ["job_started", "job_finished"], events


def test_the_teardown_does_not_wait_for_the_pubsub_thread_s_minute(
    redis_client: redis.Redis[bytes], redis_url: str
) -> None:
    """RQ's pubsub thread, once unsubscribed, waits up to a minute (RQ's ``sleep_time``) for a
    subscription; redis-py 8's ``stop()`` joins it without a bound. The worker's teardown must
    not wait with it: an idle worker stopped by SIGTERM sat there until the supervisor killed
    it (about one stop in five under load, when the thread read the unsubscribe first)."""
    worker = simple_worker(redis_client, redis_url)
    worker.subscribe()
    pubsub = worker.pubsub
    assert pubsub is not None
    wait_until(lambda: bool(pubsub.subscribed), timeout=5, what="the subscription")
    pubsub.unsubscribe()  # read by the thread, which then waits for a subscription
    wait_until(lambda: not pubsub.subscribed, timeout=5, what="the thread to read it")
    started = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - started < 1.0
