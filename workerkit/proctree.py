"""Process trees from /proc: who descends from whom, and stopping processes by pid.

Shared by the supervisor and the engines' workers. Always by pid, never by process group, and a
target is held by a pidfd where there is one: why, in docs/operations/lifecycle.md ("PID 1
duties"). On a system without /proc every function finds nothing and stops nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

__all__ = (
    "STOP_GRACE",
    "alive",
    "descendants",
    "has_children",
    "load_libc",
    "parent_pids",
    "prctl",
    "processes_with_env",
    "signal_processes",
    "start_time",
    "stop_processes",
)

#: How long processes get between our SIGTERM and the SIGKILL (their ``finally`` blocks, a
#: subprocess's own cleanup). Short: they belong to an attempt that has already ended.
STOP_GRACE: Final = 0.5
_POLL: Final = 0.02


def parent_pids() -> dict[int, int]:
    """pid -> parent pid for every process we can see in /proc (empty when there is none)."""
    parents: dict[int, int] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return parents
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile, or we may not look
            continue
        # The command name (field 2) is in parentheses and may itself contain ") ", so split
        # after the last one: state is then field 3 and the parent pid field 4.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """The pids of every live descendant of ``pid`` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for child, parent in parent_pids().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    queue = list(children.get(pid, []))
    while queue:
        current = queue.pop(0)
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def has_children() -> bool:
    """Whether this process has a child (running or not yet reaped); True when /proc cannot
    tell (a kernel without ``/proc/PID/task/TID/children``).

    Cheaper than :func:`descendants` (a read per thread of this process, not one per process
    on the machine): for the common case of a job that left no subprocess behind.
    """
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", "rb") as children:
                if children.read().strip():
                    return True
    except OSError:
        return True
    return False


def processes_with_env(name: str, value: str) -> list[int]:
    """The pids of the processes (other than this one) started with ``name=value`` in their
    environment: what a supervisor's worker and everything it started inherit, wherever they
    were re-parented to."""
    wanted = f"{name}={value}".encode()
    found: list[int] = []
    me = os.getpid()
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or another user's
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped yet, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


class _Target:
    """One process to stop: its pid, and a pidfd that names that very process while we hold it."""

    __slots__ = ("fd", "pid")

    def __init__(self, pid: int, fd: int | None) -> None:
        self.pid = pid
        self.fd = fd

    def signal(self, signum: int) -> bool:
        """Send ``signum``; False when the process is gone (or not ours to signal)."""
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, signum)
            else:
                os.kill(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def running(self) -> bool:
        """True while it runs: a pidfd turns readable when its process exits (zombie or reaped),
        and then stays so, whoever gets the pid next."""
        if self.fd is None:
            return alive(self.pid)
        try:
            readable, _, _ = select.select([self.fd], [], [], 0)
        except (OSError, ValueError):
            return alive(self.pid)
        return not readable

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _hold(pids: Iterable[int]) -> list[_Target]:
    """Each pid (other than ours) held by a pidfd where the system has them; gone ones dropped."""
    targets: list[_Target] = []
    me = os.getpid()
    pidfd_open = getattr(os, "pidfd_open", None)
    for pid in dict.fromkeys(pids):
        if pid == me:
            continue
        fd: int | None = None
        if pidfd_open is not None:
            try:
                fd = pidfd_open(pid)
            except ProcessLookupError:
                continue  # gone already
            except OSError:  # no pidfds here (old kernel, seccomp): by pid
                fd = None
        targets.append(_Target(pid, fd))
    return targets


def signal_processes(pids: Iterable[int], signum: int) -> list[int]:
    """Send ``signum`` to each of ``pids`` (each held by a pidfd meanwhile); return those sent."""
    targets = _hold(pids)
    try:
        return [t.pid for t in targets if t.signal(signum)]
    finally:
        for target in targets:
            target.close()


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process for good.
    None when it is not running (gone, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # field 3 (state) onwards
    if len(fields) < 20 or fields[0] in ("Z", "X") or not fields[19].isdigit():
        return None
    return int(fields[19])


def stop_processes(
    pids: Iterable[int],
    *,
    grace: float = STOP_GRACE,
    reap: Callable[[], object] | None = None,
) -> list[int]:
    """SIGTERM each of ``pids``, then SIGKILL those still running after ``grace`` seconds.

    ``reap`` is called while waiting (a parent reaps its exited children there). Returns the
    pids that had to be killed. Each process is held by a pidfd from the start (where there are
    pidfds), so one reaped meanwhile whose pid is reused is not the one killed.
    """
    targets = _hold(pids)
    try:
        for target in targets:
            target.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        left = targets
        while left:
            if reap is not None:
                reap()
            left = [target for target in left if target.running()]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
        killed = [target.pid for target in left if target.signal(signal.SIGKILL)]
    finally:
        for target in targets:
            target.close()
    if reap is not None:
        reap()
    return killed


_libc: Any = None  # libc, once looked up (False: there is none); a forked child inherits it


def load_libc() -> Any:
    """libc through ctypes, looked up once per process (False where there is none).

    On Linux, the process's own symbols (``dlopen(NULL)``): Python is linked against libc, so
    its functions are there, with no search. ``find_library`` is the fallback: it runs
    ``ldconfig`` in a subprocess (a few ms, on the way to ready of both the supervisor and its
    worker), and so a process that forks a child per job (RQ's work horse) calls this before its
    first fork, so that no child pays for it again.
    """
    global _libc
    if _libc is None:
        _libc = _own_libc() or _found_libc()
    return _libc


def _own_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return libc if hasattr(libc, "prctl") else False


def _found_libc() -> Any:
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    try:
        return ctypes.CDLL(name, use_errno=True) if name is not None else False
    except OSError:
        return False


def prctl(option: int, arg: int) -> bool:
    """Linux's ``prctl(option, arg)`` through libc; False where there is none, or it failed."""
    libc = load_libc()
    if not libc:
        return False
    try:
        result = libc.prctl(option, arg, 0, 0, 0)
    except AttributeError:
        return False
    return bool(result == 0)
