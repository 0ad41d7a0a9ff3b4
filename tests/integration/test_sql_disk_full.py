"""A SQLite queue on a disk that fills up: the WAL is checkpointed, it is reported, it recovers.

The disk is a 1 MiB tmpfs mounted in a private mount namespace (``unshare -m``, root only), so
the test fills a real filesystem and no other process sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import REPO

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare(1) and root to mount a small tmpfs of its own",
)


def test_sqlite_disk_full_checkpoints_the_wal_reports_it_and_recovers(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"'
    command = ["unshare", "-m", "sh", "-c", script, "sh", str(disk)]
    command += [sys.executable, "-m", "tests.support.sqlite_disk_full", str(disk)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The write that found the disk full says so, with what was done about it ...
    assert "database or disk is full" in result["error"], result
    assert "WAL checkpointed and truncated" in result["error"], result
    assert "sqlite_disk_full" in result["events"], result
    # ... the WAL gave its space back, so the queue is usable again ...
    assert result["wal_after"] == 0, result
    assert result["health"][0] is True, result
    # ... and writes work once the disk has room.
    assert result["after"] == "ready", result
