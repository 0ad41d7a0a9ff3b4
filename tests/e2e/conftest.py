"""Fixtures for the end-to-end tests: a migrated SQLite queue and a journal per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import Env
from workerkit.engines.sql import upgrade


@pytest.fixture
def env(tmp_path: Path) -> Env:
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    upgrade(url)
    return Env(tmp=tmp_path, database_url=url, journal=tmp_path / "journal.txt")
