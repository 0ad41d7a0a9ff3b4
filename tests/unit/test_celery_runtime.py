"""The Celery engine's per-process Runtime: what a forked pool child keeps and what it drops."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("celery")

from celery import Celery

from workerkit.engines.celery.runtime import Runtime
from workerkit.events import BatchingSender
from workerkit.settings import Settings


def test_a_forked_child_drops_the_parents_event_sender_and_keeps_the_rest() -> None:
    settings = Settings(engine="celery")
    runtime = Runtime(Celery("t"), settings)
    parent_events = runtime.open_task_events()
    assert runtime.open_task_events() is parent_events  # one per process
    runtime.stop_requested.set()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        ok = (
            runtime.task_events is None
            and isinstance(runtime.open_task_events(), BatchingSender)
            and runtime.task_events is not parent_events
            and runtime.task_events.pid == os.getpid()
            and runtime.stop_requested.is_set()  # a stop asked before the fork still holds
            and runtime.settings is settings
        )
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert runtime.task_events is parent_events  # the parent keeps its own
