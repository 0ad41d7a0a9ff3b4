"""Writes to a SQLite database's files, as the kernel reports them (Linux inotify).

SQLite has no notifications. A commit by another process (an enqueue) writes the database's
write-ahead log (``NAME-wal``), or in a rollback-journal mode the file itself, with a
``NAME-journal`` beside it for the transaction: :class:`FileChanges` makes a descriptor readable
when one of them is written, so an idle worker's thread can sleep in ``poll`` until then
instead of reading the data version every few milliseconds.

Two kinds of watches, so that the kernel filters what does not matter: one per file for its
writes (``IN_MODIFY``; the file and its log, each while it exists), and one on the directory
for those names only coming and going (``IN_CREATE``, ``IN_MOVED_TO``, ``IN_DELETE``): SQLite
deletes the log when its last connection closes, and a journal at each commit in DELETE mode; a
file that appears is watched from then on. The writes of the directory's other files (an app's
log file beside the database) raise no event.

What it cannot see, and so why the caller still looks now and then: writes through another
kernel (a network filesystem, on which SQLite's locking is not safe either), and a watch the
kernel dropped with its directory (``IN_IGNORED`` of the directory's watch: reported as a change,
then :attr:`FileChanges.lost`). An overflowed event queue (``IN_Q_OVERFLOW``) is reported as a
change. Writes through shared memory (``NAME-shm``, the WAL index) raise no event, and need
none: a commit always writes the log (or the file).

Without inotify (not Linux, no libc, the per-user limit of instances or watches reached),
:meth:`FileChanges.open` raises :class:`WatchUnavailable`, saying which, and the caller polls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import weakref
from pathlib import Path
from typing import Any, Final

from workerkit.engines.wakepipe import close_quietly
from workerkit.proctree import load_libc

__all__ = ("FileChanges", "WatchUnavailable")

# <sys/inotify.h>
_IN_MODIFY: Final = 0x00000002
_IN_MOVED_TO: Final = 0x00000080
_IN_CREATE: Final = 0x00000100
_IN_DELETE: Final = 0x00000200
_IN_Q_OVERFLOW: Final = 0x00004000
_IN_IGNORED: Final = 0x00008000
_IN_ONLYDIR: Final = 0x01000000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = 0o2000000  # O_CLOEXEC on Linux
_FILE_EVENTS: Final = _IN_MODIFY
_DIRECTORY_EVENTS: Final = _IN_CREATE | _IN_MOVED_TO | _IN_DELETE | _IN_ONLYDIR
# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }
_HEADER: Final = struct.Struct("iIII")


class WatchUnavailable(Exception):
    """The database's files cannot be watched here; the message says why and what to change."""


class FileChanges:
    """A readable descriptor (:meth:`fileno`) once one of the database's files was written."""

    def __init__(self, libc: Any, fd: int, directory: Path, name: bytes, directory_wd: int) -> None:
        self._libc = libc
        self._fd = fd
        self._directory = directory
        self._directory_wd = directory_wd
        #: The names whose writes count: the file, its log, its journal.
        self._names = frozenset({name, name + b"-wal", name + b"-journal"})
        #: The kernel dropped the directory's watch: no more events will come.
        self.lost = False
        # Closed with the object too: a forked child drops its parent's watcher thread, and
        # with it the last reference to this.
        self._finalizer = weakref.finalize(self, close_quietly, fd)
        for each in self._names:
            self._watch_file(each)

    @classmethod
    def open(cls, database: str) -> FileChanges:
        """Watch the files of the SQLite database at path ``database``; :class:`WatchUnavailable`
        where inotify cannot (the caller polls)."""
        libc = load_libc()
        if not libc or not hasattr(libc, "inotify_init1"):
            raise WatchUnavailable("no inotify here (Linux only)")
        path = Path(database).absolute()
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise WatchUnavailable(_why(ctypes.get_errno(), "inotify_init1"))
        directory_wd = _add_watch(libc, fd, path.parent, _DIRECTORY_EVENTS)
        if directory_wd < 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise WatchUnavailable(_why(code, f"inotify_add_watch({str(path.parent)!r})"))
        return cls(libc, fd, path.parent, os.fsencode(path.name), directory_wd)

    def fileno(self) -> int:
        return self._fd

    def take(self) -> bool:
        """Read every pending event; True when one may mean a commit (a write to one of the
        database's files, one of them coming or going, an overflowed queue, the watch lost)."""
        changed = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return changed
            except OSError:
                self.lost = True
                return True
            if not data:
                return changed
            changed |= self._parse(data)

    def _parse(self, data: bytes) -> bool:
        changed = False
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            name = data[offset + _HEADER.size : offset + _HEADER.size + length].rstrip(b"\0")
            offset += _HEADER.size + length
            if mask & _IN_Q_OVERFLOW:
                # Events were dropped, a log's creation among them maybe: watch every name
                # that exists now (a name watched already keeps its watch).
                for each in self._names:
                    self._watch_file(each)
                changed = True
            elif wd != self._directory_wd:
                # A file's write; its IN_IGNORED (the file deleted) needs nothing: the
                # directory reports the name when it comes back.
                changed |= not (mask & _IN_IGNORED)
            elif mask & _IN_IGNORED:
                self.lost = changed = True
            elif name in self._names:
                changed = True
                if mask & (_IN_CREATE | _IN_MOVED_TO):
                    self._watch_file(name)
        return changed

    def _watch_file(self, name: bytes) -> None:
        # Missing (ENOENT) is fine: the directory's watch reports the name when it appears.
        _add_watch(self._libc, self._fd, self._directory / os.fsdecode(name), _FILE_EVENTS)

    def close(self) -> None:
        self._finalizer()
        self._fd = -1


def _why(code: int, call: str) -> str:
    """What a failed inotify call means, and the fix where there is one."""
    # max_user_instances counts every process of the user on the node (its other pods too);
    # RLIMIT_NOFILE counts this process's descriptors: both end in EMFILE.
    if code == errno.EMFILE:
        return (
            f"{call}: too many open files: the process's limit (ulimit -n), or the user's "
            "inotify instances (fs.inotify.max_user_instances, 128 by default: raise it with "
            "sysctl on the node)"
        )
    if code == errno.ENOSPC:
        return (
            f"{call}: the user's inotify watches are used up (fs.inotify.max_user_watches; "
            "raise it with sysctl on the node)"
        )
    return f"{call}: {os.strerror(code) if code else 'failed'}"


def _add_watch(libc: Any, fd: int, path: Path, mask: int) -> int:
    """``inotify_add_watch``: the watch descriptor, or -1."""
    return int(libc.inotify_add_watch(fd, ctypes.c_char_p(os.fsencode(path)), mask))
