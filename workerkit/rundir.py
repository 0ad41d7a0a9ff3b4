"""The supervisor's runtime directory (its event socket's), and removing those left behind.

Each supervisor makes a private ``workerkit-*`` directory (mode 0700) in the temporary directory
and removes it as it exits; every start removes the stale ones whose owner is surely dead. Which
ones, and why: docs/operations/lifecycle.md ("When the supervisor dies").
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

from workerkit.proctree import start_time

__all__ = ("OWNER_FILE", "PREFIX", "SOCKET_FILE", "base_dir", "create", "remove", "remove_stale")

PREFIX: Final = "workerkit-"
SOCKET_FILE: Final = "supervisor.sock"
#: Who made the directory: pid, its start time, the boot and the pid namespace (JSON).
OWNER_FILE: Final = "owner.json"
#: sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS); leave room for the file name.
_MAX_DIR_LEN: Final = 90
_OURS: Final = frozenset({SOCKET_FILE, OWNER_FILE})


def base_dir() -> Path:
    """Where runtime directories are made: the temporary directory, or /tmp when its path is too
    long for a socket's (pytest's, a deep home)."""
    base = tempfile.gettempdir()
    if len(base) > _MAX_DIR_LEN:
        base = "/tmp"  # noqa: S108 - a fresh 0700 directory is created inside it
    return Path(base)


def _identity(pid: int) -> dict[str, object]:
    return {"pid": pid, "start": start_time(pid), "boot": _boot_id(), "pidns": _pid_namespace()}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def create() -> Path:
    """Make a fresh private runtime directory (0700) with its owner file (this process)."""
    directory = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base_dir()))
    partial = directory / f".{OWNER_FILE}.tmp"
    partial.write_text(json.dumps(_identity(os.getpid())))
    partial.rename(directory / OWNER_FILE)  # whole or absent, for a start scanning meanwhile
    return directory


def remove(directory: Path) -> bool:
    """Remove a runtime directory's own files, then the directory if that emptied it."""
    for name in _OURS:
        with contextlib.suppress(OSError):
            (directory / name).unlink()
    try:
        directory.rmdir()
    except OSError:
        return False
    return True


def _owner_dead(owner: dict[str, object]) -> bool:
    me = _identity(os.getpid())
    if owner.get("boot") is None or me["boot"] is None:
        return False
    if owner["boot"] != me["boot"]:
        return True  # made before the last reboot
    if owner.get("pidns") is None or owner["pidns"] != me["pidns"]:
        return False  # another container's (a shared /tmp): its pids mean nothing here
    pid, started = owner.get("pid"), owner.get("start")
    if not isinstance(pid, int) or not isinstance(started, int):
        return False
    return start_time(pid) != started  # gone (None), or the pid is another process's now


def _stale(directory: Path) -> bool:
    try:
        info = directory.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return False
        names = {entry.name for entry in directory.iterdir()}
        if OWNER_FILE not in names or not names <= _OURS:
            return False  # not made by us, or holding something we did not put there
        owner = json.loads((directory / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(owner, dict) and _owner_dead(owner)


def remove_stale(base: Path | None = None) -> list[Path]:
    """Remove the runtime directories in ``base`` whose owner is dead; return them."""
    base = base_dir() if base is None else base
    try:
        candidates = sorted(base.glob(f"{PREFIX}*"))
    except OSError:
        return []
    return [d for d in candidates if _stale(d) and remove(d)]
