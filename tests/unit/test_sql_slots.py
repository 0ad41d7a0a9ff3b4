"""The sql worker's job threads (``engines/sql/slots.py``): kept for the next job, never awaited;
one whose job ended takes the next itself."""

from __future__ import annotations

import contextvars
import threading
import time

from workerkit.engines.sql.slots import IDLE_NAME, Slots

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="fresh")


def test_a_thread_whose_job_ended_runs_the_next_job() -> None:
    ran: list[tuple[int, str, str]] = []
    done = threading.Semaphore(0)

    def run(n: int) -> None:
        ran.append((threading.get_ident(), threading.current_thread().name, _seen.get()))
        _seen.set(f"left by job {n}")  # a fresh context per job: the next one does not see it
        done.release()

    slots: Slots[int] = Slots(run, idle=30)
    for n in range(5):
        slots.start(n, f"job-{n}")
        assert done.acquire(timeout=10)
        _wait_until_idle(ran[-1][0])

    assert len({ident for ident, _, _ in ran}) == 1
    assert [name for _, name, _ in ran] == [f"job-{n}" for n in range(5)]
    assert {seen for _, _, seen in ran} == {"fresh"}


def test_a_busy_thread_is_not_waited_for_and_idle_threads_end() -> None:
    release = threading.Event()
    started = threading.Semaphore(0)
    threads: set[threading.Thread] = set()

    def run(n: int) -> None:
        threads.add(threading.current_thread())
        started.release()
        if n == 0:
            assert release.wait(10)  # stuck, as a job past its timeout in a blocking call

    slots: Slots[int] = Slots(run, idle=0.2)
    slots.start(0, "job-0")
    assert started.acquire(timeout=10)
    slots.start(1, "job-1")  # job 0 still holds its thread: a new one
    assert started.acquire(timeout=10)
    assert len(threads) == 2
    release.set()
    for thread in threads:
        thread.join(10)  # each ends once it has waited 0.2 s with no job
        assert not thread.is_alive()


def test_a_thread_whose_job_ended_takes_the_next_job_itself_before_it_waits() -> None:
    ran: list[tuple[int, str, str]] = []
    following = [(n, f"job-{n}") for n in (1, 2, 3)]
    done = threading.Event()

    def run(n: int) -> None:
        ran.append((threading.get_ident(), threading.current_thread().name, _seen.get()))
        _seen.set(f"left by job {n}")
        if n == 3:
            done.set()

    def take_next() -> tuple[int, str] | None:
        return following.pop(0) if following else None

    slots: Slots[int] = Slots(run, take_next=take_next, idle=30)
    slots.start(0, "job-0")
    assert done.wait(10)
    _wait_until_idle(ran[-1][0])  # none left: it waits for start() as before
    assert len({ident for ident, _, _ in ran}) == 1
    assert [name for _, name, _ in ran] == [f"job-{n}" for n in range(4)]
    assert {seen for _, _, seen in ran} == {"fresh"}  # a fresh context for each job


def _wait_until_idle(ident: int) -> None:
    deadline = time.monotonic() + 10
    while not any(t.ident == ident and t.name == IDLE_NAME for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the job thread did not wait for the next job"
        time.sleep(0.005)
