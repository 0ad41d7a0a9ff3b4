"""The dashboard in a real browser: Debian's chromium driven by Playwright, and the processes
behind it (``workerkit run sql``, ``workerkit scheduler sql``, ``workerkit dashboard sql``).

Playwright never downloads a browser here: it launches the system chromium through
``executable_path``, headless, with a fresh profile of its own per launch (Playwright creates
and removes a temporary user-data directory). ``tests/browser/conftest.py`` wraps these in
fixtures.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.harness import (
    REPO,
    WORKERKIT,
    Env,
    Supervisor,
    spawn_logged,
    start_worker,
    try_http_get,
    wait_until,
    worker_env,
)
from tests.support.servers import free_port
from tests.support.suite import find_program_or_skip
from workerkit.app import App, EnqueueOptions
from workerkit.engines.sql import SqlQueue
from workerkit.settings import Settings

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

__all__ = (
    "APP",
    "CHROMIUM_ARGS",
    "CHROMIUM_NAMES",
    "SCREENSHOTS",
    "Stack",
    "find_chromium",
    "launch_chromium",
    "screenshot_path",
    "start_dashboard",
)

#: The test app: a task held by a gate file, a failing one, a quick one and a schedule.
APP = "tests.apps.dashboard_jobs:app"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get install chromium (./scripts/test.sh installs it when run as root)"
#: Headless, and nothing that reaches out: no QUIC, sync, component updates or background
#: fetches (a test machine may have no network, and a test must not depend on one).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: Where the documentation's screenshots go (docs/howto/dashboard.md shows them).
SCREENSHOTS = REPO / "docs" / "images" / "dashboard"


def find_chromium() -> str:
    """The system chromium's path; skip (fail when CI is set) naming the install command."""
    return find_program_or_skip(CHROMIUM_NAMES, INSTALL)


def launch_chromium(playwright: Playwright, executable: str) -> Browser:
    return playwright.chromium.launch(
        executable_path=executable, headless=True, args=list(CHROMIUM_ARGS)
    )


def screenshot_path(name: str, tmp: Path) -> Path:
    """docs/images/dashboard/NAME.png with ``GOLDEN_UPDATE=1``, else NAME.png in ``tmp``."""
    if os.environ.get("GOLDEN_UPDATE") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS / f"{name}.png"
    return tmp / f"{name}.png"


@dataclass
class Stack(Env):
    """One module's database, worker, scheduler and dashboard (each started on demand)."""

    queues: str = "default,live,bulk"
    settings: dict[str, str] = field(default_factory=dict)
    processes: list[Supervisor] = field(default_factory=list)

    def store(self) -> dict[str, str]:
        return {"database_url": self.database_url, "poll_interval": "0.1", "queues": self.queues}

    def upgrade(self) -> None:
        """``workerkit db upgrade``, as an operator migrates the database."""
        variables = worker_env(self, app=APP, port=0, engine=self.store(), settings={})
        done = subprocess.run(
            [*WORKERKIT, "db", "upgrade"], env=variables, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def start_worker(self, name: str = "worker", **settings: str) -> Supervisor:
        worker = start_worker(
            [*WORKERKIT, "run", "sql"],
            self,
            app=APP,
            name=name,
            engine=self.store(),
            settings={**self.settings, **settings},
        )
        self.processes.append(worker)
        worker.wait_ready()
        return worker

    def start_scheduler(self) -> Supervisor:
        scheduler = start_worker(
            [*WORKERKIT, "scheduler", "sql", "--app", APP],
            self,
            app=APP,
            name="scheduler",
            engine=self.store(),
            settings=self.settings,
        )
        self.processes.append(scheduler)
        scheduler.wait_ready()
        return scheduler

    def start_dashboard(self, *args: str, name: str = "dashboard") -> Supervisor:
        dashboard = start_dashboard(self, args, name=name)
        self.processes.append(dashboard)
        return dashboard

    def process(self, name: str) -> Supervisor:
        """The process started under ``name`` (worker, scheduler, dashboard)."""
        return next(p for p in self.processes if p.log_path.stem == name)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def put(self, task: str, *args: Any, job_id: str, queue: str | None = None) -> str:
        """Enqueue ``task(*args)`` as ``job_id`` (into ``queue``, else the task's)."""
        from tests.apps import dashboard_jobs

        declared = {"held": dashboard_jobs.held, "flaky": dashboard_jobs.flaky}.get(task)
        app = App(self.database_url, settings=Settings(database_url=self.database_url))
        options = EnqueueOptions(queue=queue, job_id=job_id)
        try:
            if declared is not None:  # with its max_attempts (1: flaky fails at once)
                return app.enqueue_task(declared, list(args), {}, options)
            return app.enqueue(task, list(args), {}, options)
        finally:
            app.backend.close()

    def open_gate(self, tag: str) -> None:
        """Let the ``held`` job TAG finish, or the ``flaky`` job TAG succeed from now on."""
        (self.tmp / f"gate-{tag}").touch()

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The job's row as the queue keeps it (state ready/running/succeeded/failed), or None."""
        queue = SqlQueue(self.database_url, settings=Settings(database_url=self.database_url))
        try:
            return queue.get_job(job_id)
        finally:
            queue.close()

    def wait_state(self, job_id: str, state: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.record(job_id)
            return job if job is not None and job["state"] == state else None

        found: dict[str, Any] = wait_until(reached, timeout=20, what=f"job {job_id} {state}")
        return found

    def barrier(self, tag: str, queue: str = "default") -> None:
        """Enqueue ``tick TAG`` and wait until it ran: the worker fetched after everything
        enqueued before it that was due and not paused."""
        self.put("tick", tag, job_id=f"barrier-{tag}", queue=queue)
        self.wait_line(f"ran {tag} 1", timeout=20)


def start_dashboard(stack: Stack, args: Sequence[str], *, name: str) -> Supervisor:
    """``workerkit dashboard sql`` on a free loopback port, refreshing every second, up."""
    port = free_port()
    variables = worker_env(stack, app=APP, port=free_port(), engine=stack.store(), settings={})
    argv = [*WORKERKIT, "dashboard", "sql", "--app", APP, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--refresh", "1", *args]
    dashboard = spawn_logged(argv, stack.tmp, name, port, variables)

    def up() -> bool:
        if dashboard.proc.poll() is not None:
            raise AssertionError(f"the dashboard exited:\n{dashboard.log_text()}")
        answer = try_http_get(port, "/healthz")
        return answer is not None and answer[0] == 200

    started = time.monotonic()
    try:
        wait_until(up, timeout=30, what="the dashboard's /healthz to answer 200")
    except BaseException:
        dashboard.stop()
        raise
    print(f"dashboard up in {time.monotonic() - started:.1f} s")
    return dashboard
