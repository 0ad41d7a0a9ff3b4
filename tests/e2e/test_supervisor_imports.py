"""What the supervisor process of ``workerkit run ENGINE`` has imported once it is ready.

The supervisor lives as long as the pod and needs no engine library to supervise: the app is
loaded and checked in a forked child, the worker runs in its own interpreter, and the engine's
libraries come into the supervisor only when a drain begins, to release after a kill (issue 16,
item 5). The supervisor is started through a wrapper that writes its ``sys.modules`` on SIGUSR1;
the test asks once the supervisor is ready and idle, before the SIGTERM whose drain imports
what a release needs.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping

import pytest

from tests.support.harness import (
    WORKERKIT,
    Env,
    Supervisor,
    start_worker,
    stopped_after,
    wait_until,
)
from workerkit import exitcodes

ENGINE_LIBRARIES = frozenset(
    {"alembic", "billiard", "celery", "kombu", "psycopg", "redis", "rq", "sqlalchemy"}
)


#: ``workerkit`` with a SIGUSR1 handler (a test's own: the supervisor leaves SIGUSR1 alone) that
#: writes the top-level names of the process's ``sys.modules`` as one JSON line.
WRAPPER = """
import json, signal, sys

def report(signum, frame):
    names = sorted({name.split(".")[0] for name in list(sys.modules)})
    sys.stderr.write("sys.modules " + json.dumps(names) + "\\n")
    sys.stderr.flush()

signal.signal(signal.SIGUSR1, report)
from workerkit.cli import main
main()
"""


def _modules(sup: Supervisor) -> set[str]:
    def reported() -> list[str]:
        lines = sup.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if line.startswith("sys.modules ")]

    sup.signal(signal.SIGUSR1)
    line = wait_until(reported, timeout=10, what="the supervisor's sys.modules")[0]
    return set(json.loads(line.split(" ", 1)[1]))


def _run(env: Env, engine: str, app: str, settings: Mapping[str, str]) -> set[str]:
    argv = [WORKERKIT[0], "-c", WRAPPER, "run", engine]
    if engine == "celery":
        argv.append("--")
    running = start_worker(
        argv, env, app=app, name=f"{engine}-imports", engine=settings, settings={}
    )
    with stopped_after(running) as sup:
        sup.wait_ready(timeout=60)
        # Ready and idle: everything the supervisor loads to supervise is loaded by now.
        imported = _modules(sup)
        sup.signalled_at = None
        sup.signal(signal.SIGTERM)
        code, _ = sup.wait_exit(30)
        assert code == exitcodes.OK, sup.log_text()
    assert {"workerkit", "anyio", "prometheus_client"} <= imported  # the supervisor's own
    return imported


@pytest.mark.timeout(120)
def test_the_sql_supervisor_imports_neither_sqlalchemy_nor_alembic(env: Env) -> None:
    imported = _run(env, "sql", "tests.apps.sql_jobs:app", {"database_url": env.database_url})
    assert imported & ENGINE_LIBRARIES == set()


@pytest.mark.timeout(120)
def test_the_rq_supervisor_imports_neither_rq_nor_redis(env: Env, redis_url: str) -> None:
    imported = _run(env, "rq", "tests.apps.rq_jobs:app", {"redis_url": redis_url})
    assert imported & ENGINE_LIBRARIES == set()


@pytest.mark.timeout(120)
def test_the_celery_supervisor_imports_neither_celery_nor_kombu(env: Env, redis_url: str) -> None:
    settings = {"E2E_REDIS_URL": redis_url, "redis_url": redis_url, "queues": "celery"}
    imported = _run(env, "celery", "tests.apps.celery_jobs:app", settings)
    assert imported & ENGINE_LIBRARIES == set()
