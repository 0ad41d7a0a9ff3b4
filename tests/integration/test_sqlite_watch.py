"""The SQLite watcher: an idle worker hears of another process's commit from the kernel.

Real files, real commits from another process (a ``python -c`` that inserts a row), Linux's
inotify. The watchers here read the data version on their own every hour at most, so a wait
that returns early was woken by the file's change, not by a poll.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import wait_until
from workerkit.engines.sql import filechanges
from workerkit.engines.sql.db import upgrade
from workerkit.engines.sql.filechanges import FileChanges, WatchUnavailable
from workerkit.engines.sql.listener import (
    SQLITE_GAP_FIRST,
    SQLITE_WATCH_EVERY,
    SqliteWatcher,
    Wakeups,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")

HOUR = 3600.0


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    return path


def commit_from_another_process(path: Path) -> None:
    code = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('INSERT INTO jobs DEFAULT VALUES'); c.commit(); c.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=30)


@pytest.fixture
def watcher(database: Path) -> Iterator[tuple[SqliteWatcher, Wakeups]]:
    wakeups = Wakeups()
    watcher = SqliteWatcher(str(database), wakeups, HOUR, safety_every=HOUR)
    watcher.start()
    wait_until(lambda: wakeups.on_first_waiter is not None, timeout=30, what="the watch")
    yield watcher, wakeups
    watcher.stop()


def wait_in_thread(wakeups: Wakeups, timeout: float) -> tuple[threading.Thread, list[float]]:
    waited: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        wakeups.wait(["default"], timeout)
        waited.append(time.monotonic() - started)

    thread = threading.Thread(target=wait, daemon=True)  # a failed test leaves none behind
    thread.start()
    return thread, waited


def readable(changes: FileChanges, timeout: float = 30.0) -> bool:
    poller = select.poll()
    poller.register(changes.fileno(), select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def test_another_process_commit_makes_the_watch_readable(database: Path) -> None:
    changes = FileChanges.open(str(database))
    assert changes is not None
    try:
        unrelated = database.parent / "app.log"
        unrelated.write_text("x")
        assert readable(changes)  # a file came: looked at, but not one of the database's
        assert not changes.take()
        unrelated.write_text("more")  # an app's log beside the database: no event at all
        assert not readable(changes, timeout=0)  # events are queued by the write itself

        commit_from_another_process(database)
        assert readable(changes), "no event for the commit"
        assert changes.take()
        assert not changes.take(), "take() reads every pending event"
        assert not changes.lost
    finally:
        changes.close()


@pytest.mark.parametrize("journal_mode", ["WAL", "DELETE"])
def test_the_log_or_journal_coming_and_going_is_followed(database: Path, journal_mode: str) -> None:
    """SQLite deletes the log when its last connection closes (and a DELETE-mode journal at
    each commit): a file that comes back is watched again."""
    conn = sqlite3.connect(database)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.close()
    assert not Path(f"{database}-wal").exists()  # no connection left: no log
    changes = FileChanges.open(str(database))
    assert changes is not None
    holder = sqlite3.connect(database)  # as the watcher's own connection, kept open
    try:
        holder.execute("SELECT count(*) FROM jobs").fetchone()
        # WAL: the log is back (and stays while a connection is open); the commits below
        # write only it, so their events come from the watch added when it appeared.
        assert Path(f"{database}-wal").exists() == (journal_mode == "WAL")
        changes.take()
        for _ in range(3):
            commit_from_another_process(database)
            assert readable(changes), "no event for the commit"
            assert changes.take()
        assert not changes.lost
    finally:
        holder.close()
        changes.close()


def test_after_an_overflow_a_log_made_meanwhile_is_watched(tmp_path: Path) -> None:
    """The kernel drops events past its queue's limit, a new log's creation among them: the
    names are watched again, so the new log's writes are seen."""
    database, log = tmp_path / "jobs.sqlite3", tmp_path / "jobs.sqlite3-wal"
    database.write_bytes(b"")
    log.write_bytes(b"")
    changes = FileChanges.open(str(database))
    assert changes is not None
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        with database.open("ab") as first, log.open("ab") as second:
            for _ in range(limit // 2 + 10):  # alternate: identical events in a row merge
                first.write(b"x")
                first.flush()
                second.write(b"x")
                second.flush()
        log.unlink()
        log.write_bytes(b"")  # a new file: its creation is dropped with the overflow
        assert changes.take()
        with log.open("ab") as new_log:
            new_log.write(b"commit")
        assert readable(changes, timeout=0), "the new log's write raised no event"
        assert changes.take()
        assert not changes.lost
    finally:
        changes.close()


def test_the_watch_is_lost_with_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    changes = FileChanges.open(str(directory / "jobs.sqlite3"))
    assert changes is not None
    try:
        shutil.rmtree(directory)
        assert readable(changes)
        assert changes.take()
        assert changes.lost
    finally:
        changes.close()


def test_the_watch_is_closed_with_its_object(database: Path) -> None:
    changes = FileChanges.open(str(database))
    assert changes is not None
    fd = changes.fileno()
    os.fstat(fd)
    del changes
    gc.collect()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_no_watch_without_a_directory(tmp_path: Path) -> None:
    with pytest.raises(WatchUnavailable, match=r"inotify_add_watch\(.*missing.*No such file"):
        FileChanges.open(str(tmp_path / "missing" / "jobs.sqlite3"))


def test_used_up_descriptors_are_named_with_the_fix(database: Path) -> None:
    """EMFILE, here from the process's own limit: the message names both limits it can be."""
    script = textwrap.dedent(
        f"""
        import os, resource
        from workerkit.engines.sql.filechanges import FileChanges, WatchUnavailable
        from workerkit.proctree import load_libc
        load_libc()
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest, hard))
        held = []
        try:  # the numbers free below the limit, taken: the next descriptor is refused
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            FileChanges.open({str(database)!r})
        except WatchUnavailable as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "inotify_init1: too many open files" in done.stdout, done.stdout + done.stderr
    assert "fs.inotify.max_user_instances" in done.stdout


def test_a_waiter_is_woken_by_another_process_commit_at_once(
    database: Path, watcher: tuple[SqliteWatcher, Wakeups]
) -> None:
    _, wakeups = watcher
    thread, waited = wait_in_thread(wakeups, HOUR)
    wait_until(lambda: wakeups.waiting, timeout=30, what="the wait")
    commit_from_another_process(database)
    thread.join(timeout=30)
    assert waited, "the commit did not wake the waiter"
    assert waited[0] < 30


def test_commits_while_nobody_waits_wake_the_next_waiter_at_once(
    database: Path, watcher: tuple[SqliteWatcher, Wakeups]
) -> None:
    """The watcher reads nothing while no thread waits; the first waiter makes it look."""
    sqlite_watcher, wakeups = watcher
    seen = sqlite_watcher._seen
    commit_from_another_process(database)
    commit_from_another_process(database)
    # Each commit's event was queued before its process exited, tens of ms ago: a watcher
    # that read on events while nobody waits would have read the new version by now.
    assert sqlite_watcher._seen == seen
    thread, waited = wait_in_thread(wakeups, HOUR)
    thread.join(timeout=30)
    assert waited, "the commits made before the wait never woke it"


def why_a_polling_watcher_polls(database: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """A watcher polling every 50 ms (and a safety read hourly) wakes a waiter on a commit, with
    no first-waiter wake-up set; returns the reasons it logged for polling."""
    caplog.set_level(logging.INFO, logger="workerkit.engines.sql.listener")
    wakeups = Wakeups()
    watcher = SqliteWatcher(str(database), wakeups, 0.05, safety_every=HOUR)
    watcher.start()
    try:
        wait_until(lambda: watcher._seen is not None, timeout=30, what="its first read")
        thread, waited = wait_in_thread(wakeups, HOUR)
        wait_until(lambda: wakeups.waiting, timeout=30, what="the wait")
        commit_from_another_process(database)
        thread.join(timeout=30)
        assert waited, "the poll did not see the commit"
    finally:
        watcher.stop()
    assert wakeups.on_first_waiter is None
    return [
        getattr(record, "reason", "")
        for record in caplog.records
        if getattr(record, "event", None) == "sqlite_watch_polling"
    ]


def test_without_inotify_the_watcher_polls_and_says_why(
    database: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(cls: type[FileChanges], path: str) -> FileChanges:
        raise WatchUnavailable("no inotify here (Linux only)")

    monkeypatch.setattr(filechanges.FileChanges, "open", classmethod(unavailable))
    assert why_a_polling_watcher_polls(database, caplog) == ["no inotify here (Linux only)"]


def test_a_lost_watch_falls_back_to_polling(
    database: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = FileChanges.open

    def lost_at_once(cls: type[FileChanges], path: str) -> FileChanges:
        changes = real_open(path)
        changes.lost = True
        return changes

    monkeypatch.setattr(filechanges.FileChanges, "open", classmethod(lost_at_once))
    assert why_a_polling_watcher_polls(database, caplog) == [
        "the watch of its directory was lost (moved or removed)"
    ]


def test_stop_ends_the_thread_whether_or_not_a_thread_waits(
    watcher: tuple[SqliteWatcher, Wakeups],
) -> None:
    sqlite_watcher, _ = watcher
    thread = sqlite_watcher._thread
    assert thread is not None
    assert thread.is_alive()
    sqlite_watcher.stop()  # joins the thread for a second at most
    assert not thread.is_alive()


def test_wake_ups_that_find_nothing_lengthen_the_watchers_pause_and_a_job_ends_it() -> None:
    wakeups = Wakeups()
    wakeups.wait(["default"], 0.001)  # from here on, this thread hears every wake-up
    gaps = []
    for _ in range(6):
        wakeups.notify(None)  # the watcher's wake-up
        assert wakeups.wait(["default"], 5)
        wakeups.claimed(False)
        gaps.append(wakeups.watch_gap)
    assert gaps == [SQLITE_GAP_FIRST * 2**n for n in range(4)] + [SQLITE_WATCH_EVERY] * 2

    wakeups.claimed(False)  # a claim after no wait (another loop of the worker) changes nothing
    assert wakeups.watch_gap == SQLITE_WATCH_EVERY
    wakeups.notify("default")  # an enqueue in this process: not the watcher's wake-up
    assert wakeups.wait(["default"], 5)
    wakeups.claimed(False)
    assert wakeups.watch_gap == SQLITE_WATCH_EVERY

    wakeups.notify(None)
    assert wakeups.wait(["default"], 5)
    wakeups.claimed(True)
    assert wakeups.watch_gap == 0.0


#: The fork test's process: a queue whose watcher runs forks; the child's queue must be woken by
#: a watcher of its own. Its own fresh process, not pytest's: a child forked from pytest's
#: process (other tests' threads in it) while one of those threads held a lock inside SQLite
#: waits on that lock forever (it happened in a CI run: the child's wait was never woken).
FORKING_QUEUE = """
import os, subprocess, sys, threading, time
from workerkit.engines.base import NewJob
from workerkit.engines.sql import SqlQueue
from workerkit.settings import Settings

url = sys.argv[1]
# Another process's commit: one job enqueued into the same file.
commit = (
    "import sys; from workerkit.engines.sql import SqlQueue; "
    "from workerkit.engines.base import NewJob; q = SqlQueue(sys.argv[1]); "
    "q.enqueue(NewJob('child', 't', 'default', '{}', max_attempts=1)); q.close()"
)
queue = SqlQueue(url, settings=Settings())
producer = SqlQueue(url, settings=Settings())
queue.wait_for_jobs(["default"], 5)  # the parent's watcher runs
pid = os.fork()
if pid == 0:
    code = 1
    try:
        queue.wait_for_jobs(["default"], 5)  # its watcher starts: the first read wakes
        started = time.monotonic()
        enqueue = threading.Timer(
            0.2, lambda: subprocess.run([sys.executable, "-c", commit, url], check=True)
        )
        enqueue.start()
        queue.wait_for_jobs(["default"], 30)  # returns at 30 s if nothing woke it
        code = 0 if time.monotonic() - started < 25 else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
producer.enqueue(NewJob("after", "t", "default", "{}", max_attempts=1))
print("parent claims", len(queue.claim(["default"], "parent", 1)))
producer.close()
queue.close()
"""


def test_a_forked_child_queue_is_woken_by_its_own_watcher(tmp_path: Path) -> None:
    """After a fork the parent's watcher thread is gone: the child's first wait starts its own,
    with wake-ups of its own (the parent's lock may have been held at the fork)."""
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    done = subprocess.run(
        [sys.executable, "-c", FORKING_QUEUE, url],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    assert "child exit 0" in done.stdout, done.stdout + done.stderr  # woken, not at 30 s
    assert "parent claims 1" in done.stdout, done.stdout + done.stderr  # the parent's still works
