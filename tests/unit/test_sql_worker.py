"""The native worker loop on the in-memory queue: outcomes, drain, stop requests, release."""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.native_worker import Harness, wait_until
from workerkit.engines.base import NewJob
from workerkit.engines.sql.slots import IDLE_NAME
from workerkit.engines.sql.worker import NativeWorker
from workerkit.events import (
    CheckpointSaved,
    Heartbeat,
    JobStarted,
    StoreHealth,
    WorkerReady,
)
from workerkit.job import current_job


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    if h.worker is not None and h.thread is not None and h.thread.is_alive():
        h.worker.request_release()
        h.thread.join(5)
    assert not h.events.bad(), "the supervisor would log these as channel_bad_event"


def test_runs_each_job_once_and_drains_on_stop(harness: Harness) -> None:
    @harness.app.task
    def record(n: int) -> int:
        harness.log.append(f"ran {n}")
        return n * 2

    ids = [record.enqueue(n) for n in range(5)]
    worker = harness.start()
    wait_until(lambda: all(harness.state(i) == "succeeded" for i in ids))
    worker.stop_fetching()
    assert harness.join() == 0
    assert sorted(harness.log) == [f"ran {n}" for n in range(5)]
    assert [harness.queue.get_job(i)["result"] for i in ids] == [0, 2, 4, 6, 8]  # type: ignore[index]
    assert harness.outcomes() == ["succeeded"] * 5
    started = harness.events.of_type(JobStarted)
    assert {e.job_id for e in started} == set(ids)
    assert all(e.delivery and e.delivery["token"] for e in started)
    assert harness.events.of_type(WorkerReady)


def test_a_failing_job_is_retried_with_backoff_then_succeeds(harness: Harness) -> None:
    @harness.app.task(max_attempts=3, retry_backoff=0.01)
    def flaky() -> str:
        attempt = current_job().attempt
        harness.log.append(f"attempt {attempt}")
        if attempt == 1:
            raise ConnectionError("gateway timed out")
        return "ok"

    job_id = flaky.enqueue()
    harness.start()
    wait_until(lambda: harness.state(job_id) == "succeeded")
    assert harness.log == ["attempt 1", "attempt 2"]
    assert harness.outcomes() == ["retried", "succeeded"]


def test_a_job_failing_every_attempt_ends_failed_with_its_error(harness: Harness) -> None:
    @harness.app.task(max_attempts=2, retry_backoff=0.01)
    def broken() -> None:
        harness.log.append("ran")
        raise ValueError("bad row 17")

    job_id = broken.enqueue()
    harness.start()
    wait_until(lambda: harness.state(job_id) == "failed")
    job = harness.queue.get_job(job_id)
    assert job is not None
    assert "ValueError: bad row 17" in job["last_error"]
    assert harness.log == ["ran", "ran"]
    assert harness.outcomes() == ["retried", "failed"]


def test_unknown_task_and_bad_payload_fail_with_reason_and_the_worker_goes_on(
    harness: Harness,
) -> None:
    @harness.app.task
    def fine() -> None:
        harness.log.append("fine")

    harness.queue.enqueue(NewJob("ghost", "no.such.task", "default", '{"args":[]}', 3))
    harness.queue.enqueue(NewJob("garbled", fine.name, "default", "{not json", 3))
    good = fine.enqueue()
    harness.start()
    wait_until(lambda: harness.state(good) == "succeeded")
    wait_until(lambda: harness.state("ghost") == "failed" and harness.state("garbled") == "failed")
    ghost, garbled = harness.queue.get_job("ghost"), harness.queue.get_job("garbled")
    assert ghost is not None
    assert garbled is not None
    assert "UnknownTask" in ghost["last_error"]
    assert "no.such.task" in ghost["last_error"]
    assert "PayloadError" in garbled["last_error"]
    assert ghost["attempts"] == 1  # failed for good at once, not retried
    assert harness.log == ["fine"]


