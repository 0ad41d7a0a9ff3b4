"""Running ``workerkit run sql`` for real: a process, real signals, a SQLite queue, a journal.

Plain helpers, shared by the engines' harnesses (:func:`worker_env`, :func:`spawn_logged`,
:class:`Supervisor`); ``tests/e2e/conftest.py`` wraps them in fixtures. Every process started
here is stopped by its own pid at the end of the test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from tests.support.servers import free_port
from workerkit.app import App, EnqueueOptions
from workerkit.engines.sql import SqlQueue
from workerkit.settings import Settings
from workerkit.supervisor.process import descendants

REPO = Path(__file__).resolve().parents[2]
WORKERKIT = [sys.executable, "-c", "from workerkit.cli import main; main()"]
POLL = 0.02

#: Short timing for fast tests: G = 6 s, M = 2 s, so D = 4 s; request_stop at 4 s, release at
#: 5 s, kill at 5.6 s, exit by 6 s after SIGTERM.
GRACE = 6.0
MARGIN = 2.0
DRAIN = GRACE - MARGIN


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll until ``predicate()`` is truthy; return it, or fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL)


def gone(pid: int) -> bool:
    """``pid`` exited (a zombie nobody reaped yet counts), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def try_http_get(port: int, path: str) -> tuple[int, str] | None:
    try:
        return http_get(port, path)
    except OSError:
        return None


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, Z...) or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()[0]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class Journaled:
    """Reads the journal the test apps write (tests/apps/journal.py), one line per step."""

    journal: Path

    def lines(self) -> list[str]:
        try:
            return self.journal.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_line(self, line: str, timeout: float = 15.0) -> None:
        wait_until(lambda: line in self.lines(), timeout=timeout, what=f"journal line {line!r}")


@dataclass
class Env(Journaled):
    """One test's queue, journal and settings (as environment variables)."""

    tmp: Path
    database_url: str
    journal: Path
    extra: dict[str, str] = field(default_factory=dict)

    def enqueue(self, task: str, *args: Any, job_id: str) -> str:
        app = App(self.database_url, settings=Settings(database_url=self.database_url))
        try:
            return app.enqueue(task, list(args), {}, EnqueueOptions(job_id=job_id))
        finally:
            app.backend.close()

    def job(self, job_id: str) -> dict[str, Any]:
        queue = SqlQueue(self.database_url, settings=Settings(database_url=self.database_url))
        try:
            job = queue.get_job(job_id)
        finally:
            queue.close()
        assert job is not None, job_id
        return job


