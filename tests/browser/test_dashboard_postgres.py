"""The dashboard against PostgreSQL: real counts on the overview, and a worker's drain.

One test (PostgreSQL costs more to start than SQLite, which the other modules use): the stack
is ``workerkit db upgrade`` on a blank database, ``workerkit run sql`` with a 30 s grace period,
and ``workerkit dashboard sql --refresh 1``.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import new_stack
from tests.support import servers

if TYPE_CHECKING:
    from tests.support.browser import Stack

expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def stack(
    browser: Browser,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: servers.PostgresServer,
) -> Iterator[Stack]:
    del browser  # chromium first: nothing is started when it is missing
    tmp = tmp_path_factory.mktemp("dashboard-postgres")
    name = f"dashboard_{uuid.uuid4().hex[:12]}"
    servers.create_database(postgres_server, name, "template0")
    started = time.monotonic()
    stack = new_stack(tmp, postgres_server.url(name))
    try:
        stack.upgrade()
        stack.start_dashboard()
        stack.start_worker(grace_period="30", release_margin="2")
        print(f"the PostgreSQL stack started in {time.monotonic() - started:.1f} s")
        yield stack
    finally:
        stack.stop()
        servers.drop_database(postgres_server, name)


def test_counts_then_the_worker_draining_with_its_deadline(stack: Stack, page: Page) -> None:
    for n in range(2):
        stack.put("tick", f"idle-{n}", job_id=f"idle-{n}", queue="idle")  # nobody consumes it
    stack.put("flaky", "broken", job_id="broken")
    stack.wait_state("broken", "failed")
    stack.put("held", "in-hand", job_id="in-hand")
    stack.wait_line("start in-hand 1")

    page.goto("/")
    expect(page.locator('#queues tr[data-queue="idle"] td.waiting')).to_have_text("2")
    default = page.locator('#queues tr[data-queue="default"]')
    expect(default.locator("td.failed")).to_have_text("1")
    expect(default.locator("td.running")).to_have_text("1")

    page.goto("/workers")
    worker = page.locator("#workers tr[data-worker-id]")
    expect(worker).to_have_count(1)
    expect(worker.locator("td.state")).to_have_text("ready")
    expect(worker.locator("td.jobs")).to_have_text("in-hand")  # the job in hand

    supervisor = stack.process("worker")
    supervisor.signal(signal.SIGTERM)
    expect(worker.locator("td.state")).to_have_text("draining")
    expect(worker.locator("td.deadline")).not_to_be_empty()

    stack.open_gate("in-hand")
    code, _ = supervisor.wait_exit(30)
    assert code == 0
    assert stack.count("done in-hand") == 1
    record = stack.record("in-hand")
    assert record is not None
    assert record["state"] == "succeeded"