def test_arguments_that_do_not_fit_and_a_deep_payload_fail_at_attempt_1_with_the_reason(
    harness: Harness,
) -> None:
    @harness.app.task(max_attempts=3, retry_backoff=0.01)
    def add(x: int, y: int) -> int:
        harness.log.append("add")
        return x + y

    deep = '{"args":[' + "[" * 100_000 + "]" * 100_000 + '],"kwargs":{}}'
    harness.queue.enqueue(NewJob("unbound", add.name, "default", '{"args":[1],"kwargs":{}}', 3))
    harness.queue.enqueue(NewJob("deep", add.name, "default", deep, 3))
    good = add.enqueue(1, 2)
    harness.start()
    wait_until(lambda: harness.state(good) == "succeeded")
    wait_until(lambda: harness.state("unbound") == "failed" and harness.state("deep") == "failed")
    unbound, too_deep = harness.queue.get_job("unbound"), harness.queue.get_job("deep")
    assert unbound is not None
    assert too_deep is not None
    assert unbound["attempts"] == too_deep["attempts"] == 1  # not retried
    assert "ArgumentsMismatch: " in unbound["last_error"]
    assert "missing a required argument: 'y'" in unbound["last_error"]
    assert "nested too deeply" in too_deep["last_error"]
    assert harness.log == ["add"]  # the body ran only for the good job


def test_a_type_error_inside_the_tasks_body_is_retried_as_before(harness: Harness) -> None:
    @harness.app.task(max_attempts=2, retry_backoff=0.01)
    def sloppy(x: int) -> int:
        harness.log.append("ran")
        return x + "1"  # type: ignore[operator]

    job_id = sloppy.enqueue(1)
    harness.start()
    wait_until(lambda: harness.state(job_id) == "failed")
    job = harness.queue.get_job(job_id)
    assert job is not None
    assert job["attempts"] == 2
    assert "TypeError" in job["last_error"]
    assert harness.log == ["ran", "ran"]


def test_stop_fetching_lets_the_job_in_hand_finish_and_starts_no_other(harness: Harness) -> None:
    started = threading.Event()
    finish = threading.Event()

    @harness.app.task
    def slow(n: int) -> None:
        harness.log.append(f"start {n}")
        started.set()
        finish.wait(10)
        harness.log.append(f"done {n}")

    first = slow.enqueue(1)
    second = slow.enqueue(2)
    worker = harness.start()
    assert started.wait(5)
    worker.stop_fetching()
    finish.set()
    assert harness.join() == 0
    assert harness.log == ["start 1", "done 1"]
    assert harness.state(first) == "succeeded"
    assert harness.state(second) == "ready"


def test_cooperative_job_saves_checkpoint_and_releases_on_request_stop(harness: Harness) -> None:
    @harness.app.task
    def cursor(items: int) -> int:
        job = current_job()
        position = (job.checkpoint or {}).get("next", 0)
        harness.log.append(f"attempt {job.attempt} from {position}")
        while position < items:
            if job.stop_requested:
                job.release({"next": position})
            position += 1
            job.save_checkpoint({"next": position})
            time.sleep(0.005)
        return position

    job_id = cursor.enqueue(100_000)
    worker = harness.start()
    wait_until(lambda: harness.events.of_type(CheckpointSaved) != [])
    worker.stop_fetching()
    harness.events.command("request_stop")
    assert harness.join() == 0
    job = harness.queue.get_job(job_id)
    assert job is not None
    assert job["state"] == "ready"
    assert job["attempts"] == 0  # the release gave the attempt back
    assert job["checkpoint"]["next"] > 0
    assert harness.outcomes() == ["released"]


def test_stubborn_job_is_released_by_the_release_command(harness: Harness) -> None:
    started = threading.Event()

    @harness.app.task
    def stubborn() -> None:
        started.set()
        current_job().save_checkpoint({"step": 1}, force=True)
        time.sleep(30)  # ignores stop requests; only the release command ends this attempt

    job_id = stubborn.enqueue()
    worker = harness.start()
    assert started.wait(5)
    worker.stop_fetching()
    harness.events.command("request_stop")
    began = time.monotonic()
    harness.events.command("release")
    assert harness.join() == 0
    assert time.monotonic() - began < 5
    job = harness.queue.get_job(job_id)
    assert job is not None
    assert (job["state"], job["attempts"], job["checkpoint"]) == ("ready", 0, {"step": 1})
    assert harness.outcomes() == ["released"]


def test_a_job_over_its_timeout_is_timed_out_and_retried(harness: Harness) -> None:
    @harness.app.task(timeout=0.2, max_attempts=2, retry_backoff=0.01)
    def hangs() -> None:
        harness.log.append(f"attempt {current_job().attempt}")
        if current_job().attempt == 1:
            time.sleep(3)

    job_id = hangs.enqueue()
    harness.start()
    wait_until(lambda: harness.state(job_id) == "succeeded")
    assert harness.outcomes() == ["timed_out", "succeeded"]
    job = harness.queue.get_job(job_id)
    assert job is not None
    assert job["attempts"] == 2


