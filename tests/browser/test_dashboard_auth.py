"""The dashboard with --token-file: a page without the token is refused, the login works."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import new_stack

if TYPE_CHECKING:
    from tests.support.browser import Stack

expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def stack(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    del browser  # chromium first: nothing is started when it is missing
    tmp = tmp_path_factory.mktemp("dashboard-auth")
    stack = new_stack(tmp, f"sqlite:///{tmp / 'queue.sqlite3'}")
    token = secrets.token_urlsafe(24)
    (tmp / "token").write_text(token + "\n")
    stack.extra["E2E_TOKEN"] = token
    stack.upgrade()
    try:
        stack.start_dashboard("--token-file", str(tmp / "token"))
        yield stack
    finally:
        stack.stop()


def test_a_page_without_the_token_is_refused_and_the_login_works(stack: Stack, page: Page) -> None:
    stack.put("tick", "seen", job_id="seen", queue="guarded")
    answer = page.goto("/")
    assert answer is not None
    assert answer.status in (401, 403), answer.status
    expect(page.locator("#queues")).to_have_count(0)

    page.locator('input[name="token"]').fill(stack.extra["E2E_TOKEN"])
    page.locator('input[name="token"]').press("Enter")
    expect(page.locator('#queues tr[data-queue="guarded"] td.waiting')).to_have_text("1")
    answer = page.goto("/jobs/seen")
    assert answer is not None
    assert answer.status == 200
