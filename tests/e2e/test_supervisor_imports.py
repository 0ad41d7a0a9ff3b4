"""What the supervisor process of ``workerkit run ENGINE`` imports, seen with ``-X importtime``.

The supervisor lives as long as the pod and needs no engine library to supervise: the app is
loaded and checked in a short-lived process, the worker in another, and the engine's libraries
come into the supervisor only to release after a kill (issue 16, item 5). ``-X importtime``
given to the supervisor's interpreter alone (its children are started without it) lists every
module it imported, on its stderr; the test reads them once it has been ready and has stopped.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping

import pytest

from tests.support.harness import WORKERKIT, Env, start_worker, stopped_after
from workerkit import exitcodes

ENGINE_LIBRARIES = frozenset(
    {"alembic", "billiard", "celery", "kombu", "psycopg", "redis", "rq", "sqlalchemy"}
)


def _imported(log_text: str) -> set[str]:
    """The top-level names of the modules an ``import time: self | cumulative | name`` log lists."""
    names = set()
    for line in log_text.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name.split(".")[0])
    return names


def _run(env: Env, engine: str, app: str, settings: Mapping[str, str]) -> set[str]:
    argv = [WORKERKIT[0], "-X", "importtime", *WORKERKIT[1:], "run", engine]
    if engine == "celery":
        argv.append("--")
    running = start_worker(
        argv, env, app=app, name=f"{engine}-importtime", engine=settings, settings={}
    )
    with stopped_after(running) as sup:
        sup.wait_ready(timeout=60)
        sup.signal(signal.SIGTERM)
        code, _ = sup.wait_exit(30)
        assert code == exitcodes.OK, sup.log_text()
        text = sup.log_path.read_text(errors="replace")
    imported = _imported(text)
    assert {"workerkit", "anyio"} <= imported  # the log holds the supervisor's list
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
