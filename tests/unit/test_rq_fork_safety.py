"""The rq worker's threads do no first-time import that a fork could catch half-way.

RQ forks its scheduler process (and, with the forking Worker, a work horse per job) from the
main thread while workerkit's upkeep thread runs. A fork while another thread is importing a
module for the first time leaves that module's import lock held in the child for good; the
child's own first use then hangs (RQ's scheduler did, about one start in six under load).
"""

from __future__ import annotations

import subprocess
import sys

LAZY_IN_THREADS = ("_strptime",)  # datetime.strptime, through rq.utils.utcparse (upkeep)


def test_modules_the_upkeep_thread_would_import_lazily_are_imported_with_the_worker() -> None:
    code = (
        "import sys, threading, workerkit.engines.rq.worker\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        f"print([m for m in {LAZY_IN_THREADS!r} if m not in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
