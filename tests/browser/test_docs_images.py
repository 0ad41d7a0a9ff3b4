"""The dashboard's how-to shows the screenshots the browser tests take: every image it
references exists (``GOLDEN_UPDATE=1 pytest tests/browser`` takes them again)."""

from __future__ import annotations

import re

from tests.support.browser import SCREENSHOTS
from tests.support.harness import REPO

PAGE = REPO / "docs" / "howto" / "dashboard.md"
#: The screenshots the tests take (tests/browser/test_dashboard_sqlite.py, which runs first).
TAKEN = ("overview", "jobs", "job", "workers", "schedules")


def test_every_image_the_dashboard_page_shows_exists() -> None:
    text = PAGE.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text)
    images += re.findall(r'<img[^>]*\bsrc="([^"]+)"', text)
    assert images, f"{PAGE.relative_to(REPO)} shows no image"
    missing = [src for src in images if not (PAGE.parent / src).resolve().is_file()]
    assert not missing, f"{PAGE.relative_to(REPO)} shows images that do not exist: {missing}"


def test_the_screenshots_the_tests_take_are_committed() -> None:
    missing = [name for name in TAKEN if not (SCREENSHOTS / f"{name}.png").is_file()]
    assert not missing, f"take them: GOLDEN_UPDATE=1 pytest tests/browser ({missing} missing)"
