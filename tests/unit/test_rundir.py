"""Stale runtime directories: only ours, only with a dead owner, only what we put there."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from workerkit import rundir
from workerkit.proctree import start_time

if TYPE_CHECKING:
    import pytest


def _made_by(base: Path, name: str, **owner: object) -> Path:
    directory = base / f"{rundir.PREFIX}{name}"
    directory.mkdir(mode=0o700)
    (directory / rundir.SOCKET_FILE).write_text("")  # stands in for the socket
    (directory / rundir.OWNER_FILE).write_text(json.dumps(owner))
    return directory


def _identity(pid: int) -> dict[str, object]:
    return {
        "pid": pid,
        "start": start_time(pid),
        "boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "pidns": os.readlink("/proc/self/ns/pid"),
    }


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_only_directories_whose_owner_is_dead_are_removed(tmp_path: Path) -> None:
    me = _identity(os.getpid())
    dead = _made_by(tmp_path, "dead", **{**me, "pid": _dead_pid()})
    reused = _made_by(tmp_path, "reused", **{**me, "start": 1})  # our pid, another start
    rebooted = _made_by(tmp_path, "rebooted", **{**me, "boot": "another boot"})
    alive = _made_by(tmp_path, "alive", **me)
    elsewhere = _made_by(tmp_path, "elsewhere", **{**me, "pid": 1, "pidns": "pid:[1]"})
    unknown_owner = _made_by(tmp_path, "garbled", nonsense=True)
    no_owner = tmp_path / f"{rundir.PREFIX}foreign"
    no_owner.mkdir()
    extra = _made_by(tmp_path, "extra", **{**me, "pid": _dead_pid()})
    (extra / "notes.txt").write_text("not ours to delete")
    other_name = tmp_path / "other-dir"
    other_name.mkdir()

    removed = rundir.remove_stale(tmp_path)

    assert sorted(removed) == sorted([dead, reused, rebooted])
    for kept in (alive, elsewhere, unknown_owner, no_owner, extra, other_name):
        assert kept.exists(), kept
    assert (extra / "notes.txt").exists()


def test_a_created_directory_names_its_live_owner_and_is_never_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    directory = rundir.create()
    try:
        assert directory.parent == tmp_path
        assert oct(directory.stat().st_mode & 0o777) == "0o700"
        owner = json.loads((directory / rundir.OWNER_FILE).read_text())
        assert owner == _identity(os.getpid())
        assert rundir.remove_stale(tmp_path) == []
    finally:
        assert rundir.remove(directory)
    assert not directory.exists()
