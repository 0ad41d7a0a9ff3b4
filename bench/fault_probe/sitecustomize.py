"""Counts a forking RQ worker's minor page faults by section; for bench/rq_faults.py only.

Put on PYTHONPATH with ``RQ_FAULTS_DIR`` and ``RQ_FAULTS_KIND`` (``bare`` or ``wk``) set: it
wraps methods of RQ's ``Worker`` (``bare``) or workerkit's (``wk``) in every process that
imports it. The worker writes ``worker.json`` at the end of ``work()``: the faults inside each
wrapped method, summed, and its calls. Each work horse appends a line to ``horses.jsonl`` at
its ``os._exit``: the faults it had taken when it ran its first statement after the fork
(``first``), when ``main_work_horse`` began (``main``), inside ``perform_job`` and in all
(``total``). A fault is the first write to a page after a fork (bench/README.md, tenth round).
"""

from __future__ import annotations

import collections
import functools
import gc
import json
import os
import resource
from pathlib import Path
from typing import Any

_OUT = os.environ.get("RQ_FAULTS_DIR", "")
_KIND = os.environ.get("RQ_FAULTS_KIND", "")

#: What the worker process does per job: RQ's methods, and workerkit's around them.
WORKER_METHODS = {
    "bare": (
        "dequeue_job_and_maintain_ttl",
        "check_for_suspension",
        "execute_job",
        "prepare_execution",
        "fork_work_horse",
        "monitor_work_horse",
    ),
    "wk": (
        "dequeue_job_and_maintain_ttl",
        "check_for_suspension",
        "execute_job",
        "_wk_begin",
        "fork_work_horse",
        "monitor_work_horse",
        "_wk_end",
        "_wk_idle",
    ),
}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _install(cls: Any, methods: tuple[str, ...]) -> None:
    in_worker: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    horse: dict[str, int] = {}

    def counted(name: str) -> None:
        method = getattr(cls, name)

        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before = _faults()
            try:
                return method(*args, **kwargs)
            finally:
                in_worker[name] += _faults() - before
                calls[name] += 1

        setattr(cls, name, wrapper)

    for name in methods:
        counted(name)

    def first_statement(function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if horse.get("pid") != os.getpid():  # the first call in this process
                horse.clear()
                horse.update(pid=os.getpid(), first=_faults())
            return function(*args, **kwargs)

        return wrapper

    # The horse's first statement: gc.freeze() in workerkit's, os.setpgrp() in RQ's.
    gc.freeze = first_statement(gc.freeze)
    os.setpgrp = first_statement(os.setpgrp)
    main_work_horse, perform_job = cls.main_work_horse, cls.perform_job

    def main(self: Any, *args: Any, **kwargs: Any) -> Any:
        horse["main"] = _faults()
        return main_work_horse(self, *args, **kwargs)

    def perform(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = _faults()
        try:
            return perform_job(self, *args, **kwargs)
        finally:
            horse["perform_job"] = _faults() - before

    cls.main_work_horse, cls.perform_job = main, perform
    exit_now = os._exit

    def horse_exit(code: int) -> None:
        if "main" in horse and horse.get("pid") == os.getpid():
            line = json.dumps({**horse, "total": _faults()})
            with open(Path(_OUT) / "horses.jsonl", "a") as out:
                out.write(line + "\n")
        exit_now(code)

    os._exit = horse_exit  # type: ignore[assignment]
    work = cls.work

    def counted_work(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return work(self, *args, **kwargs)
        finally:
            report = {"faults": dict(in_worker), "calls": dict(calls)}
            (Path(_OUT) / "worker.json").write_text(json.dumps(report))

    cls.work = counted_work


if _OUT and _KIND in WORKER_METHODS:
    if _KIND == "wk":
        from workerkit.engines.rq import worker as module
    else:
        from rq import worker as module  # type: ignore[no-redef]
    _install(module.Worker, WORKER_METHODS[_KIND])
