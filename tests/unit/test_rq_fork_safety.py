"""A fork cannot leave the rq worker's child a lock its threads held.

RQ forks its scheduler process (and, with the forking Worker, a work horse per job) from the
main thread while workerkit's upkeep thread runs. A fork while another thread is importing a
module for the first time leaves that module's import lock held in the child for good; the
child's own first use then hangs (RQ's scheduler did, about one start in six under load). The
same goes for a lock held while the fork happens: ``_strptime``'s, held by every strptime.
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


def test_a_fork_while_another_thread_parses_a_date_leaves_the_child_strptime_free() -> None:
    # The thread holds _strptime's lock as a strptime does while it parses (the upkeep
    # thread's utcparse); the main thread forks meanwhile, as RQ forks its scheduler.
    code = """
import os, threading, time, _strptime
import workerkit.engines.rq.worker
held, done = threading.Event(), threading.Event()
def parse():
    with _strptime._cache_lock:
        held.set()
        done.wait()
threading.Thread(target=parse).start()
held.wait()
child = os.fork()
if child == 0:
    time.strptime("2026", "%Y")
    os._exit(0)
done.set()
deadline = time.monotonic() + 20
while os.waitpid(child, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(child, 9)
        os.waitpid(child, 0)
        print("the child hung in strptime")
        break
    time.sleep(0.01)
else:
    print("the child parsed")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "the child parsed", out.stderr