@dataclass
class Supervisor:
    """A running ``workerkit run sql`` (optionally under a wrapper such as ``unshare``)."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]
    signalled_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict):
                    events.append(data)
        return events

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = wait_until(
            lambda: self.events_named(name), timeout=timeout, what=f"log event {name!r}"
        )
        return found[0]

    def worker_pid(self) -> int:
        return int(self.wait_event("worker_started")["pid"])

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the supervisor exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            answer = try_http_get(self.port, "/readyz")
            return answer is not None and answer[0] == 200

        wait_until(ready, timeout=timeout, what="/readyz to answer 200")

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def signal(self, signum: int, pid: int | None = None) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        os.kill(self.pid if pid is None else pid, signum)

    def wait_exit(self, timeout: float = 15.0) -> tuple[int, float]:
        """The exit code and the seconds from the first signal to the exit."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the supervisor did not exit within {timeout:g}s:\n{self.log_text()}"
            ) from None
        elapsed = time.monotonic() - (self.signalled_at or time.monotonic())
        return code, elapsed

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        """Kill what is left (the test failed half-way): the worker and its children first."""
        try:
            if self.proc.poll() is None:
                for pid in descendants(self.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(10)
        finally:
            self.log_file.close()


class WorkerDir(Protocol):
    """What a harness's per-test env holds for the processes it starts (Env, RqEnv)."""

    tmp: Path
    journal: Path
    extra: dict[str, str]


def worker_env(
    env: WorkerDir,
    *,
    app: str,
    port: int,
    engine: Mapping[str, str],
    settings: Mapping[str, str],
) -> dict[str, str]:
    """The environment of a spawned ``workerkit run``, built the same way for every engine.

    This interpreter's environment with the repository on ``PYTHONPATH``, the journal, ``app``,
    the short test timing, HTTP on ``port`` and JSON debug logs; then, each overriding what came
    before: ``engine`` (what this engine needs), ``env.extra`` (names as they are) and
    ``settings`` (the test's keyword arguments). In ``engine`` and ``settings`` a name already
    spelled ``WORKERKIT_...`` or ``E2E_...`` stays; any other becomes ``WORKERKIT_<NAME>``.
    """

    def named(values: Mapping[str, str]) -> dict[str, str]:
        return {
            (k if k.startswith(("WORKERKIT_", "E2E_")) else f"WORKERKIT_{k.upper()}"): v
            for k, v in values.items()
        }

    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "E2E_JOURNAL": str(env.journal),
        "WORKERKIT_APP": app,
        "WORKERKIT_GRACE_PERIOD": str(GRACE),
        "WORKERKIT_RELEASE_MARGIN": str(MARGIN),
        "WORKERKIT_CHECKPOINT_INTERVAL": "1",
        "WORKERKIT_HTTP_HOST": "127.0.0.1",
        "WORKERKIT_HTTP_PORT": str(port),
        "WORKERKIT_LOG_FORMAT": "json",
        "WORKERKIT_LOG_LEVEL": "debug",
        **named(engine),
        **env.extra,
        **named(settings),
    }


def start_worker(
    argv: Sequence[str],
    env: WorkerDir,
    *,
    app: str,
    name: str,
    engine: Mapping[str, str],
    settings: Mapping[str, str],
    new_session: bool = False,
) -> Supervisor:
    """Start ``argv`` (a ``workerkit run ENGINE``) on a free HTTP port with :func:`worker_env`."""
    port = free_port()
    variables = worker_env(env, app=app, port=port, engine=engine, settings=settings)
    return spawn_logged(argv, env.tmp, name, port, variables, new_session=new_session)


def start_supervisor(
    env: Env, *, wrapper: Sequence[str] = (), name: str = "supervisor", **settings: str
) -> Supervisor:
    return start_worker(
        [*wrapper, *WORKERKIT, "run", "sql"],
        env,
        app="tests.apps.sql_jobs:app",
        name=name,
        engine={"database_url": env.database_url, "poll_interval": "0.1"},
        settings=settings,
    )


def spawn_logged(
    argv: Sequence[str],
    cwd: Path,
    name: str,
    port: int,
    variables: dict[str, str],
    *,
    new_session: bool = False,
) -> Supervisor:
    """Start ``argv`` with its output in ``cwd/NAME.log`` (what Supervisor reads events from).

    ``new_session``: its own process group, so a test can SIGKILL the whole "pod" at once.
    """
    log_path = cwd / f"{name}.log"
    log_file = log_path.open("ab")
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=variables,
            start_new_session=new_session,
        )
    except BaseException:
        log_file.close()
        raise
    return Supervisor(proc, port, log_path, log_file)


@contextlib.contextmanager
def stopped_after(running: Supervisor) -> Iterator[Supervisor]:
    """``running`` for a ``with`` block, stopped (whatever is left of it) at its end."""
    try:
        yield running
    finally:
        running.stop()


def supervisor(env: Env, **kwargs: Any) -> contextlib.AbstractContextManager[Supervisor]:
    return stopped_after(start_supervisor(env, **kwargs))


def stop_gracefully(running: Supervisor) -> int:
    """SIGTERM, wait for the exit, return the code."""
    if running.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid, signal.SIGTERM)
    return running.proc.wait(15)
