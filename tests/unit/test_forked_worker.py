"""The early worker forked from the CLI (supervisor/forked.py), in real processes and signals.

Each case runs a driver in a fresh interpreter (one thread, no descriptor of pytest's): it holds
the supervisor's signals as ``workerkit run`` does, forks ``python -m tests.apps.fork_probe``
through :func:`workerkit.supervisor.forked.start` and reports what the child found.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from workerkit.supervisor import forked

DRIVER = textwrap.dedent(
    """
    import json, os, random, signal, sys, threading
    from workerkit.supervisor import forked, held_signals
    from workerkit.supervisor.process import ChildProcess

    mode = sys.argv[1]
    held_signals.hold()
    os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's, recorded before the fork
    report_r, report_w = os.pipe()
    os.set_inheritable(report_w, True)
    spare_r, spare_w = os.pipe()  # the parent's end of a second pipe: closed in the child
    if mode == "thread":
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    if mode == "descriptor":
        stray = open(os.devnull)
    env = {**os.environ, "FORK_PROBE_FD": str(report_w), "PROBE_ONLY_CHILD": "yes"}
    env.pop("PROBE_ONLY_PARENT", None)
    child = ChildProcess([sys.executable, "-m", "tests.apps.fork_probe", "a", "--b"], env)
    drop = (report_r, spare_r, spare_w)
    was_forked = forked.start(child, keep=(report_w,), drop=drop)
    if not was_forked:
        child.start()
    os.close(report_w)
    if mode == "exit":
        lines = os.fdopen(report_r).read().splitlines()
        _, status = os.waitpid(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"forked": was_forked, "lines": lines, "exit": code}))
        sys.exit(0)
    line = os.fdopen(report_r).readline()
    report = json.loads(line)
    report["forked"] = was_forked
    report["parent_random"] = random.random()
    report["parent_held"] = held_signals.take()
    report["parent_comm"] = open("/proc/self/comm").read().strip()
    os.kill(child.pid, signal.SIGTERM)
    _, status = os.waitpid(child.pid, 0)
    report["exit"] = os.waitstatus_to_exitcode(status)
    print(json.dumps(report))
    """
)


def drive(mode: str = "plain", **env: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, mode],
        env={**os.environ, "PROBE_ONLY_PARENT": "yes", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


def test_a_forked_worker_starts_as_an_execd_one_would() -> None:
    report = drive()
    assert report["forked"] is True
    # A fresh interpreter's handlers, not the supervisor's recorder; what it held stays its.
    assert report["signals"] == {
        "SIGTERM": "SIG_DFL",
        "SIGINT": "default_int_handler",
        "SIGHUP": "SIG_DFL",
        "SIGQUIT": "SIG_DFL",
        "SIGPIPE": "SIG_IGN",
    }
    assert report["held"] == []
    assert report["parent_held"] == [signal.SIGTERM]
    # Run as `python -m`: its argv and __main__, its environment (not the CLI's), its name.
    assert report["argv"][1:] == ["a", "--b"]
    assert report["argv"][0].endswith(os.path.join("tests", "apps", "fork_probe.py"))
    assert report["name"] == "__main__"
    assert report["env"] == {"PROBE_ONLY_CHILD": "yes", "PROBE_ONLY_PARENT": None}
    assert report["comm"] == "wk-fork_probe-w"[:15]
    assert report["parent_comm"] != report["comm"]
    # No descriptor of the parent's but the one it was given (inheritable, as for an exec).
    assert report["private_fds"] == []
    # The random module reseeded itself in the child.
    assert report["random"] != report["parent_random"]
    # SIGTERM at its default: the child dies of it.
    assert report["exit"] == -signal.SIGTERM


@pytest.mark.parametrize("mode", ["thread", "descriptor"])
def test_the_worker_is_execd_where_a_fork_is_unsafe(mode: str) -> None:
    """A second thread (it may hold a lock the child would inherit held), or a close-on-exec
    descriptor of the CLI's that the child would keep: spawned with exec instead."""
    report = drive(mode)
    assert report["forked"] is False
    assert not report["comm"].startswith("wk-")
    assert report["argv"][1:] == ["a", "--b"]
    assert report["exit"] == -signal.SIGTERM


def test_the_fork_can_be_turned_off() -> None:
    report = drive(**{forked.DISABLE_ENV: "0"})
    assert report["forked"] is False
    assert report["env"]["PROBE_ONLY_CHILD"] == "yes"


def test_only_a_python_dash_m_command_of_this_interpreter_is_forked() -> None:
    assert forked._module_args([sys.executable, "-m", "x.y", "--a"]) == ("x.y", ["--a"])
    assert forked._module_args(["/bin/true", "-m", "x.y"]) is None
    assert forked._module_args([sys.executable, "script.py"]) is None


def test_the_imports_shared_before_the_fork_load_no_engine_library() -> None:
    """Nor the supervisor's own modules: the time before the fork is on the worker's way to
    ready (the timing budget's rules and report are imported after it)."""
    code = (
        "import sys\n"
        "from workerkit.supervisor.forked import SHARED_IMPORTS\n"
        "import importlib\n"
        "for name in SHARED_IMPORTS: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'sqlalchemy', 'rq', 'redis', 'celery', 'kombu', 'psycopg', 'alembic'}))\n"
        "print(sorted(set(sys.modules) & "
        "{'workerkit.timing.rules', 'workerkit.timing.report', 'workerkit.supervisor.runner'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.split() == ["[]", "[]"]


def test_a_forked_worker_exits_as_a_program_would() -> None:
    """Its non-daemon threads are waited for, then its exit functions run (as at an exec'd
    worker's exit): a worker's last writes are not cut off by the fork's ``os._exit``."""
    report = drive("exit", FORK_PROBE_EXIT="1")
    assert report == {"forked": True, "lines": ["thread", "atexit"], "exit": 0}
