"""``workerkit dashboard`` as a real process: its WORKERKIT_DASHBOARD_* variables, a store that is
down at start (it serves anyway and opens the source on a later request), token auth, SIGTERM.

The engine's source is the in-memory one (tests/support/dashboard_memory.py), installed as
``workerkit.engines.sql.dashboard`` in the child before the command runs: what is tested here is
the command and the server, not an engine (tests/integration/test_dashboard_*.py do those).
"""

from __future__ import annotations

import http.client
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT
from tests.support.harness import spawn_logged, stopped_after, try_http_get, wait_until
from tests.support.servers import free_port

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token-0123456789abcdef"
CHILD = """\
import sys, types
from tests.support.dashboard_memory import MemoryDashboardSource
from workerkit.errors import StoreUnavailable

opened = []

def open_source(settings):
    opened.append(settings.engine)
    if len(opened) == 1:
        raise StoreUnavailable("the store is starting up")
    source = MemoryDashboardSource(engine="sql")
    source.add("job-1", state="failed", error="ValueError: boom")
    return source

module = types.ModuleType("workerkit.engines.sql.dashboard")
module.open_source = open_source
sys.modules[module.__name__] = module
from workerkit.cli import main
main(["dashboard", "sql"])
"""


def _get(port: int, path: str, **headers: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_the_command_serves_recovers_a_late_store_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    variables = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "WORKERKIT_LOG_FORMAT": "json",
        "WORKERKIT_DASHBOARD_PORT": str(port),
        "WORKERKIT_DASHBOARD_TOKEN_FILE": str(token_file),
        "WORKERKIT_DASHBOARD_REFRESH": "5",
    }
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    argv = [sys.executable, str(script)]
    with stopped_after(spawn_logged(argv, tmp_path, "dashboard", port, variables)) as dashboard:
        dashboard.wait_event("dashboard_store_unavailable", timeout=30)
        wait_until(
            lambda: (try_http_get(port, "/healthz") or (0, ""))[0] == 200,
            timeout=30,
            what="/healthz to answer",
        )
        assert _get(port, "/")[0] == 401
        status, page = _get(port, "/jobs?state=failed", Authorization=f"Bearer {TOKEN}")
        assert status == 200, page
        assert '<tr data-job-id="job-1" data-state="failed">' in page
        assert 'data-refresh-interval="5.0"' in page
        starting = dashboard.events_named("dashboard_starting")
        assert starting[0]["port"] == port
        assert starting[0]["host"] == "127.0.0.1"
        dashboard.signal(signal.SIGTERM)
        code, elapsed = dashboard.wait_exit(timeout=20)
        assert code == 0, dashboard.log_text()
        assert elapsed < 10
