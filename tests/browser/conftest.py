"""Fixtures for the browser tests: one headless chromium per session, one page per test.

Each test module starts its own stack (a database, ``workerkit run sql``, ``workerkit dashboard
sql`` and, where it tests schedules, ``workerkit scheduler sql``) once, as a module fixture
named ``stack``, and the tests in it share those processes: every test uses job ids, tags and
queues of its own. ``page`` opens on that module's dashboard (``page.goto("/jobs")``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.browser import Stack, find_chromium, launch_chromium, screenshot_path

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from tests.support.harness import Supervisor


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = find_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = launch_chromium(playwright, executable)
        try:
            yield launched
        finally:
            launched.close()


def new_stack(tmp: Path, database_url: str, **settings: str) -> Stack:
    return Stack(tmp=tmp, database_url=database_url, journal=tmp / "journal.txt", settings=settings)


@pytest.fixture
def dashboard(stack: Stack) -> Supervisor:
    """The module's dashboard process (the stack's first)."""
    return stack.process("dashboard")


@pytest.fixture
def page(browser: Browser, dashboard: Supervisor) -> Iterator[Page]:
    context = browser.new_context(
        base_url=f"http://127.0.0.1:{dashboard.port}", viewport={"width": 1280, "height": 360}
    )
    context.set_default_timeout(20_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def shoot(tmp_path: Path) -> Callable[[Page, str], Path]:
    """``shoot(page, "overview")``: a full-page PNG, into the docs with ``GOLDEN_UPDATE=1``."""

    def take(page: Page, name: str) -> Path:
        path = screenshot_path(name, tmp_path)
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