@pytest.fixture
def idle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The main thread goes to its idle wait at once, and a missed wake-up would leave it there
    for an hour: only a wake-up can make these tests pass."""
    from workerkit.engines.sql import worker as worker_module

    monkeypatch.setattr(worker_module, "IDLE_AFTER", 0.0)
    monkeypatch.setattr(worker_module, "IDLE_WAIT", 3600.0)


def wait_for_idle_wait(worker: NativeWorker) -> None:
    wait_until(lambda: worker._main_idle)


@pytest.mark.usefixtures("idle_at_once")
def test_a_job_begun_during_the_idle_wait_wakes_the_main_thread_for_its_timeout(
    harness: Harness,
) -> None:
    """The main thread enforces timeouts: a job that starts while it waits idle wakes it."""

    @harness.app.task(timeout=0.2, max_attempts=1)
    def hangs() -> None:
        time.sleep(3)

    worker = harness.start()
    wait_for_idle_wait(worker)
    job_id = hangs.enqueue()
    wait_until(lambda: harness.state(job_id) == "failed")
    assert harness.outcomes() == ["timed_out"]


@pytest.mark.usefixtures("idle_at_once")
@pytest.mark.parametrize("how", ["stop_fetching", "request_release", "sigterm"])
def test_a_stop_or_a_release_ends_the_idle_wait_at_once(harness: Harness, how: str) -> None:
    worker = harness.start()
    wait_for_idle_wait(worker)
    if how == "sigterm":
        worker._on_sigterm(15, None)  # the handler: flags and a byte on the pipe
    else:
        getattr(worker, how)()
    assert harness.join(timeout=10.0) == 0


def test_an_old_attempt_s_thread_ending_late_leaves_the_new_attempt_running(
    harness: Harness,
) -> None:
    # Attempt 1 overruns its timeout in a blocking call: settled as a retry from the main
    # thread, and claimed again here while its thread is still stuck. When that thread ends,
    # it must not take attempt 2 out of the running jobs (no lease renewal, no timeout, a drain
    # that would not wait for it, no JobFinished).
    first_thread: list[threading.Thread] = []
    seen: list[int] = []

    @harness.app.task(timeout=2.0, max_attempts=3, retry_backoff=0.01)
    def hangs() -> None:
        if current_job().attempt == 1:
            first_thread.append(threading.current_thread())
            time.sleep(2.5)  # not interruptible (a blocking C call)
            return
        worker = harness.worker
        assert worker is not None
        seen.append(worker.running_count)
        # attempt 1's thread ends its attempt, then waits for a next job (slots.py)
        old = first_thread[0]
        wait_until(lambda: old.name == IDLE_NAME or not old.is_alive(), timeout=10)
        seen.append(worker.running_count)

    job_id = hangs.enqueue()
    worker = harness.start()
    wait_until(lambda: harness.state(job_id) == "succeeded", timeout=15)
    wait_until(lambda: len(harness.outcomes()) == 2)
    assert seen == [1, 1]
    assert harness.outcomes() == ["timed_out", "succeeded"]
    assert worker.running_count == 0


def test_concurrency_runs_jobs_side_by_side_up_to_the_limit() -> None:
    harness = Harness(concurrency=3)
    running = 0
    peak = 0
    lock = threading.Lock()
    release = threading.Event()

    @harness.app.task
    def hold() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1

    ids = [hold.enqueue() for _ in range(6)]
    worker = harness.start()
    wait_until(lambda: peak == 3)
    release.set()
    wait_until(lambda: all(harness.state(i) == "succeeded" for i in ids))
    worker.stop_fetching()
    assert harness.join() == 0
    assert peak == 3


def test_no_store_means_not_ready_and_no_claims(harness: Harness) -> None:
    harness.queue.healthy = False

    @harness.app.task
    def never() -> None:
        harness.log.append("ran")

    job_id = never.enqueue()
    worker = harness.start()
    wait_until(lambda: harness.events.of_type(StoreHealth) != [])
    assert harness.events.of_type(StoreHealth)[0].ok is False
    assert not harness.events.of_type(WorkerReady)
    harness.queue.healthy = True
    wait_until(lambda: harness.state(job_id) == "succeeded", timeout=15)
    worker.stop_fetching()
    assert harness.join() == 0
    assert harness.log == ["ran"]


def test_a_failed_claim_makes_the_store_not_ready_until_a_prompt_health_check(
    harness: Harness,
) -> None:
    failures = [ConnectionError("connection reset")]
    claim = harness.queue.claim

    def flaky_claim(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return claim(*args, **kwargs)

    harness.queue.claim = flaky_claim  # type: ignore[method-assign]

    @harness.app.task
    def record() -> None:
        harness.log.append("ran")

    job_id = record.enqueue()
    worker = harness.start()
    # Well before the health cadence (5 s): the failed claim asks for a health check at once.
    wait_until(lambda: harness.state(job_id) == "succeeded", timeout=3)
    health = [(e.ok, e.reason) for e in harness.events.of_type(StoreHealth)]
    assert (False, "claim failed: ConnectionError") in health
    assert health[-1][0] is True
    assert len(harness.events.of_type(WorkerReady)) == 2  # ready again after the failure
    worker.stop_fetching()
    assert harness.join() == 0


def test_heartbeats_go_on_while_a_claim_blocks(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workerkit.engines.sql.worker.HEARTBEAT_EVERY", 0.05)
    blocked, unblock = threading.Event(), threading.Event()
    claim = harness.queue.claim

    def slow_claim(*args: Any, **kwargs: Any) -> Any:
        blocked.set()
        unblock.wait(10)
        return claim(*args, **kwargs)

    harness.queue.claim = slow_claim  # type: ignore[method-assign]
    worker = harness.start()
    assert blocked.wait(10)
    before = len(harness.events.of_type(Heartbeat))
    wait_until(lambda: len(harness.events.of_type(Heartbeat)) >= before + 3, timeout=5)
    unblock.set()
    worker.stop_fetching()
    assert harness.join() == 0


def test_an_interrupt_never_lands_after_the_job_s_body_ended(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CI flake, made certain: the job's body has ended (here by raising), its thread is in
    # the worker's handling of that end, and the release takes the job back and interrupts the
    # thread. The interrupt must not land there (it escaped the thread before).
    escaped: list[type[BaseException] | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_type))
    in_handler, go_on = threading.Event(), threading.Event()

    class SlowToDescribe(Exception):
        @property
        def __notes__(self) -> None:  # read as the worker writes the job's error down
            in_handler.set()
            go_on.wait(10)
            return None

    @harness.app.task
    def fails() -> None:
        raise SlowToDescribe("row 17 is bad")

    job_id = fails.enqueue()
    worker = harness.start()
    assert in_handler.wait(10)
    worker.request_release()
    assert harness.join() == 0  # the job was released and its thread told to stop
    (thread,) = [t for t in threading.enumerate() if t.name == f"job-{job_id}"]
    go_on.set()
    # Its handling of the job's end done, the thread waits for a next job (slots.py) or ends.
    wait_until(lambda: thread.name == IDLE_NAME or not thread.is_alive(), timeout=10)
    assert escaped == []
    assert harness.state(job_id) == "ready"
    assert harness.outcomes() == ["released"]


def test_a_release_stops_subprocesses_first_and_a_job_seeing_one_die_is_still_released(
    harness: Harness,
) -> None:
    started, child_died = threading.Event(), threading.Event()
    order: list[str] = []

    @harness.app.task(max_attempts=1)
    def runs_a_subprocess() -> None:
        started.set()
        child_died.wait(10)
        raise RuntimeError("the subprocess was killed by SIGTERM")  # what subprocess.run says

    def stop_children() -> None:
        order.append(f"children stopped, job {harness.state(job_id)}")
        child_died.set()
        # The stop's grace: long enough for a job that saw its subprocess die to settle itself.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: harness.state(job_id) != "running", timeout=1.0)

    job_id = runs_a_subprocess.enqueue()
    worker = harness.start(stop_children=stop_children)
    assert started.wait(10)
    worker.request_release()
    assert harness.join() == 0
    assert order == ["children stopped, job running"]
    # Released (the attempt given back), not failed by the subprocess's death.
    assert harness.state(job_id) == "ready"
    assert harness.outcomes() == ["released"]


def test_no_part_of_the_worker_shadows_another_part_s_method_with_a_stub() -> None:
    # NativeWorker is put together from parts (settling, prefetch, leases); a part declares what
    # it needs from the others for the type checker only. A stub that exists at run time would
    # win over the real method of a part later in the bases, and raise NotImplementedError.
    for name in dir(NativeWorker):
        method = getattr(NativeWorker, name)
        if not inspect.isfunction(method) or not method.__module__.startswith("workerkit"):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(method))).body[0]
        assert isinstance(body, ast.FunctionDef)
        statements = [
            s
            for s in body.body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        ]
        stub = len(statements) == 1 and isinstance(statements[0], ast.Raise)
        assert not stub, f"NativeWorker.{name} resolves to a stub in {method.__qualname__}"
