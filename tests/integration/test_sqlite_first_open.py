"""Connections opening one new SQLite file at the same time (workers started together).

The first connections to a new file switch it to WAL (``PRAGMA journal_mode=WAL``, in every
connection's set-up). The switch upgrades a read lock to the exclusive lock, and SQLite answers
"database is locked" at once, without waiting the busy timeout, when another connection holds
the write lock or is switching too. Measured before the fix: one round in five of three
processes released by a barrier failed so. Real processes and files.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
import traceback
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from workerkit.engines.sql.db import create_engine_for, schema_status

PROCESSES = 4
ROUNDS = 8


def _open_at_once(url: str, barrier: Barrier, results: Any) -> None:
    try:
        engine = create_engine_for(url)
        barrier.wait(10)
        # What a worker's start does first (startup.py's probe): connect, and read the schema's
        # revision inside BEGIN IMMEDIATE.
        with engine.connect() as connection, connection.begin():
            schema_status(connection)
        engine.dispose()
        results.put("ok")
    except BaseException:
        results.put(traceback.format_exc(limit=3))


@pytest.mark.timeout(120)
def test_processes_opening_a_new_sqlite_file_at_once_all_connect(tmp_path: Path) -> None:
    # From a fork server, not from this process: pytest's process has other tests' threads,
    # and a child forked while one of them held a lock inside SQLite (its file-open lock, say)
    # waits on it forever (a CI run hung so: the child in sqlite3.connect, pytest waiting for
    # the child at exit). The fork server is a fresh single-threaded process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once there, not in every child
    failures: list[str] = []
    for round_ in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'round{round_}.sqlite3'}"
        barrier = context.Barrier(PROCESSES)
        results = context.Queue()
        procs = [
            context.Process(target=_open_at_once, args=(url, barrier, results))
            for _ in range(PROCESSES)
        ]
        try:
            for proc in procs:
                proc.start()
            outcomes = [results.get(timeout=60) for _ in procs]
            for proc in procs:
                proc.join(30)
        finally:
            for proc in procs:  # a child still running would hold pytest's exit forever
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        failures += [f"round {round_}: {each}" for each in outcomes if each != "ok"]
    assert not failures, f"{len(failures)} of {ROUNDS * PROCESSES} opens failed:\n" + "\n".join(
        failures[:3]
    )
    # And the files are in WAL mode, as every connection asked.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'round0.sqlite3'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_the_wal_switch_waits_for_a_writer_of_a_new_file_instead_of_failing_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # the write lock of a file still in rollback mode
    releaser = threading.Timer(0.5, lambda: writer.execute("ROLLBACK"))
    releaser.start()
    engine = create_engine_for(f"sqlite:///{path}?timeout=10")
    started = time.monotonic()
    try:
        with engine.connect() as connection, connection.begin():
            schema_status(connection)  # once the writer let go
        waited = time.monotonic() - started
    finally:
        releaser.join()
        writer.close()
        engine.dispose()
    assert 0.3 < waited < 8, waited  # waited for the lock, within the busy timeout
