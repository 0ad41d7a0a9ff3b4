"""Shared plumbing of the benchmark scripts: statistics, machine facts, processes, results.

Every process a script starts is tracked here and stopped by *its own pid* (never by name,
never a whole process group we did not create); every temporary directory is removed. The
servers (redis-server, PostgreSQL) come from the test suite's starter, :mod:`tests.support.servers`,
so run the scripts from the repository root as modules (``python -m bench.supervisor``).
"""

from __future__ import annotations

import atexit
import compileall
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
#: The ``workerkit`` command, run by this interpreter (as tests/support/harness.py does).
WORKERKIT = [PYTHON, "-c", "from workerkit.cli import main; main()"]


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, min, median, p90, max (and the spread max - min)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "p90": percentile(values, 90),
        "max": max(values),
    }


# --- the machine and the code ------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    return "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine() -> dict[str, Any]:
    """Where and on what the numbers were taken (goes into every results file)."""
    load = os.getloadavg()
    redis_version = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        redis_version = out.split("v=")[1].split()[0] if "v=" in out else out.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _mem_total(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "tree": "dirty" if _git("status", "--porcelain", "--untracked-files=no") else "clean",
        "versions": {
            name: _version(name)
            for name in ("celery", "kombu", "rq", "redis", "SQLAlchemy", "psycopg")
        }
        | {"redis-server": redis_version},
    }


def command_line(module: str) -> str:
    """The command that produced the results, as typed from the repository root."""
    return " ".join([".venv/bin/python -m", module, *map(shlex.quote, sys.argv[1:])])


# --- processes ---------------------------------------------------------------------------------


class Proc:
    """A child process with its output in a log file; stopped by its own pid only."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] | None = log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
            )
        except BaseException:
            self._log.close()
            raise
        self.started = time.monotonic()
        self.exited_at: float | None = None
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def wait_blocking(self) -> int:
        """Block in waitpid (no polling sleeps), record when it returned."""
        code = self.popen.wait()
        self.exited_at = time.monotonic()
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal our pid (and, if it does not go, SIGKILL it and its descendants by pid)."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    for pid in [*descendants(self.pid), self.pid]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self.popen.wait(10)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            _LIVE.discard(self)


_LIVE: set[Proc] = set()


@atexit.register
def _stop_leftovers() -> None:  # only when a script died half-way
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(signal.SIGKILL, timeout=5)


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(text[text.rfind(")") + 2 :].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from /proc."""
    parents = _parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop(0)
        children = [child for child, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, from /proc/PID/status (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_for(
    condition: Callable[[], Any], *, timeout: float, what: str, proc: Proc | None = None
) -> Any:
    """Poll ``condition`` every 10 ms until truthy; fail with the process log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{what}: the process exited with {proc.popen.returncode}:\n{proc.log_text()}"
            )
        if time.monotonic() >= deadline:
            tail = f":\n{proc.log_text()}" if proc is not None else ""
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}{tail}")
        time.sleep(0.01)


@functools.cache
def compile_bytecode() -> None:
    """Compile workerkit's and the bench apps' modules to bytecode where it is missing or stale,
    as ``pip install`` does when it installs a wheel (a user's image has it).

    Without it a source checkout measures what no user runs: with ``PYTHONDONTWRITEBYTECODE=1``
    (set on the machines we bench on, and in our image, whose code pip compiled), an edited
    or fresh checkout compiles each module it imports from source, in every process at every
    start. That cost ~0.1 s of ``workerkit run sql``'s start -> ready and ~0.08 s of rq's
    (2026-12-05, bench/README.md, eighth round).
    """
    for package in ("workerkit", "bench"):
        compileall.compile_dir(REPO / package, quiet=1)


def child_env(**extra: str) -> dict[str, str]:
    """Our environment, the repository on PYTHONPATH (for ``bench.*`` and ``tests.*``); the
    repository's modules compiled first (:func:`compile_bytecode`)."""
    compile_bytecode()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("WORKERKIT_CONFIG", None)
    env.update(extra)
    return env


@contextlib.contextmanager
def redis_server() -> Iterator[Any]:
    """A private redis-server on 127.0.0.1 (``--save '' --appendonly no``), from
    tests.support.servers."""
    from tests.support import servers

    server = servers.start_redis()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[Any]:
    """A private, throwaway PostgreSQL cluster on 127.0.0.1, from tests.support.servers."""
    from tests.support import servers

    server = servers.start_postgres()
    try:
        yield server
    finally:
        server.stop()


# --- results -----------------------------------------------------------------------------------


def execute_sql(url: str, *statements: str, autocommit: bool = False) -> None:
    """Run ``statements`` on the database at ``url``: in one transaction, or each on its own
    (``autocommit``, for VACUUM)."""
    import sqlalchemy as sa

    from workerkit.engines.sql import create_engine_for

    engine = create_engine_for(url)
    try:
        options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
        with engine.connect().execution_options(**options) as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
            if not autocommit:
                conn.commit()
    finally:
        engine.dispose()


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals (a tenth of a millisecond), so the results files stay small."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """bench/results/NAME.json (summaries and raw samples) and NAME.md (the tables)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(_rounded(data), indent=1, sort_keys=False) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def machine_markdown(info: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return (
        f"- date: {info['date']}; commit {info['commit']} (working tree {info['tree']})\n"
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
        f"Linux {info['kernel']}, Python {info['python']}; load average at start "
        f"{info['loadavg_at_start']} (shared machine: other jobs were running)\n"
        f"- {versions}\n"
    )


def fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}{unit}"
